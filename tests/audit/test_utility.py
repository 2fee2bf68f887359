"""Utility: is the face still detected (a real detector, also on pre-aligned crops padded for
it), and is the expression kept (per face, with the total-variation distance of the
predicted distributions)?
"""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from conftest import fixture_path
from PIL import Image
from torch import nn

from facepriv.audit import run_audit
from facepriv.audit.utility import pad_for_detection

from .helpers import CalibratedMeanColour, MeanColour, audit_cfg, solid


def test_pad_for_detection_puts_the_crop_in_the_middle_half():
    crop = np.full((40, 60, 3), 200, dtype=np.uint8)
    out = pad_for_detection(crop)
    assert out.shape == (80, 120, 3)
    assert (out[20:60, 30:90] == 200).all() and (out[:20] == 127).all() and (out[:, :30] == 127).all()


class ColourExpression(nn.Module):
    """A fake expression classifier: logits = 20 x the centre's mean colour, labels red/green/blue,
    so the top "expression" of a solid crop is its dominant channel and the probabilities are known."""

    labels = ("red", "green", "blue")

    def __init__(self):
        super().__init__()
        self.spec = MeanColour(name="colour-expression").spec

    def forward(self, x):
        return 20.0 * x[:, :, 28:84, 28:84].mean((2, 3))


def _colour_probs(rgb) -> torch.Tensor:
    return (20.0 * torch.tensor(rgb, dtype=torch.float64) / 255.0).softmax(-1)


def test_utility_reports_expression_kept_and_changed(tmp_path):
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    cases = {"kept": ((220, 40, 40), (200, 60, 50)),       # still red-dominant
             "changed": ((220, 40, 40), (40, 220, 40)),    # red -> green
             "same": ((30, 40, 210), (30, 40, 210))}       # untouched
    for n, (o, p) in cases.items():
        solid(orig / f"{n}.png", o)
        solid(prot / f"{n}.png", p)
    rep = run_audit(audit_cfg(prot, orig, aligned=True, utility=True), recognizers={"mean-colour": MeanColour()},
                    expression_model=ColourExpression())
    rows = {r["protected"][:-4]: r for r in rep["images"]}
    tvs = {}
    for n, (o, p) in cases.items():
        u = rows[n]["utility"]
        # solid crops hold no face a real detector can find: "still detected" has nothing to judge
        assert u["faces"] == 1 and u["face_in_original"] is False and u["faces_detected_after"] is None
        assert len(u["expression"]) == 1 and u["expression"][0]["face"] == 0
        e = u["expression"][0]
        po, pp = _colour_probs(o), _colour_probs(p)
        assert e["expression_before"] == ColourExpression.labels[int(po.argmax())]
        assert e["expression_after"] == ColourExpression.labels[int(pp.argmax())]
        assert e["expression_kept"] is (n != "changed")
        tvs[n] = float(0.5 * (po - pp).abs().sum())
        assert e["expression_tv"] == pytest.approx(tvs[n], abs=1e-4)
    assert rows["changed"]["utility"]["expression"][0]["expression_after"] == "green"
    assert tvs["same"] == 0.0 and tvs["changed"] > 0.9 and 0 < tvs["kept"] < tvs["changed"]
    u = rep["utility"]
    assert u["n_faces"] == 3 and u["face_detected_rate"] is None and u["faces_left_out"] == 3
    assert any("found no face in 3 original crop(s)" in n for n in rep["protocol_notes"])
    assert u["expression_kept_rate"] == pytest.approx(2 / 3)
    assert u["expression_tv_mean"] == pytest.approx(sum(tvs.values()) / 3, abs=1e-4)


@pytest.mark.realmodels
def test_utility_with_the_real_expression_model_keeps_every_face_of_an_unchanged_photo(tmp_path, mtcnn):
    """expr-fer7 on group.jpg (6 faces) against an identical copy: every expression kept, TV 0;
    against a copy whose faces are blacked out: no face left, no expression compared."""
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    orig.mkdir()
    prot.mkdir()
    shutil.copy(fixture_path("group.jpg"), orig / "group.jpg")
    Image.open(fixture_path("group.jpg")).save(prot / "group.png")
    rep = run_audit(audit_cfg(prot, orig, utility=True), recognizers={"mean-colour": MeanColour()}, detector=mtcnn)
    u = rep["utility"]
    assert u["model"] == "expr-fer7" and u["n_faces"] == 6 and u["face_detected_rate"] == 1.0
    assert u["expression_kept_rate"] == 1.0 and u["expression_tv_mean"] == pytest.approx(0.0, abs=1e-6)
    ex = rep["images"][0]["utility"]["expression"]
    assert len(ex) == 6 and all(e["expression_before"] == e["expression_after"] for e in ex)
    # a protected photo without faces: nothing detected, nothing to compare
    Image.new("RGB", Image.open(orig / "group.jpg").size, (128, 128, 128)).save(prot / "group.png")
    rep = run_audit(audit_cfg(prot, orig, utility=True), recognizers={"mean-colour": MeanColour()}, detector=mtcnn)
    u = rep["utility"]
    assert u["face_detected_rate"] == 0.0 and u["n_faces"] == 0 and u["expression_kept_rate"] is None
    assert rep["images"][0]["utility"] == {"faces_detected_after": 0, "faces": 6, "expression": []}


@pytest.mark.realmodels
def test_utility_rows_keep_face_indices_when_face_0_is_gone(tmp_path, mtcnn):
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    orig.mkdir()
    prot.mkdir()
    shutil.copy(fixture_path("group.jpg"), orig / "group.jpg")
    img = np.asarray(Image.open(fixture_path("group.jpg")).convert("RGB")).copy()
    faces = sorted(mtcnn.detect(img), key=lambda f: f.width * f.height, reverse=True)
    x0, y0, x1, y1 = (int(v) for v in faces[0].box[:4])
    img[max(0, y0 - 10): y1 + 10, max(0, x0 - 10): x1 + 10] = 128  # the largest face (face 0) is gone
    Image.fromarray(img).save(prot / "group.png")
    rep = run_audit(audit_cfg(prot, orig, utility=True, out=tmp_path / "rep"), recognizers={"mean-colour": CalibratedMeanColour()},
                    detector=mtcnn)
    ex = rep["images"][0]["utility"]["expression"]
    assert len(ex) == len(faces) - 1 and sorted(e["face"] for e in ex) == list(range(1, len(faces)))
    with open(tmp_path / "rep" / "report.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["expression_kept"] == "" and row["expression_tv"] == ""
    amp = rep["versions"]["expression_model"]["amp"]
    assert rep["versions"]["expression_model"]["name"] == "expr-fer7" and amp == rep["models"]["mean-colour"]["amp"]
    assert rep["versions"]["expression_model"]["sha256"]  # the registry pins the weights


# ------------------------------------------------------------------------------ pre-aligned crops
def _aligned_crop(detector, name: str, size: int = 112) -> np.ndarray:
    from facepriv.core.align import align_faces
    from facepriv.core.io import load_image

    img = load_image(fixture_path(name))
    face = max(detector.detect(img.rgb), key=lambda f: f.width * f.height)
    x = torch.from_numpy(img.rgb).permute(2, 0, 1).float() / 255
    crop = align_faces(x, torch.from_numpy(face.landmarks[None].astype(np.float32)), "arcface-112",
                       size=(size, size)).crops[0]
    return (crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.mark.realmodels
def test_aligned_utility_runs_a_real_detector_on_both_crops(tmp_path, mtcnn):
    """Aligned crops: an untouched face is still detected, a uniform grey protected crop is not
    (it used to count as detected), and a crop whose original has no face is left out (noted)."""
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    orig.mkdir()
    prot.mkdir()
    for name in ("obama.jpg", "biden.jpg"):
        Image.fromarray(_aligned_crop(mtcnn, name)).save(orig / name.replace(".jpg", ".png"))
    shutil.copy(orig / "obama.png", prot / "obama.png")
    solid(prot / "biden.png", (128, 128, 128))
    solid(orig / "wall.png", (90, 140, 60))
    solid(prot / "wall.png", (90, 140, 60))
    rep = run_audit(audit_cfg(prot, orig, aligned=True, utility=True), recognizers={"mean-colour": CalibratedMeanColour()},
                    detector=mtcnn, expression_model=ColourExpression())
    rows = {r["protected"]: r["utility"] for r in rep["images"]}
    assert rows["obama.png"]["face_in_original"] is True and rows["obama.png"]["faces_detected_after"] == 1
    assert rows["biden.png"]["face_in_original"] is True and rows["biden.png"]["faces_detected_after"] == 0
    assert rows["wall.png"]["face_in_original"] is False and rows["wall.png"]["faces_detected_after"] is None
    # no expression verdict for a crop in which no face is left (it used to count as "kept")
    assert rows["biden.png"]["expression"] == [] and "no face" in rows["biden.png"]["expression_skipped"]
    assert len(rows["obama.png"]["expression"]) == 1
    u = rep["utility"]
    assert u["face_detected_rate"] == 0.5 and u["faces_judged"] == 2 and u["faces_left_out"] == 1
    assert u["face_detection"] == "mtcnn on padded crops"
    assert any("found no face in 1 original crop(s)" in n for n in rep["protocol_notes"])
    det = rep["versions"]["detector_model"]
    assert rep["versions"]["detector"] == "mtcnn" and det["role"].startswith("utility")
    # every face left out: the rate is null, never 100 %
    rep = run_audit(audit_cfg(prot, orig, aligned=True, utility=True, glob="wall*"),
                    recognizers={"mean-colour": CalibratedMeanColour()}, detector=mtcnn, expression_model=ColourExpression())
    assert rep["utility"]["face_detected_rate"] is None and rep["utility"]["faces_left_out"] == 1


def test_aligned_utility_without_a_detector_still_audits(tmp_path, monkeypatch):
    import facepriv.models as models

    def missing(*a, **k):
        raise RuntimeError("mtcnn weights not on this machine")

    monkeypatch.setattr(models, "create_model", missing)
    solid(tmp_path / "o" / "a.png", (200, 30, 30))
    solid(tmp_path / "p" / "a.png", (190, 40, 30))
    rep = run_audit(audit_cfg(tmp_path / "p", tmp_path / "o", aligned=True, utility=True),
                    recognizers={"mean-colour": CalibratedMeanColour()}, expression_model=ColourExpression())
    u = rep["utility"]
    assert u["face_detected_rate"] is None and "weights not on this machine" in u["unavailable"]["face_detection"]
    assert rep["models"]["mean-colour"]["dodging"]["n"] == 1  # the rest of the audit ran
    (row,) = rep["images"]
    assert row["utility"]["faces_detected_after"] is None and "weights" in row["utility"]["detection_error"]


def test_aligned_audit_without_utility_loads_no_detector(tmp_path, monkeypatch):
    import facepriv.models as models

    def boom(*a, **k):
        raise AssertionError("no detector should be loaded")

    monkeypatch.setattr(models, "create_model", boom)
    solid(tmp_path / "o" / "a.png", (200, 30, 30))
    solid(tmp_path / "p" / "a.png", (190, 40, 30))
    rep = run_audit(audit_cfg(tmp_path / "p", tmp_path / "o", aligned=True), recognizers={"mean-colour": CalibratedMeanColour()})
    assert rep["versions"]["detector"] is None and "detector_model" not in rep["versions"]
