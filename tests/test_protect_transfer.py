"""``protect --method transfer``: each technique changes what it should, the budget and the
quality floor hold in saved files, escalation stops where it should, the judge is never a
surrogate, per-person mode shares one pattern; tiny models for mechanics, real ones for transfer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fixture_path, load_rgb
from torch import nn

from facepriv.attacks import SurrogateEnsemble
from facepriv.attacks.budget import masked_psnr, project_psnr, texture_weights
from facepriv.attacks.crop import face_crop
from facepriv.attacks.eot import EOTConfig, degrade, feature_dropout, random_views
from facepriv.attacks.transfer import (
    TransferConfig,
    embed_views,
    person_pattern,
    transfer_attack,
    transfer_loss,
)
from facepriv.core.errors import ConfigError
from facepriv.core.io import load_image
from facepriv.core.regions import region_mask
from facepriv.models import ModelSpec
from facepriv.models.recognition import FaceRecognizer
from facepriv.protect import ProtectConfig, run_protect
from facepriv.protect import transfer as ptransfer
from facepriv.protect.pipeline import resolve_method
from facepriv.protect.transfer import TransferOptions

NAMES = ("dlib-resnet", "facenet-casia", "sface")
FAST = {"steps": 3, "level_steps": 2, "copies": 1, "person_steps": 2, "refine_steps": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def _tiny(name: str, seed: int, template: str = "arcface-112", size: int = 48, threshold: float = 0.5):
    torch.manual_seed(seed)
    spec = ModelSpec(name=name, task="recognition", architecture="tiny cnn", description="test", license="MIT",
                     sources=(), loader=lambda ctx: None, input_size=(size, size), template=template,
                     metric="cosine", thresholds={"1e-2": threshold})
    net = nn.Sequential(nn.Conv2d(3, 8, 5, 2, 2), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 32))
    return FaceRecognizer(spec, net, lambda x: x * 2 - 1).eval().requires_grad_(False)


class _Constant(nn.Module):
    """A "recogniser" that sees the same identity in every face: it always matches."""

    def __init__(self, name: str, threshold: float):
        super().__init__()
        self.spec = ModelSpec(name=name, task="recognition", architecture="constant", description="test",
                              license="MIT", sources=(), loader=lambda ctx: None, input_size=(32, 32),
                              template="arcface-112", metric="cosine", thresholds={"1e-2": threshold})

    def forward(self, x):
        return torch.ones(x.shape[0], 4)


@pytest.fixture(scope="module")
def tiny_models():
    return {n: _tiny(n, i + 1, ("arcface-112", "facenet-160", "arcface-112")[i], (48, 56, 40)[i])
            for i, n in enumerate(NAMES)}


@pytest.fixture
def tiny_registry(monkeypatch, tiny_models, isolated_home):
    """Protect's transfer editor loads the tiny models under the offline recognisers' names."""
    monkeypatch.setattr(ptransfer, "_load", lambda names, device: {n: tiny_models[n] for n in names})
    return tiny_models


@pytest.fixture(scope="module")
def obama(mtcnn):
    rgb = load_rgb("obama.jpg")
    faces = mtcnn.detect(rgb)
    assert len(faces) == 1
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255, faces


def _ens(models, names):
    return SurrogateEnsemble(list(names), models=[models[n] for n in names])


# ----------------------------------------------------------------------------- techniques
def test_eot_views_change_the_gradient(tiny_models, obama):
    x, faces = obama
    ens = _ens(tiny_models, NAMES[:2])
    crop = face_crop(x, faces, ens, grow=0.2)
    centres = {k: v.detach() for k, v in ens.embed(crop.x, crop.lm).items()}

    def grad(cfg):
        d = torch.full_like(crop.x, 1 / 255).requires_grad_(True)
        views = random_views((crop.x + d).clamp(0, 1), crop.lm, crop.sizes, 2, cfg, torch.Generator().manual_seed(0))
        loss = transfer_loss(embed_views(ens, views), {k: v.repeat(1, 1) for k, v in centres.items()},
                             {k: 0.5 for k in centres}, 0.05).sum()
        return torch.autograd.grad(loss, d)[0]

    plain, eot = grad(None), grad(EOTConfig())
    assert plain.abs().sum() > 0 and eot.abs().sum() > 0
    cos = torch.nn.functional.cosine_similarity(plain.flatten(), eot.flatten(), dim=0)
    assert cos < 0.99  # the views move the gradient, they do not just rescale it


def test_blurred_and_jpeg_copies_are_used_and_differentiable():
    torch.manual_seed(0)
    x = torch.rand(3, 80, 80, requires_grad=True)
    lm = torch.tensor([[[30.0, 35], [50, 35], [40, 45], [32, 58], [48, 58]]])
    cfg = EOTConfig(resize_prob=0.0, blur_prob=1.0, jpeg_prob=1.0, jpeg_quality=(70, 70))
    y, lm2, draw = degrade(x, lm, torch.tensor([250.0]), cfg, torch.Generator().manual_seed(1))
    assert draw["blur"] > 0.5 and draw["jpeg"] == 70 and torch.equal(lm2, lm)
    hf = lambda t: (t[:, 1:, :] - t[:, :-1, :]).abs().mean()  # noqa: E731
    assert hf(y) < 0.6 * hf(x.detach())  # blurred
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.abs().sum() > 0  # gradients go through blur and the JPEG codec


def test_resize_view_moves_the_landmarks_with_the_image():
    x = torch.rand(3, 100, 120)
    lm = torch.tensor([[[40.0, 40], [70, 40], [55, 55], [45, 70], [65, 70]]])
    y, lm2, draw = degrade(x, lm, torch.tensor([60.0]), EOTConfig(resize_prob=1.0, blur_prob=0, jpeg_prob=0),
                           torch.Generator().manual_seed(3))
    r = draw["resize"]
    assert 0.5 <= r < 1.0 and y.shape[-1] == round(120 * r)
    assert torch.allclose(lm2, (lm + 0.5) * torch.tensor([y.shape[-1] / 120, y.shape[-2] / 100]) - 0.5)


def test_feature_dropout_perturbs_the_surrogate_only_inside_the_block(tiny_models):
    m = tiny_models["sface"]
    x = torch.rand(2, 3, 40, 40)
    clean = m(x)
    with feature_dropout([m], 0.3, torch.Generator().manual_seed(0)):
        a, b = m(x), m(x)
    assert not torch.allclose(a, clean) and not torch.allclose(a, b)  # fresh masks per forward
    assert torch.equal(m(x), clean)  # hooks removed


def test_hardest_weighting_puts_the_effort_on_the_model_that_still_matches():
    centres = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[1.0, 0.0]])}
    emb = {"a": torch.tensor([[0.9, 0.1]], requires_grad=True), "b": torch.tensor([[-0.5, 1.0]], requires_grad=True)}
    loss = transfer_loss(emb, centres, {"a": 0.4, "b": 0.4}, hardest=0.05)
    ga, gb = torch.autograd.grad(loss.sum(), [emb["a"], emb["b"]])
    assert ga.norm() > 20 * gb.norm()  # "a" is still above its threshold, "b" is fooled
    plain = transfer_loss(emb, centres, {"a": 0.4, "b": 0.4}, hardest=0.0)
    ga0, gb0 = torch.autograd.grad(plain.sum(), [emb["a"], emb["b"]])
    assert ga0.norm() < 5 * gb0.norm()  # a plain mean spreads it


def test_texture_weights_give_textured_pixels_more_budget():
    x = torch.full((3, 40, 80), 0.5)
    x[:, :, 40:] += (torch.rand(1, 40, 40, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.4
    w = texture_weights(x, torch.ones(1, 40, 80), strength=0.8)
    assert float(w[0, 5:35, 45:75].mean()) > 2 * float(w[0, 5:35, 5:35].mean())
    assert torch.equal(texture_weights(x, torch.ones(1, 40, 80), strength=0.0), torch.ones(1, 40, 80))


def test_psnr_projection_meets_the_floor_per_face():
    delta = torch.full((3, 20, 40), 0.1)
    masks = torch.zeros(2, 1, 20, 40)
    masks[0, :, :, :20], masks[1, :, :, 20:] = 1, 1
    owner = masks[:, 0].argmax(0)
    out = project_psnr(delta, masks, owner, 30.0)
    zero = torch.zeros_like(delta)
    for k in range(2):
        assert masked_psnr(out, zero, masks[k]) >= 30.0 - 1e-6


# ----------------------------------------------------------------------------- escalation and verdicts
def test_escalation_goes_to_the_floor_while_the_judge_still_matches(tiny_models, obama):
    x, faces = obama
    ens = _ens(tiny_models, NAMES[:2])
    judge = SurrogateEnsemble([], models=[_Constant("always", 0.5)])
    cfg = TransferConfig(min_psnr=32, start_psnr=36, psnr_step=2, **FAST)
    res = transfer_attack(x, faces, ens, cfg, checkers=judge)
    row = res.per_face[0]
    assert row["psnr_level"] == 32.0 and row["steps"] == 3 + 2 * 2  # 36 -> 34 -> 32, then stop
    assert row["face_psnr"] >= 32.0
    assert row["similarity"]["always"]["role"] == "held-out" and row["similarity"]["always"]["passed"] is False


def test_escalation_stops_at_the_first_level_once_the_judge_is_fooled(tiny_models, obama):
    x, faces = obama
    judge = SurrogateEnsemble([], models=[_Constant("never", 2.0)])  # a threshold no cosine reaches
    res = transfer_attack(x, faces, _ens(tiny_models, NAMES[:2]), TransferConfig(**FAST), checkers=judge)
    row = res.per_face[0]
    assert row["psnr_level"] == 36.0 and row["steps"] == 3 and row["face_psnr"] >= 36.0
    assert row["status"] == "attacked" and row["linf"] > 0


def test_linf_cap_and_region_hold(tiny_models, obama):
    x, faces = obama
    cfg = TransferConfig(linf_cap=4 / 255, start_psnr=25, min_psnr=25, **{**FAST, "steps": 4})
    res = transfer_attack(x, faces, _ens(tiny_models, NAMES), cfg)
    d = (res.image - x).abs()
    assert float(d.max()) <= 4 / 255 + 1e-6
    r = region_mask(faces[0], tuple(x.shape[-2:]), region="face", feather=cfg.feather)
    outside = torch.ones(1, *x.shape[-2:], dtype=torch.bool)
    outside[:, r.y0:r.y1, r.x0:r.x1] = r.mask <= 0
    assert float(d[outside.expand_as(d)].max()) == 0.0


def test_loo_rotation_never_lets_a_judge_optimise():
    rot = TransferOptions().roles()
    assert sorted(j[0] for _s, j in rot) == sorted(NAMES)
    assert all(j[0] not in s and len(s) == 2 for s, j in rot)
    assert TransferOptions(verify_with="none").roles() == [(list(NAMES), [])]
    assert TransferOptions(verify_with="arcface-r100").roles() == [(list(NAMES), ["arcface-r100"])]
    with pytest.raises(ConfigError, match="never a surrogate"):
        TransferOptions(verify_with="sface", surrogates=["sface", "dlib-resnet"]).roles()


def test_auto_picks_transfer_without_cuda_and_map_when_map_options_are_given():
    cpu = torch.device("cpu")
    assert resolve_method(ProtectConfig(), cpu)[0] == "transfer"
    assert "no CUDA" in resolve_method(ProtectConfig(), cpu)[1]
    assert resolve_method(ProtectConfig(map={"expression": "happy"}), cpu)[0] == "map"
    assert resolve_method(ProtectConfig(method="pgd"), cpu)[0] == "pgd"


def test_auto_on_cuda_picks_map_only_when_the_score_network_is_on_this_machine(isolated_home, tmp_path, monkeypatch):
    from facepriv.protect import pipeline

    cuda = torch.device("cuda")  # resolve_method reads the device type only: no GPU needed
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    method, why = resolve_method(ProtectConfig(), cuda)
    assert method == "transfer" and "not on this machine" in why and "facepriv models fetch" in why
    monkeypatch.setattr(pipeline, "DEFAULT_SCORE_MODEL", str(tmp_path))  # a local folder
    assert resolve_method(ProtectConfig(), cuda)[0] == "map"
    monkeypatch.setattr(pipeline, "DEFAULT_SCORE_MODEL", "./no/such/folder")
    assert resolve_method(ProtectConfig(), cuda)[0] == "transfer"


# ----------------------------------------------------------------------------- the command
def _photos(tmp_path, names=("obama.jpg", "obama2.jpg")):
    src = tmp_path / "in"
    src.mkdir()
    for n in names:
        (src / n).write_bytes(fixture_path(n).read_bytes())
    return src


def _face_psnr(original, saved, face, cfg=TransferConfig()):
    x, y = load_image(original).to_tensor(), load_image(saved).to_tensor()
    r = region_mask(face, tuple(x.shape[-2:]), region=cfg.region, feather=cfg.feather)
    m = torch.zeros(1, *x.shape[-2:])
    m[:, r.y0:r.y1, r.x0:r.x1] = r.mask
    return masked_psnr(y, x, m)


@pytest.mark.parametrize("fmt", [".png", ".jpg"])
def test_quality_floor_holds_in_saved_files(tmp_path, tiny_registry, mtcnn, fmt):
    src = _photos(tmp_path, ("obama.jpg",))
    cfg = ProtectConfig(transfer={"attack": {**FAST, "start_psnr": 30.0, "min_psnr": 30.0}})
    s = run_protect([src], tmp_path / "out", cfg, output_suffix=fmt, progress=False)
    assert s.exit_code == 0
    row = json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[0])
    face = mtcnn.detect(load_image(src / "obama.jpg").rgb)[0]
    measured = _face_psnr(src / "obama.jpg", tmp_path / "out" / f"obama{fmt}", face)
    assert measured >= 30.0
    a = row["attack"][0]
    assert a["verified_on"] == "saved file" and abs(a["face_psnr"] - measured) < 0.05


def test_manifest_has_a_held_out_verdict_per_face(tmp_path, tiny_registry):
    src = _photos(tmp_path)
    s = run_protect([src], tmp_path / "out", ProtectConfig(transfer={"attack": FAST}), output_suffix=".png",
                    progress=False)
    assert s.details["method"] == "transfer" and "no CUDA" in s.details["chosen_because"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    for r in rows:
        a = r["attack"][0]
        (judge,) = a["held_out"]
        assert judge not in a["surrogates"] and set(a["passed"]) == set(NAMES)
        assert a["similarity"][judge]["role"] == "held-out"
        assert all(isinstance(v, bool) for v in a["passed"].values())


def test_person_mode_shares_one_pattern_per_person(tmp_path, tiny_registry, monkeypatch):
    src = _photos(tmp_path, ("obama.jpg", "obama2.jpg", "obama3.jpg"))
    calls = []
    real = person_pattern

    def counting(samples, ensemble, cfg=None, **kw):
        calls.append(len(samples))
        return real(samples, ensemble, cfg, **kw)

    monkeypatch.setattr("facepriv.attacks.transfer.person_pattern", counting)
    cfg = ProtectConfig(transfer={"person": str(src), "attack": FAST})
    s = run_protect([src], tmp_path / "out", cfg, output_suffix=".png", progress=False)
    assert s.exit_code == 0 and calls == [3]  # one pattern for the person's three photos
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert {tuple(r["attack"][0]["held_out"]) for r in rows} == {tuple(rows[0]["attack"][0]["held_out"])}
    for r in rows:  # refined from the pattern: refine_steps at the first level, compared with the other photos
        a = r["attack"][0]
        assert a["steps"] in (1, 1 + 2, 1 + 2 * 2) and "person_similarity" in a


def test_pattern_warm_start_is_the_rendered_pattern(tiny_models, obama):
    x, faces = obama
    ens = _ens(tiny_models, NAMES[:2])
    cfg = TransferConfig(**FAST)
    pat = person_pattern([(x, faces[0])], ens, cfg)
    assert pat.delta.abs().max() > 0
    crop = face_crop(x, faces, ens)
    rendered = pat.render(crop)
    assert rendered.abs().sum() > 0 and float((rendered.abs() * (crop.union <= 0)).max()) == 0.0


def test_bad_inputs_keep_their_handling(tmp_path, tiny_registry, edge_cases):
    s = run_protect([tmp_path / "edge"], tmp_path / "out", ProtectConfig(transfer={"attack": FAST}),
                    progress=False)
    rows = {json.loads(line)["input"].rsplit("/", 1)[-1]: json.loads(line)
            for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()}
    assert s.failed >= 1  # the corrupt / truncated files
    for name, r in rows.items():
        if r["status"] == "ok":
            out = load_image(r["output"])
            src = load_image(r["input"])
            assert out.size == src.size and out.bit_depth == src.bit_depth, name


# ----------------------------------------------------------------------------- real models
@pytest.mark.realmodels
def test_transfer_moves_a_held_out_real_recogniser(obama):
    x, faces = obama
    ens = SurrogateEnsemble(["dlib-resnet", "facenet-casia"])
    judge = SurrogateEnsemble(["sface"])
    cfg = TransferConfig(start_psnr=32, steps=16, copies=2)
    res = transfer_attack(x, faces, ens, cfg, checkers=judge)
    row = res.per_face[0]
    sface = row["similarity"]["sface"]
    assert row["face_psnr"] >= 32.0 and row["steps"] == 16
    # self-comparison (the protected face against its own original) is the hardest protocol:
    # the unseen SFace still moves by a quarter of its range (0.67 measured)
    assert sface["role"] == "held-out" and sface["after"] < sface["before"] - 0.25
    assert row["similarity"]["facenet-casia"]["passed"] and row["similarity"]["dlib-resnet"]["passed"]


def test_map_without_its_network_names_the_offline_method(tmp_path, isolated_home, monkeypatch):
    monkeypatch.setenv("FACEPRIV_OFFLINE", "1")
    src = _photos(tmp_path, ("obama.jpg",))
    with pytest.raises(ConfigError, match="--method transfer"):
        run_protect([src], tmp_path / "out", ProtectConfig(method="map"), progress=False)
