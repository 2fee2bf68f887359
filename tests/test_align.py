"""Detection on real photos, alignment to templates, and paste-back."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import load_rgb, psnr
from facepriv.core.align import (
    TEMPLATES,
    Template,
    align_faces,
    feather_mask,
    invert_affine,
    paste_back,
    similarity_transform,
    transform_points,
)
from facepriv.core.faces import FacePolicy
from facepriv.core.io import image_to_tensor


def test_similarity_transform_recovers_known_transform():
    rng = np.random.default_rng(1)
    src = torch.tensor(rng.uniform(0, 100, (3, 5, 2)), dtype=torch.float32)
    ang, s, t = 0.3, 1.7, torch.tensor([5.0, -3.0])
    rot = torch.tensor([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    dst = src @ (s * rot).T + t
    m = similarity_transform(src, dst)
    assert torch.allclose(m[:, :, :2], (s * rot).expand(3, 2, 2), atol=1e-4)
    assert torch.allclose(transform_points(m, src), dst, atol=1e-3)
    assert torch.allclose(transform_points(invert_affine(m), dst), src, atol=1e-3)


@pytest.mark.realmodels
@pytest.mark.parametrize("name,count", [("obama.jpg", 1), ("biden.jpg", 1), ("group.jpg", 6)])
def test_detection_finds_the_faces(mtcnn, name, count):
    faces = FacePolicy(min_face_size=20).select(mtcnn.detect(load_rgb(name)))
    assert len(faces) == count
    for f in faces:
        assert f.score > 0.9
        le, re, nose, ml, mr = f.landmarks
        assert le[0] < re[0] and ml[0] < mr[0] and max(le[1], re[1]) < nose[1] < min(ml[1], mr[1])


def test_alignment_moves_pixels_exactly_where_the_transform_says():
    """Five bright dots at a similarity-transformed template land on the template (< 0.5 px)."""
    tpl = TEMPLATES["arcface-112"]
    pts = np.asarray(tpl.points)
    ang, s, t = 0.35, 3.2, np.array([140.0, 90.0])
    rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    src = pts @ (s * rot).T + t
    img = torch.zeros(3, 600, 600)
    yy, xx = torch.meshgrid(torch.arange(600.0), torch.arange(600.0), indexing="ij")
    for x0, y0 in src:
        img += torch.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 4.0**2))[None]
    crop = align_faces(img, torch.tensor(src, dtype=torch.float32)[None], "arcface-112", antialias=False).crops[0, 0]
    for px, py in pts:
        x0, y0 = int(round(px)), int(round(py))
        win = crop[y0 - 4: y0 + 5, x0 - 4: x0 + 5]
        gy, gx = torch.meshgrid(torch.arange(y0 - 4.0, y0 + 5), torch.arange(x0 - 4.0, x0 + 5), indexing="ij")
        cx, cy = float((win * gx).sum() / win.sum()), float((win * gy).sum() / win.sum())
        assert abs(cx - px) < 0.5 and abs(cy - py) < 0.5


# Largest distance (in inter-ocular distances) between a real face's re-detected eyes and the
# template's eye points. FaceNet's 160 px template comes from facenet-pytorch's MTCNN crops,
# which resize a non-square box to a square (an anisotropic scale no similarity transform can
# reproduce), so faces fit it less tightly than the ArcFace and dlib templates.
EYE_TOLERANCE = {"arcface-112": 0.1, "dlib-150": 0.1, "facenet-160": 0.2}


@pytest.mark.realmodels
@pytest.mark.parametrize("template", sorted(EYE_TOLERANCE))
@pytest.mark.parametrize("name", ["obama.jpg", "obama2.jpg", "biden.jpg"])
def test_alignment_puts_real_eyes_on_the_template(mtcnn, name, template):
    """Re-detect the face on the aligned crop: the landmarks sit where the similarity transform
    sends them (the warp is right), and the eyes sit on the template's eye points."""
    rgb = load_rgb(name)
    face = mtcnn.detect(rgb)[0]
    tpl = TEMPLATES[template]
    size = tpl.size[0]
    # The template scaled to 896 px with half a face of context on each side, so MTCNN
    # re-detects the face the way it saw it in the photo.
    k, pad = 4.0 * 112 / size, size / 2
    ctx = Template("ctx", (int(round((size + 2 * pad) * k)),) * 2,
                   tuple(((x + pad) * k, (y + pad) * k) for x, y in tpl.points))
    lm = torch.from_numpy(face.landmarks)[None]
    aligned = align_faces(image_to_tensor(rgb), lm, ctx)
    crop = (aligned.crops[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    again = mtcnn.detect(np.ascontiguousarray(crop))
    assert again, "no face on the aligned crop"
    got = again[0].landmarks / k - pad
    mapped = transform_points(aligned.matrices, lm)[0].numpy() / k - pad
    warp_err = np.linalg.norm(got - mapped, axis=1)
    assert warp_err.max() < 4.0 * size / 112, f"re-detected landmarks off the transform by {warp_err} px"
    pts = np.asarray(tpl.points)
    iod = np.linalg.norm(pts[1] - pts[0])
    eye_err = np.linalg.norm(got[:2] - pts[:2], axis=1) / iod
    assert eye_err.max() < EYE_TOLERANCE[template], f"eyes off the {template} template by {eye_err * iod} px"


def test_every_template_maps_landmarks_exactly_onto_its_points():
    """Synthetic dots placed at a similarity-transformed copy of each template land on it."""
    for name in ("arcface-112", "facenet-160", "dlib-150"):
        tpl = TEMPLATES[name]
        pts = np.asarray(tpl.points)
        ang, s, t = -0.2, 2.1, np.array([60.0, 40.0])
        rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
        src = pts @ (s * rot).T + t
        h = w = int(max(src.max(0)) + 60)
        img = torch.zeros(3, h, w)
        yy, xx = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
        for x0, y0 in src:
            img += torch.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 3.0**2))[None]
        crop = align_faces(img, torch.tensor(src, dtype=torch.float32)[None], name, antialias=False).crops[0, 0]
        assert crop.shape == tpl.size
        for px, py in pts:
            x0, y0 = int(round(px)), int(round(py))
            win = crop[y0 - 3: y0 + 4, x0 - 3: x0 + 4]
            gy, gx = torch.meshgrid(torch.arange(y0 - 3.0, y0 + 4), torch.arange(x0 - 3.0, x0 + 4), indexing="ij")
            cx, cy = float((win * gx).sum() / win.sum()), float((win * gy).sum() / win.sum())
            assert abs(cx - px) < 0.5 and abs(cy - py) < 0.5, (name, px, py, cx, cy)


def test_alignment_is_differentiable_and_batched():
    x = torch.rand(3, 200, 300, requires_grad=True)
    lm = torch.tensor([[[100, 80], [140, 80], [120, 105], [105, 130], [135, 130]],
                       [[200, 90], [230, 92], [215, 110], [203, 125], [228, 126]]], dtype=torch.float32)
    out = align_faces(x, lm, "arcface-112")
    assert out.crops.shape == (2, 3, 112, 112)
    out.crops.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_large_faces_are_antialiased():
    """A 10x downscale through align_faces matches an area-filtered reference, not aliasing."""
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.uniform(0, 1, (3, 1200, 1200)), dtype=torch.float32)
    tpl = np.asarray(TEMPLATES["arcface-112"].points, dtype=np.float32)
    lm = torch.from_numpy(tpl * 10 + 20)[None]  # the face is 10x the template size
    crop = align_faces(x, lm, "arcface-112").crops[0]
    # noise averaged over ~10x10 pixels has a small std; aliased sampling keeps the full std (0.29)
    assert float(crop[:, 10:-10, 10:-10].std()) < 0.1


@pytest.mark.realmodels
def test_paste_back_of_unmodified_face_reproduces_original(mtcnn):
    rgb = load_rgb("group.jpg")
    x = image_to_tensor(rgb)
    faces = mtcnn.detect(rgb)
    lm = torch.from_numpy(np.stack([f.landmarks for f in faces]))
    al = align_faces(x, lm, "arcface-112")
    # residual mode: exactly the edit is added back. A linear ramp edit in aligned space
    # arrives as the same ramp evaluated at each pixel's aligned coordinates (bilinear
    # interpolation is exact on linear functions); outside the aligned squares nothing changes.
    h, w = al.crops.shape[-2:]
    vv, uu = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    ramp = (0.002 * uu + 0.001 * vv + 0.05).expand(len(faces), 3, h, w)
    ones = torch.ones(len(faces), 1, h, w)
    res = paste_back(x, al.crops + ramp, al.matrices, reference=al.crops, mask=ones)
    H, W = x.shape[-2:]
    py, px = torch.meshgrid(torch.arange(float(H)), torch.arange(float(W)), indexing="ij")
    pix = torch.stack([px.flatten(), py.flatten()], 1)
    uvs = [transform_points(al.matrices[i: i + 1], pix[None])[0] for i in range(len(faces))]
    covers = [(uv[:, 0] > -1) & (uv[:, 0] < w) & (uv[:, 1] > -1) & (uv[:, 1] < h) for uv in uvs]
    inside_any = torch.stack(covers).any(0)
    for i, uv in enumerate(uvs):
        inside = (uv[:, 0] >= 1) & (uv[:, 0] <= w - 2) & (uv[:, 1] >= 1) & (uv[:, 1] <= h - 2)
        others = torch.stack([c for j, c in enumerate(covers) if j != i]).any(0)
        sel = inside & ~others  # pixels only this face's square covers
        assert sel.sum() > 1000
        want = 0.002 * uv[sel, 0] + 0.001 * uv[sel, 1] + 0.05
        got = (res - x).reshape(3, -1)[:, sel]
        assert torch.allclose(got, want.expand(3, -1), atol=1e-4), float((got - want).abs().max())
    assert torch.equal(res.reshape(3, -1)[:, ~inside_any], x.reshape(3, -1)[:, ~inside_any])
    # replace mode at a resolution at least the face's own: also > 40 dB inside the face box
    al2 = align_faces(x, lm, "arcface-112", size=(448, 448))
    rep = paste_back(x, al2.crops, al2.matrices, feather=0.05)
    for f in faces:
        x1, y1, x2, y2 = [int(round(v)) for v in f.box]
        assert psnr(rep[:, y1:y2, x1:x2], x[:, y1:y2, x1:x2]) > 40
    # an edit shows up only inside the face region
    edited = al.crops.clone()
    edited[0] = 1.0
    out = paste_back(x, edited, al.matrices, reference=al.crops)
    changed = (out - x).abs().sum(0) > 1e-3
    ys, xs = torch.nonzero(changed, as_tuple=True)
    box = faces[0].box
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert changed.any() and abs(float(xs.float().mean()) - cx) < 15 and abs(float(ys.float().mean()) - cy) < 20
    untouched = [f for f in faces[1:]]
    for f in untouched:
        x1, y1, x2, y2 = [int(round(v)) for v in f.box]
        assert not changed[y1:y2, x1:x2].any() or (f.box[0] < box[2] and box[0] < f.box[2])


def test_feather_mask_shapes():
    m = feather_mask((64, 64), feather=0.1)
    assert m.shape == (1, 1, 64, 64) and float(m[0, 0, 32, 32]) == 1.0 and float(m[0, 0, 0, 0]) == 0.0
    e = feather_mask((64, 64), shape="ellipse")
    assert float(e[0, 0, 2, 2]) == 0.0 and float(e[0, 0, 32, 32]) == 1.0
