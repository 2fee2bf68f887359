"""Faces an L-inf attack leaves untouched: the dodging start at the clean photo (a stationary
point of the objective), faces reported as failed (no pixel changed, no surrogate moved), and
those failures turning the photo into a failed item for deid adversarial and the batch runner.

All synthetic: tiny surrogates, a synthetic photo and a fixed face; no model files needed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import facepriv.deid.adversarial  # noqa: F401 - registers the method
from facepriv.attacks import AttackConfig, SurrogateEnsemble, attack_faces
from facepriv.core.batch import InputItem, run_batch
from facepriv.core.errors import ProtectionFailed
from facepriv.core.faces import Face, FaceDetector, FacePolicy
from facepriv.core.photo import SaveOptions, process_photo
from facepriv.deid import DeidConfig, create_method, run_deid
from facepriv.models import ModelSpec
from facepriv.models.recognition import FaceRecognizer

DIM = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def _spec(name: str) -> ModelSpec:
    return ModelSpec(name=name, task="recognition", architecture="test", description="test", license="MIT",
                     sources=(), loader=lambda ctx: None, input_size=(32, 32), template="arcface-112",
                     metric="cosine", thresholds={"1e-2": 0.5})


class _ExactAtClean(nn.Module):
    """Embedding ``e1 + W (crop - clean crop)``: exactly the unit vector e1 on the clean photo, so
    cos(e, e_clean) has an exactly zero gradient there, while the model itself is far from flat."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.register_buffer("w", torch.randn(3 * 32 * 32, DIM, generator=g) * 0.05)
        self.clean: torch.Tensor | None = None

    def forward(self, x):
        if self.clean is None:  # attack_faces embeds the clean photo first
            self.clean = x.detach().clone()
        e1 = torch.zeros(x.shape[0], DIM, device=x.device)
        e1[:, 0] = 1.0
        return e1 + (x - self.clean).flatten(1) @ self.w


class _Constant(nn.Module):
    """An embedding no pixel changes (zero gradient everywhere)."""

    def forward(self, x):
        return torch.ones(x.shape[0], DIM, device=x.device) + 0.0 * x.flatten(1).sum(1, keepdim=True)


def _ensemble(net: nn.Module, name: str = "toy") -> SurrogateEnsemble:
    return SurrogateEnsemble([], models=[FaceRecognizer(_spec(name), net, lambda x: x).eval().requires_grad_(False)])


def _photo() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=(128, 128), mode="bilinear",
                                        align_corners=False)[0]
    return (x * 0.6 + 0.2).mul(255).round().div(255)  # on the 8-bit grid, away from 0 and 1


def _face() -> Face:
    lm = np.array([[52, 58], [76, 58], [64, 72], [55, 86], [73, 86]], np.float32)
    return Face(box=np.array([36, 36, 92, 104], np.float32), landmarks=lm, score=1.0)


# ----------------------------------------------------------------------------- root cause
@pytest.mark.parametrize("method", ["pgd", "mifgsm"])
def test_dodging_from_the_clean_photo_moves_a_face_whose_start_gradient_is_exactly_zero(method):
    ens = _ensemble(_ExactAtClean())
    x = _photo()
    res = attack_faces(x, [_face()], ens, AttackConfig(method=method, steps=3, random_start=False, seed=0))
    row = res.per_face[0]
    assert res.linf > 0 and row["linf"] > 0  # before: sign(0) = 0 at every step, nothing moved
    assert row["status"] == "attacked"
    assert row["similarity"]["toy"]["after"] < row["similarity"]["toy"]["before"] - 0.01


def test_dodging_start_is_seeded_and_the_perturbation_still_starts_at_zero():
    x = _photo()
    cfg = AttackConfig(steps=1, random_start=False, seed=5)
    a = attack_faces(x, [_face()], _ensemble(_ExactAtClean()), cfg)
    b = attack_faces(x, [_face()], _ensemble(_ExactAtClean()), cfg)
    assert torch.equal(a.image, b.image)
    # one step of size step_size from zero: no pixel moves by more than one step (+ rounding)
    step = cfg.resolved().step_size
    assert a.linf <= step + 0.5 / 255 + 1e-6


# ----------------------------------------------------------------------------- failed faces
def test_a_face_no_pixel_of_which_changed_is_reported_failed():
    res = attack_faces(_photo(), [_face()], _ensemble(_Constant()), AttackConfig(steps=2, random_start=False))
    row = res.per_face[0]
    assert res.linf == 0
    assert row["status"] == "failed" and row["reason"] == "the attack changed no pixel"


def test_a_face_whose_pixels_changed_but_no_surrogate_moved_is_reported_failed():
    res = attack_faces(_photo(), [_face()], _ensemble(_Constant()), AttackConfig(steps=2, random_start=True))
    row = res.per_face[0]
    assert row["linf"] > 0  # the random start changed pixels
    assert row["status"] == "failed" and row["reason"] == "no surrogate moved"


def test_a_face_that_moved_a_surrogate_stays_attacked():
    res = attack_faces(_photo(), [_face()], _ensemble(_ExactAtClean()), AttackConfig(steps=2, random_start=True))
    assert res.per_face[0]["status"] == "attacked" and "reason" not in res.per_face[0]


def test_protection_failed_check_names_every_unprotected_face():
    rows = [{"face": 0, "status": "attacked"}, {"face": 1, "status": "failed", "reason": "no surrogate moved"},
            {"face": 2, "status": "skipped", "reason": "region outside the image"}]
    with pytest.raises(ProtectionFailed, match=r"2 of 3 face\(s\) unprotected: face 1 \(no surrogate moved\), "
                                               r"face 2 \(region outside the image\)") as info:
        ProtectionFailed.check(rows, "pgd")
    assert [r["face"] for r in info.value.faces] == [1, 2]
    ProtectionFailed.check(rows[:1])  # all attacked: no error


# ----------------------------------------------------------------------------- deid adversarial, batch
def test_deid_adversarial_raises_for_an_unprotected_face_and_keeps_its_report():
    m = create_method("adversarial", steps=2, ensemble=_ensemble(_Constant()))
    with pytest.raises(ProtectionFailed, match="changed no pixel"):
        m.apply(_photo(), [_face()])
    assert m.last_info["faces"][0]["status"] == "failed"
    assert m.last_info["faces"][0]["reason"] == "the attack changed no pixel"


class _OneFace(FaceDetector):
    name = "fixed"

    def detect(self, image):
        return [_face()]


def _write_photo(folder) -> InputItem:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "p.png"
    Image.fromarray((_photo().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(p)
    return p


def test_process_photo_writes_nothing_and_reports_an_error_when_the_edit_raises_protection_failed(tmp_path):
    path = _write_photo(tmp_path / "in")
    dst = tmp_path / "out" / "p.png"

    def edit(x, faces, _img):
        raise ProtectionFailed("pgd left 1 of 1 face(s) unprotected: face 0 (no surrogate moved)",
                               [{"face": 0, "status": "failed"}])

    res = process_photo(InputItem(path, path.relative_to(tmp_path / "in")), dst, detector=_OneFace(),
                        policy=FacePolicy(), edit=edit, save=SaveOptions())
    assert res.status == "error" and "no surrogate moved" in res.error
    assert res.faces == 1 and res.extra["unprotected"] == [0] and len(res.extra["boxes"]) == 1
    assert not dst.exists()


def test_run_deid_counts_a_photo_with_an_unprotected_face_as_failed(tmp_path):
    _write_photo(tmp_path / "in")
    out = tmp_path / "out"
    cfg = DeidConfig(methods=["adversarial"], options={"adversarial": {"steps": 2, "ensemble": _ensemble(_Constant())}})
    summary = run_deid([tmp_path / "in"], out, cfg, progress=False, detector=_OneFace())
    assert summary.failed == 1 and summary.exit_code == 1 and summary.counts.get("ok", 0) == 0
    assert "changed no pixel" in summary.failures[0][1]
    assert not (out / "p.png").exists()
    row = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert row["status"] == "error"
    assert row["deid"]["adversarial"]["faces"][0]["status"] == "failed"


def test_run_batch_keeps_a_protected_photo_ok(tmp_path):
    path = _write_photo(tmp_path / "in")
    m = create_method("adversarial", steps=2, ensemble=_ensemble(_ExactAtClean()))

    def process(item, dst):
        return process_photo(item, dst, detector=_OneFace(), policy=FacePolicy(), save=SaveOptions(),
                             edit=lambda x, faces, _img: m.apply(x, faces))

    summary = run_batch([InputItem(path, path.relative_to(tmp_path / "in"))], process, out_dir=tmp_path / "out",
                        config={}, progress=False)
    assert summary.counts == {"ok": 1} and m.last_info["faces"][0]["status"] == "attacked"
