"""L-inf attacks (facepriv.attacks): budget in float and after 8-bit rounding, region-only
changes, batching, early stop, TIP-IM, and - with the real surrogates - that dodging and
impersonation move the identity the right way (plus a transfer read-out on SFace)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import load_rgb
from torch import nn

from facepriv.attacks import (
    AttackConfig,
    SurrogateEnsemble,
    attack_faces,
    parse_epsilon,
    quantize_within,
    reference_from_image,
    reference_from_images,
)
from facepriv.attacks.linf import _read_extents
from facepriv.attacks.naturalness import hf_energy, mmd_patches
from facepriv.attacks.transforms import diversify, scaled_kernel, ti_smooth
from facepriv.core.align import landmarks_tensor
from facepriv.core.errors import ConfigError, NoFaceError
from facepriv.core.regions import region_mask
from facepriv.models import ModelSpec
from facepriv.models.recognition import FaceRecognizer, embed_faces

EPS = 8 / 255


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


# ----------------------------------------------------------------------------- tiny surrogates
def _tiny(name: str, template: str, size: int, seed: int, thresholds=None) -> FaceRecognizer:
    torch.manual_seed(seed)
    spec = ModelSpec(name=name, task="recognition", architecture="tiny cnn", description="test", license="MIT",
                     sources=(), loader=lambda ctx: None, input_size=(size, size), template=template,
                     metric="cosine", thresholds=thresholds or {})
    net = nn.Sequential(nn.Conv2d(3, 8, 5, 2, 2), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 32))
    return FaceRecognizer(spec, net, lambda x: x * 2 - 1).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tiny():
    return SurrogateEnsemble([], models=[_tiny("tiny-a", "arcface-112", 56, 1), _tiny("tiny-b", "facenet-160", 64, 2)])


def _detect(mtcnn, rgb):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # see conftest.one_thread: module fixtures run before it
    try:
        return mtcnn.detect(rgb)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def obama(mtcnn):
    rgb = load_rgb("obama.jpg")
    faces = _detect(mtcnn, rgb)
    assert len(faces) == 1
    return rgb, torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255, faces


@pytest.fixture(scope="module")
def group(mtcnn):
    rgb = load_rgb("group.jpg")
    faces = _detect(mtcnn, rgb)
    assert len(faces) >= 5
    return rgb, torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255, faces


def _union_mask(faces, hw, region="face", feather=0.1):
    m = torch.zeros(1, *hw)
    for f in faces:
        r = region_mask(f, hw, region=region, feather=feather)
        m[:, r.y0:r.y1, r.x0:r.x1] = torch.maximum(m[:, r.y0:r.y1, r.x0:r.x1], r.mask)
    return m


# ----------------------------------------------------------------------------- budget, region
@pytest.mark.parametrize("method", ["pgd", "mifgsm", "tidim", "tipim"])
def test_budget_holds_in_float_and_after_uint8_rounding(method, tiny, obama):
    rgb, x, faces = obama
    target = None
    if method == "tipim":
        target = {n: torch.randn(1, 32) for n in tiny.names}
    cfg = AttackConfig(method=method, steps=4, random_start=True, diversity_prob=0.5 if method != "pgd" else None)
    res = attack_faces(x, faces, tiny, cfg, target_ref=target)
    d = (res.image - x).abs()
    assert float(d.max()) <= EPS + 1e-6
    assert res.linf <= EPS + 1e-6
    assert float(d.max()) > 4 / 255  # it did move pixels, up to the budget
    # on the 8-bit grid: what save_image writes is exactly this tensor
    levels = res.image * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    u8 = np.round(res.image.permute(1, 2, 0).numpy() * 255).astype(np.int16)
    assert np.abs(u8 - rgb.astype(np.int16)).max() <= 8
    assert res.image.shape == x.shape and res.image.dtype == x.dtype
    assert res.per_face[0]["status"] == "attacked" and res.per_face[0]["steps"] == 4


def test_off_grid_epsilon_is_floored_to_whole_levels(tiny, obama):
    rgb, x, faces = obama
    eps = 0.02  # 5.1 levels: the saved file may move 5 levels, never 6
    res = attack_faces(x, faces, tiny, AttackConfig(epsilon=eps, steps=3, random_start=True))
    assert float((res.image - x).abs().max()) <= eps + 1e-6
    u8 = np.round(res.image.permute(1, 2, 0).numpy() * 255).astype(np.int16)
    assert np.abs(u8 - rgb.astype(np.int16)).max() == 5


@pytest.mark.parametrize("region", ["face", "box"])
def test_only_the_face_region_changes(region, tiny, obama):
    _, x, faces = obama
    res = attack_faces(x, faces, tiny, AttackConfig(steps=3, region=region, feather=0.1, random_start=True))
    mask = _union_mask(faces, x.shape[-2:], region=region)
    d = (res.image - x).abs()
    assert float(d[:, mask[0] == 0].max()) == 0.0
    # the per-pixel budget tapers with the feathered mask
    assert bool((d <= EPS * mask + 1e-6).all())
    inside = d[:, mask[0] > 0.99]
    assert float((inside > 0).float().mean()) > 0.5  # most of the face did change
    # pixels far from the face are bit-identical
    assert torch.equal(res.image[:, :10, :10], x[:, :10, :10])


def test_crop_reads_everything_the_alignment_reads(tiny, obama):
    _, x, faces = obama
    lm = landmarks_tensor(faces)
    ext = _read_extents(tiny, lm, 0.0)[0]
    H, W = x.shape[-2:]
    x0, y0 = max(0, math.floor(ext[0])), max(0, math.floor(ext[1]))
    x1, y1 = min(W, math.ceil(ext[2]) + 1), min(H, math.ceil(ext[3]) + 1)
    assert (x1 - x0) * (y1 - y0) < H * W  # a real crop, not the whole photo
    full = tiny.reference(x, lm)
    crop = tiny.reference(x[:, y0:y1, x0:x1], lm - torch.tensor([x0, y0]))
    for n in tiny.names:
        assert torch.allclose(full[n], crop[n], atol=1e-5)


def test_all_faces_of_a_group_are_attacked_in_one_batch(tiny, group):
    _, x, faces = group
    res = attack_faces(x, faces, tiny, AttackConfig(method="mifgsm", steps=2))
    assert len(res.per_face) == len(faces)
    H, W = x.shape[-2:]
    d = (res.image - x).abs().amax(0)
    for row, f in zip(res.per_face, faces):
        assert row["status"] == "attacked" and row["steps"] == 2
        r = region_mask(f, (H, W))
        assert float(d[r.y0:r.y1, r.x0:r.x1].max()) > 0
        for s in row["similarity"].values():
            assert s["after"] < s["before"]  # dodging: away from each face's own embedding
    assert float(d[_union_mask(faces, (H, W))[0] == 0].max()) == 0.0


def test_no_face_or_face_off_image_leaves_the_image_alone(tiny, obama):
    _, x, faces = obama
    res = attack_faces(x, [], tiny, AttackConfig(steps=2))
    assert torch.equal(res.image, x) and res.per_face == [] and res.linf == 0.0
    f = faces[0]
    off = type(f)(box=f.box + 5000, landmarks=f.landmarks + 5000, score=f.score)
    res = attack_faces(x, [off], tiny, AttackConfig(steps=2))
    assert torch.equal(res.image, x) and res.per_face[0]["status"] == "skipped"


# ----------------------------------------------------------------------------- early stop
def test_early_stop_stops_when_every_surrogate_is_past_its_threshold(tiny, obama):
    _, x, faces = obama
    easy = {"tiny-a": 2.0, "tiny-b": 2.0}  # cosine < 1.95 holds after any step
    res = attack_faces(x, faces, tiny, AttackConfig(steps=6, early_stop=True, thresholds=easy))
    assert res.per_face[0]["steps"] == 1 and res.per_face[0]["early_stopped"]
    half = {"tiny-a": 2.0, "tiny-b": -2.0}  # one surrogate can never pass: no stop
    res = attack_faces(x, faces, tiny, AttackConfig(steps=3, early_stop=True, thresholds=half))
    assert res.per_face[0]["steps"] == 3 and not res.per_face[0]["early_stopped"]
    with pytest.raises(ConfigError, match="threshold"):
        attack_faces(x, faces, tiny, AttackConfig(steps=3, early_stop=True))


def test_early_stop_freezes_finished_faces_in_a_group(tiny, group):
    _, x, faces = group
    # a threshold only the first steps can reach for some faces: every face reports its own count
    res = attack_faces(x, faces, tiny, AttackConfig(steps=5, early_stop=True,
                                                    thresholds={"tiny-a": 0.99, "tiny-b": 0.99},
                                                    early_stop_margin=0.0))
    steps = [r["steps"] for r in res.per_face]
    assert all(1 <= s <= 5 for s in steps)
    for r in res.per_face:
        if r["early_stopped"]:
            assert all(s["after"] < 0.99 for s in r["similarity"].values())


# ----------------------------------------------------------------------------- TIP-IM, options
def test_tipim_chooses_among_several_targets_and_naturalness_smooths(tiny, obama):
    _, x, faces = obama
    g = torch.Generator().manual_seed(3)
    targets = {n: torch.randn(3, 32, generator=g) for n in tiny.names}
    res = attack_faces(x, faces, tiny, AttackConfig(method="tipim", steps=3), target_ref=targets)
    row = res.per_face[0]
    assert row["target_index"] in (0, 1, 2) and row["mode"] == "impersonation"
    assert set(row["target_cosine"]) == set(tiny.names)
    single = {n: t[:1] for n, t in targets.items()}
    mask = _union_mask(faces, x.shape[-2:])
    energy = {}
    for w in (0.0, 1.0):
        r = attack_faces(x, faces, tiny, AttackConfig(method="tipim", steps=5, naturalness_weight=w), target_ref=single)
        energy[w] = float(hf_energy(r.image - x, mask, EPS))
        for s in r.per_face[0]["target_cosine"].values():
            assert s["after"] > s["before"]
    assert energy[1.0] < 0.8 * energy[0.0]
    with pytest.raises(ConfigError, match="target"):
        attack_faces(x, faces, tiny, AttackConfig(method="tipim", steps=1))


def test_mmd_naturalness_grows_with_the_perturbation(obama):
    _, x, _ = obama
    crop = x[:, 100:260, 100:260]
    mask = torch.ones(1, 160, 160)
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(crop.shape, generator=g) * 2 - 1
    vals = [float(mmd_patches((crop + a * noise).clamp(0, 1), crop, mask)) for a in (0.0, 4 / 255, 16 / 255)]
    assert vals[0] == pytest.approx(0.0, abs=1e-6) and vals[0] < vals[1] < vals[2]


def test_progress_is_advanced_once_per_step(tiny, obama):
    _, x, faces = obama

    class Recorder:
        def __init__(self):
            self.advanced, self.tasks = 0, []

        def add_task(self, desc, total=None):
            self.tasks.append((desc, total))
            return 7

        def advance(self, task, n=1):
            assert task == 7
            self.advanced += n

        def update(self, task, **kw):
            pass

    rec = Recorder()
    attack_faces(x, faces, tiny, AttackConfig(steps=3), progress=rec)
    assert rec.advanced == 3 and rec.tasks[0][1] == 3


def test_config_validation_and_epsilon_parsing():
    assert parse_epsilon("8/255") == pytest.approx(8 / 255)
    assert parse_epsilon("8") == pytest.approx(8 / 255)
    assert parse_epsilon(0.03) == pytest.approx(0.03)
    for bad in ("abc", "-1", 0):
        with pytest.raises(ConfigError):
            parse_epsilon(bad)
    with pytest.raises(ConfigError, match="unknown attack method"):
        AttackConfig(method="cw").resolved()
    with pytest.raises(ConfigError):
        AttackConfig(region="torso").resolved()
    with pytest.raises(ConfigError):
        AttackConfig(diversity_prob=2).resolved()
    c = AttackConfig(method="tidim", steps=10).resolved()
    assert c.momentum == 1.0 and c.ti_kernel > 0 and c.diversity_prob > 0
    assert c.step_size == pytest.approx(2.5 * EPS / 10)
    assert AttackConfig(steps=1).resolved().step_size == pytest.approx(EPS)  # FGSM
    p = AttackConfig(method="pgd", momentum=0.5).resolved()
    assert p.momentum == 0.5 and p.ti_kernel == 0


def test_quantize_within_rounds_then_reclips():
    x = torch.tensor([10.0, 10.0, 250.0, 3.0, 128.0]) / 255
    adv = torch.tensor([18.6, 1.0, 258.0, 3.4, 130.0]) / 255
    q = quantize_within(x, adv, torch.tensor([8.0, 8.0, 8.0, 8.0, 0.5]) / 255)
    assert torch.allclose(q * 255, torch.tensor([18.0, 2.0, 255.0, 3.0, 128.0]), atol=1e-4)
    q16 = quantize_within(x, adv, 8 / 255, levels=65535)
    assert float((q16 - x).abs().max()) <= 8 / 255 + 1e-7
    assert torch.allclose(q16 * 65535, (q16 * 65535).round(), atol=1e-2)


def test_diversity_and_translation_invariance_helpers():
    x = torch.rand(3, 120, 100)
    lm = torch.tensor([[[30.0, 40], [70, 40], [50, 60], [35, 80], [65, 80]]])
    g = torch.Generator().manual_seed(0)
    x2, lm2 = diversify(x, lm, torch.tensor([60.0]), scale=0.1, shift=0.05, rotate=5, generator=g)
    assert x2.shape[0] == 3 and 108 <= x2.shape[1] <= 120 and 90 <= x2.shape[2] <= 100
    assert 0 < float((lm2 - lm).abs().max()) < 20
    x3, lm3 = diversify(x, lm, torch.tensor([60.0]), scale=0.0, shift=0.0, rotate=0.0, generator=g)
    assert torch.allclose(x3, x) and torch.allclose(lm3, lm, atol=1e-4)
    imp = torch.zeros(3, 31, 31)
    imp[:, 15, 15] = 1.0
    sm = ti_smooth(imp, 7)
    assert float(sm.sum()) == pytest.approx(3.0, rel=1e-4) and float(sm.max()) < 0.2
    assert scaled_kernel(9, 100) == 9 and scaled_kernel(9, 300) == 27 and scaled_kernel(9, 20) == 0


def test_reference_from_image_uses_the_largest_face_and_fails_clearly(tiny, mtcnn, group):
    rgb, x, faces = group
    ref = reference_from_image(tiny, rgb, mtcnn)
    big = max(faces, key=lambda f: f.width * f.height)
    want = tiny.reference(x, landmarks_tensor([big]))
    for n in tiny.names:
        assert ref[n].shape == (1, 32) and torch.allclose(ref[n], want[n], atol=1e-5)
    small = load_rgb("obama.jpg")
    both = reference_from_images(tiny, [small, small], mtcnn)
    assert both["tiny-a"].shape == (2, 32)
    blank = np.full((120, 160, 3), 128, np.uint8)
    with pytest.raises(NoFaceError):
        reference_from_image(tiny, blank, mtcnn)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_gpu(obama):
    _, x, faces = obama
    ens = SurrogateEnsemble([], models=[_tiny("tiny-a", "arcface-112", 56, 1).cuda()])
    res = attack_faces(x.cuda(), faces, ens, AttackConfig(method="tidim", steps=2))
    assert res.image.is_cuda and float((res.image - x.cuda()).abs().max()) <= EPS + 1e-6


# ----------------------------------------------------------------------------- real surrogates
@pytest.fixture(scope="module")
def real_ensemble():
    return SurrogateEnsemble(["dlib-resnet", "facenet-casia"])


@pytest.mark.realmodels
def test_dodging_lowers_similarity_for_both_surrogates_and_transfer_readout(real_ensemble, obama):
    from facepriv.models import create_model

    rgb, x, faces = obama
    res = attack_faces(x, faces, real_ensemble, AttackConfig(method="pgd", steps=4))
    row = res.per_face[0]
    print("dodging source cosine after 4 PGD steps:", row["source_cosine"])
    # dlib's embeddings are compressed in cosine (different people score ~0.8): its own
    # euclidean metric shows the move better
    assert row["source_cosine"]["dlib-resnet"] < 0.95 and row["source_cosine"]["facenet-casia"] < 0.6
    assert row["similarity"]["dlib-resnet"]["after"] < -0.5  # distance to the clean face > 0.5
    # transfer read-out on SFace, never used for the optimisation: printed, not asserted
    sface = create_model("sface")
    lm = landmarks_tensor(faces)
    with torch.no_grad():
        a, b = embed_faces(sface, x, lm), embed_faces(sface, res.image, lm)
    cos = float(torch.nn.functional.cosine_similarity(a, b))
    print(f"transfer to sface (not optimised against): cos(clean, protected) = {cos:.3f} (threshold 0.363)")
    assert -1.0 <= cos <= 1.0


@pytest.mark.realmodels
def test_impersonation_raises_similarity_to_the_target(real_ensemble, obama, mtcnn):
    rgb, x, faces = obama
    target = reference_from_image(real_ensemble, load_rgb("biden.jpg"), mtcnn)
    res = attack_faces(x, faces, real_ensemble, AttackConfig(method="mifgsm", steps=4), target_ref=target)
    row = res.per_face[0]
    print("impersonation target cosine:", row["target_cosine"])
    for name, c in row["target_cosine"].items():
        assert c["after"] > c["before"] + 0.15, (name, c)


@pytest.mark.realmodels
def test_early_stop_with_a_real_threshold(obama):
    _, x, faces = obama
    ens = SurrogateEnsemble(["dlib-resnet"])  # spec threshold: distance 0.6
    res = attack_faces(x, faces, ens, AttackConfig(method="mifgsm", steps=25, early_stop=True))
    row = res.per_face[0]
    assert row["early_stopped"] and row["steps"] < 25
    assert row["similarity"]["dlib-resnet"]["after"] < -0.6 - 0.05 + 1e-6
