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


@pytest.mark.realmodels
@pytest.mark.parametrize("name", ["obama.jpg", "obama2.jpg", "biden.jpg"])
def test_alignment_puts_real_eyes_on_the_template(mtcnn, name):
    """Re-detect the face on the aligned crop: the eyes sit on the ArcFace template points."""
    rgb = load_rgb(name)
    face = mtcnn.detect(rgb)[0]
    tpl = TEMPLATES["arcface-112"]
    # The template at 4x with half a face of context on each side, so MTCNN re-detects the face
    # the way it saw it in the photo.
    k, pad = 4.0, 56.0
    ctx = Template("ctx", (int((112 + 2 * pad) * k),) * 2, tuple(((x + pad) * k, (y + pad) * k) for x, y in tpl.points))
    aligned = align_faces(image_to_tensor(rgb), torch.from_numpy(face.landmarks)[None], ctx)
    crop = (aligned.crops[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    again = mtcnn.detect(np.ascontiguousarray(crop))
    assert again, "no face on the aligned crop"
    got = again[0].landmarks / k - pad
    err = np.linalg.norm(got - np.asarray(tpl.points), axis=1)
    assert err[:2].max() < 3.5, f"eyes off by {err[:2]} px at 112x112"  # within a few pixels
    assert err.max() < 7.0  # nose/mouth: the face's own shape differs from the template


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
    # residual mode: only the (zero) edit is added back: exact
    same = paste_back(x, al.crops, al.matrices, reference=al.crops)
    for f in faces:
        x1, y1, x2, y2 = [int(round(v)) for v in f.box]
        assert psnr(same[:, y1:y2, x1:x2], x[:, y1:y2, x1:x2]) > 40
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
