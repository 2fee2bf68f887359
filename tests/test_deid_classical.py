"""Classical de-identification methods: each one's defining property, on synthetic and real faces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_rgb
from facepriv.core.errors import ConfigError
from facepriv.core.faces import Face
from facepriv.core.regions import region_mask
from facepriv.deid import METHODS, create_method, deidentify


def make_face(cx: float = 160.0, cy: float = 150.0, size: float = 160.0, roll: float = 0.0) -> Face:
    """A face box with plausible five landmarks (eyes, nose, mouth corners)."""
    s = size
    pts = np.array([[-0.2, -0.12], [0.2, -0.12], [0.0, 0.05], [-0.16, 0.22], [0.16, 0.22]]) * s
    c, si = np.cos(roll), np.sin(roll)
    pts = pts @ np.array([[c, si], [-si, c]]) + [cx, cy]
    box = np.array([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], np.float32)
    return Face(box=box, landmarks=pts.astype(np.float32), score=0.99)


def textured(h: int = 320, w: int = 320, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g)


def laplacian_energy(x: torch.Tensor) -> float:
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return float((lap**2).mean())


def test_registered_methods_and_aliases():
    for name in ("blur", "pixelate", "mask", "eyebar", "noise", "k-same-average", "k-same-select",
                 "k-same-pixelate", "inpaint"):
        assert name in METHODS
    assert create_method("eye-bar").name == "eyebar"
    with pytest.raises(ConfigError):
        create_method("nonsense")
    with pytest.raises(ConfigError):
        create_method("blur", region="elbow")
    with pytest.raises(ConfigError):
        create_method("pixelate", strength=0)


@pytest.mark.parametrize("name", ["blur", "pixelate", "mask", "eyebar", "noise"])
def test_input_untouched_and_outside_unchanged(name):
    x = textured()
    before = x.clone()
    face = make_face()
    y = create_method(name).apply(x, [face])
    assert torch.equal(x, before)
    assert y.shape == x.shape and not torch.equal(y, x)
    # nothing changes outside the method's support (head region bounds are a superset)
    reg = region_mask(face, x.shape[-2:], region="head", feather=0.3)
    outside = torch.ones(x.shape[-2:], dtype=torch.bool)
    outside[reg.y0:reg.y1, reg.x0:reg.x1] = False
    assert torch.equal(y[:, outside], x[:, outside])


def test_blur_removes_high_frequencies_in_face_box():
    x = textured()
    face = make_face()
    y = create_method("blur").apply(x, [face])
    x1, y1, x2, y2 = [int(v) for v in face.box]
    cy, cx, r = (y1 + y2) // 2, (x1 + x2) // 2, (x2 - x1) // 4
    before = laplacian_energy(x[:, cy - r: cy + r, cx - r: cx + r])
    after = laplacian_energy(y[:, cy - r: cy + r, cx - r: cx + r])
    assert after < 0.01 * before
    # a weaker blur keeps more detail than the default
    weak = create_method("blur", strength=0.05).apply(x, [face])
    assert laplacian_energy(weak[:, cy - r: cy + r, cx - r: cx + r]) > after


def test_pixelate_is_constant_per_block():
    x = textured()
    face = make_face()
    m = create_method("pixelate")
    y = m.apply(x, [face])
    b = m.block(face)
    assert b == round(face.size / 8)
    reg = region_mask(face, x.shape[-2:], region=m.region, feather=m.feather)
    inside = reg.mask[0] >= 1.0
    n_checked = 0
    for by in range(0, reg.y1 - reg.y0 - b + 1, b):
        for bx in range(0, reg.x1 - reg.x0 - b + 1, b):
            if not bool(inside[by:by + b, bx:bx + b].all()):
                continue
            block = y[:, reg.y0 + by: reg.y0 + by + b, reg.x0 + bx: reg.x0 + bx + b]
            assert float(block.amax((1, 2)).sub(block.amin((1, 2))).abs().max()) == 0.0
            # and the value is the mean of the input block
            src = x[:, reg.y0 + by: reg.y0 + by + b, reg.x0 + bx: reg.x0 + bx + b]
            assert torch.allclose(block[:, 0, 0], src.mean((1, 2)), atol=1e-6)
            n_checked += 1
    assert n_checked >= 20


def test_mask_is_constant_and_coloured():
    x = textured()
    face = make_face()
    y = create_method("mask", color=(1.0, 0.5, 0.0)).apply(x, [face])
    reg = region_mask(face, x.shape[-2:], region="face", feather=0.0)
    ys, xs = reg.slices
    inside = reg.mask[0] > 0
    vals = y[:, ys, xs][:, inside]
    assert torch.equal(vals, torch.tensor([1.0, 0.5, 0.0])[:, None].expand_as(vals))
    # box region covers the box corners, the ellipse does not
    yb = create_method("mask", region="box").apply(x, [face])
    x1, y1 = int(face.box[0]) + 2, int(face.box[1]) + 2
    assert float(yb[:, y1, x1].abs().sum()) == 0 and float(y[:, y1, x1].abs().sum()) > 0


def test_feather_blends_edges():
    x = torch.ones(3, 320, 320)
    face = make_face()
    hard = create_method("mask", feather=0.0).apply(x, [face])
    soft = create_method("mask", feather=0.3).apply(x, [face])
    partial = lambda t: int(((t[0] > 0.01) & (t[0] < 0.99)).sum())  # noqa: E731
    assert partial(hard) == 0 and partial(soft) > 500


def test_eyebar_covers_both_eyes_along_the_eye_line():
    x = textured()
    for roll in (0.0, 0.4):
        face = make_face(roll=roll)
        y = create_method("eyebar", color=(0.0, 1.0, 0.0)).apply(x, [face])
        for ex, ey in face.landmarks[:2]:
            patch = y[:, int(ey) - 3: int(ey) + 4, int(ex) - 3: int(ex) + 4]
            assert torch.equal(patch, torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand_as(patch))
        # the chin is left alone
        mx, my = face.landmarks[3:].mean(0)
        assert torch.equal(y[:, int(my) + 30, int(mx)], x[:, int(my) + 30, int(mx)])
    # strength scales the bar height
    small = create_method("eyebar", strength=0.3).apply(x, [make_face()])
    big = create_method("eyebar").apply(x, [make_face()])
    assert int((small != x).any(0).sum()) < int((big != x).any(0).sum())


def test_noise_has_the_requested_sigma_and_is_reproducible():
    x = torch.full((3, 320, 320), 0.5)
    face = make_face()
    m = create_method("noise", sigma=0.1, grain=0.0, feather=0.0)
    y = m.apply(x, [face])
    reg = region_mask(face, x.shape[-2:], region="face", feather=0.0)
    ys, xs = reg.slices
    resid = (y - x)[:, ys, xs][:, reg.mask[0] > 0]
    assert abs(float(resid.std()) - 0.1) < 0.005 and abs(float(resid.mean())) < 0.005
    assert torch.equal(y, m.apply(x, [face]))  # same seed, same noise
    other = create_method("noise", sigma=0.1, grain=0.0, feather=0.0, seed=1).apply(x, [face])
    assert not torch.equal(y, other)
    # coarse grain: constant within each grain cell
    g = create_method("noise", sigma=0.1, grain=0.05, feather=0.0)
    yg = g.apply(x, [face])
    cell = round(0.05 * face.size)
    iy, ix = (150 - reg.y0) // cell, (160 - reg.x0) // cell  # a cell at the face centre
    for dy, dx in ((0, 0), (1, 0), (0, 1)):
        y0, x0 = reg.y0 + (iy + dy) * cell, reg.x0 + (ix + dx) * cell
        blk = yg[:, y0: y0 + cell, x0: x0 + cell]
        assert float((blk - blk[:, :1, :1]).abs().max()) == 0.0 and float((blk - 0.5).abs().max()) > 0


def test_ensemble_applies_in_sequence():
    x = textured()
    face = make_face()
    methods = [create_method("pixelate"), create_method("noise")]
    y = deidentify(x, [face], methods)
    assert torch.equal(y, methods[1].apply(methods[0].apply(x, [face]), [face]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["blur", "pixelate", "mask", "eyebar", "noise"])
def test_same_result_on_gpu(name):
    x = textured()
    face = make_face()
    cpu = create_method(name).apply(x, [face])
    gpu = create_method(name).setup("cuda").apply(x.cuda(), [face]).cpu()
    assert torch.allclose(cpu, gpu, atol=2e-3)


@pytest.fixture(scope="module")
def real_faces():
    """Two real portraits with their MTCNN faces and two recognition models (loaded once)."""
    from facepriv.models import create_model

    det = create_model("mtcnn")
    photos = []
    for photo in ("obama.jpg", "biden.jpg"):
        rgb = load_rgb(photo)
        faces = det.detect(rgb)
        assert len(faces) == 1
        photos.append((photo, torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255, faces))
    return photos, {n: create_model(n) for n in ("dlib-resnet", "sface")}


@pytest.mark.realmodels
@pytest.mark.parametrize("name", ["blur", "pixelate", "mask", "eyebar", "noise"])
def test_defaults_defeat_recognition_on_real_photos(name, real_faces):
    from facepriv.core.align import landmarks_tensor
    from facepriv.models import get_spec
    from facepriv.models.recognition import embed_faces, similarity

    photos, fr = real_faces
    for photo, x, faces in photos:
        y = create_method(name).apply(x, faces)
        lm = landmarks_tensor(faces)
        for n, model in fr.items():
            s = float(similarity(embed_faces(model, x, lm), embed_faces(model, y, lm), model.metric)[0])
            assert s < get_spec(n).thresholds["default"], (name, photo, n, s)
