"""facepriv audit: the protocol rules the audit must keep (review of issue 5).

* the audit package never imports the protection packages it judges;
* faces of a protected photo saved at another size, and pre-aligned crops of another size,
  are matched to their originals (not counted as "no longer detected", i.e. protected);
* identities never come from a bare file name, except from the explicit identities CSV (noted);
* identities from a pairs file drive the other-photos protocol end to end;
* impersonation is measured against a different photo of the target (or the reuse is noted),
  with PSR values checked against a case whose similarities are known;
* identification ranks against a 7-identity gallery (rank-1 and rank-5 differ), and the utility
  section's expression kept / changed, both checked against values computed in the test;
* Azure accepts the quickstart variable names and never retries a 403 (quota / Limited Access);
* ``--json`` output is strict JSON; calibrations reused under another detector / alignment
  mode are flagged; the HTML says "no threshold" when a model has none.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fixture_path
from PIL import Image
from torch import nn

from facepriv.audit import AuditConfig, run_audit
from facepriv.audit.metrics import match_faces
from facepriv.models.thresholds import FARS, calibration_mismatch, resolve_thresholds, store_calibration
from facepriv.core.errors import ConfigError


@pytest.fixture(autouse=True)
def _private(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRIV_THRESHOLDS_DIR", str(tmp_path / "thresholds"))
    monkeypatch.setenv("FACEPRIV_OFFLINE", "1")


# ------------------------------------------------------------------------------ helpers
class MeanColour(nn.Module):
    """A fake recogniser whose similarities are known in advance: the embedding of a crop is the
    mean RGB of its centre, so two solid-colour crops have the cosine of their colours."""

    def __init__(self, thresholds: dict | None = None, name: str = "mean-colour"):
        super().__init__()
        self.spec = type("S", (), {"template": "arcface-112", "input_size": (112, 112), "metric": "cosine",
                                   "name": name, "thresholds": dict(thresholds or {}), "threshold_source": None,
                                   "architecture": "mean colour", "runtime": "torch"})()

    def forward(self, x):
        return x[:, :, 28:84, 28:84].mean((2, 3))


def _solid(path: Path, rgb, size: int = 112) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), rgb, dtype=np.uint8)).save(path)
    return path


def _cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _cfg(protected, original, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    kw.setdefault("quality", False)
    kw.setdefault("models", ["mean-colour"])
    return AuditConfig(protected=protected, original=original, **kw)


def _thresholds_file(path: Path, model: str, values: dict) -> Path:
    path.write_text(json.dumps({model: values}))
    return path


# ------------------------------------------------------------------------------ architecture rule
def test_audit_modules_never_import_protection_packages():
    code = r"""
import importlib, json, pkgutil, sys
import facepriv.audit as audit
names = [m.name for m in pkgutil.walk_packages(audit.__path__, "facepriv.audit.")]
for n in names:
    importlib.import_module(n)
import facepriv.cli.audit
bad = sorted(m for m in sys.modules
             if m.split(".")[:2] in (["facepriv", "protect"], ["facepriv", "patch"], ["facepriv", "deid"],
                                     ["facepriv", "attacks"]))
print(json.dumps({"imported": names, "forbidden": bad}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    imported = set(out["imported"])
    assert {"facepriv.audit.runner", "facepriv.audit.report", "facepriv.audit.metrics", "facepriv.audit.apis.facepp",
            "facepriv.audit.apis.azure", "facepriv.audit.apis.rekognition", "facepriv.audit.calibrate"} <= imported
    assert out["forbidden"] == []


# ------------------------------------------------------------------------------ face matching across sizes
@pytest.fixture(scope="module")
def sface():
    from facepriv.models import create_model

    return create_model("sface")


@pytest.mark.realmodels
def test_protected_photo_saved_at_half_size_matches_its_faces(tmp_path, sface, mtcnn):
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    orig.mkdir()
    prot.mkdir()
    src = fixture_path("group.jpg")
    shutil.copy(src, orig / "group.jpg")
    im = Image.open(src).convert("RGB")
    im.resize((im.width // 2, im.height // 2), Image.LANCZOS).save(prot / "group.png")

    class Recording:  # the audit's own detections, to show what the old matching rule made of them
        def __init__(self):
            self.faces = {}

        def detect(self, rgb):
            self.faces[rgb.shape[:2]] = mtcnn.detect(rgb)
            return self.faces[rgb.shape[:2]]

    det = Recording()
    rep = run_audit(_cfg(prot, orig, models=["sface"]), recognizers={"sface": sface}, detector=det)
    row = rep["images"][0]
    assert row["faces_original"] == 6 and row["faces_protected"] == 6
    # the boxes are in another pixel frame: without scaling, not one face would match (the bug)
    o_boxes = [f.box for f in det.faces[(im.height, im.width)]]
    p_boxes = [f.box for f in det.faces[(im.height // 2, im.width // 2)]]
    assert len(o_boxes) == len(p_boxes) == 6
    assert match_faces(o_boxes, p_boxes) == [None] * 6
    # ... with scaling every face is matched: an unprotected (only resized) photo is not "protected"
    assert row["faces_matched"] == 6 and row["faces_not_detected"] == 0 and "resized" in row
    d = rep["models"]["sface"]["dodging"]
    assert d["not_detected"] == 0 and rep["faces"]["not_detected"] == 0
    th = rep["thresholds"]["sface"]["1e-3"]
    sims = [f["dodging"][0] for f in row["models"]["sface"]["faces"]]
    assert len(sims) == 6 and min(sims) >= th and d["psr"]["1e-3"] == 0.0
    # --landmarks original: the original's landmarks are scaled into the half-size photo, so the
    # embedding there is that of the same face (close to its own detection)
    rep2 = run_audit(_cfg(prot, orig, models=["sface"], landmarks="original"), recognizers={"sface": sface},
                     detector=mtcnn)
    faces2 = rep2["images"][0]["models"]["sface"]["faces"]
    assert len(faces2) == 6 and all(f["detected"] for f in faces2)
    assert min(f["dodging"][0] for f in faces2) > 0.8
    assert rep2["models"]["sface"]["dodging"]["psr"]["1e-3"] == 0.0


def test_aligned_crops_of_different_sizes_are_paired(tmp_path):
    """--aligned end to end: a 112-px protected crop against its 224-px original is the same face."""
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    photo = Image.open(fixture_path("obama.jpg")).convert("RGB")
    crop = photo.crop((40, 80, 320, 360)).resize((224, 224), Image.LANCZOS)
    other = Image.open(fixture_path("biden.jpg")).convert("RGB").crop((80, 60, 360, 340)).resize((224, 224))
    orig.mkdir()
    prot.mkdir()
    crop.save(orig / "a.png")
    crop.resize((112, 112), Image.LANCZOS).save(prot / "a.png")
    other.save(orig / "b.png")
    other.resize((112, 112), Image.LANCZOS).save(prot / "b.png")
    # the old IoU rule on absolute pixels could not pair them
    assert match_faces([np.array([0, 0, 223, 223])], [np.array([0, 0, 111, 111])]) == [None]
    model = MeanColour()
    th = _thresholds_file(tmp_path / "th.json", "mean-colour", {"1e-1": 0.9, "1e-2": 0.99, "1e-3": 0.999})
    rep = run_audit(_cfg(prot, orig, aligned=True, thresholds=th), recognizers={"mean-colour": model})
    assert rep["config"]["aligned"] is True and rep["versions"]["detector"] is None
    for row in rep["images"]:
        assert row["faces_matched"] == 1 and row["faces_not_detected"] == 0
        sim = row["models"]["mean-colour"]["faces"][0]["dodging"][0]
        # the expected value: cosine of the two crops' centre mean colours, computed here
        o = np.asarray(Image.open(orig / row["original"]), dtype=np.float64)[56:168, 56:168].reshape(-1, 3).mean(0)
        p = np.asarray(Image.open(prot / row["protected"]), dtype=np.float64)[28:84, 28:84].reshape(-1, 3).mean(0)
        assert sim == pytest.approx(_cos(o, p), abs=2e-3) and sim > 0.999
    d = rep["models"]["mean-colour"]["dodging"]
    assert d["not_detected"] == 0 and d["psr"] == {f: 0.0 for f in FARS}


# ------------------------------------------------------------------------------ identities
def test_gallery_file_names_never_assign_identities(tmp_path):
    """Bob's 1.jpg must not be labelled alice because the gallery holds alice/1.jpg."""
    orig, prot, gal = tmp_path / "orig", tmp_path / "prot", tmp_path / "gallery"
    bob = (40, 200, 60)
    _solid(orig / "1.jpg", bob)
    _solid(prot / "1.png", (45, 190, 70))
    _solid(gal / "alice" / "1.jpg", (220, 30, 30))
    _solid(gal / "alice" / "2.jpg", (210, 40, 35))
    _solid(gal / "carol" / "1b.jpg", (30, 30, 220))
    rep = run_audit(_cfg(prot, orig, aligned=True, gallery=gal), recognizers={"mean-colour": MeanColour()})
    row = rep["images"][0]
    assert row["identity"] is None and row["identity_source"] is None
    f0 = row["models"]["mean-colour"]["faces"][0]
    assert f0["protocol"] == "self" and "references" not in row  # never compared with alice's photos
    assert rep["counts"]["identities_known"] == 0
    assert rep["models"]["mean-colour"]["identification"]["n"] == 0
    assert any("self-verification" in n for n in rep["protocol_notes"])


def test_identities_csv_name_fallback_is_noted(tmp_path):
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    _solid(orig / "sub" / "1.jpg", (40, 200, 60))
    _solid(prot / "sub" / "1.png", (40, 200, 60))
    _solid(orig / "2.jpg", (200, 40, 60))
    _solid(prot / "2.png", (200, 40, 60))
    ids = tmp_path / "ids.csv"
    ids.write_text("file,identity\n1.jpg,bob\n2.jpg,carol\n")  # 1.jpg is really sub/1.jpg: name only
    rep = run_audit(_cfg(prot, orig, aligned=True, identities=ids), recognizers={"mean-colour": MeanColour()})
    rows = {r["protected"]: r for r in rep["images"]}
    assert rows["sub/1.png"]["identity"] == "bob" and rows["sub/1.png"]["identity_source"] == "identities (file name)"
    assert rows["2.png"]["identity"] == "carol" and rows["2.png"]["identity_source"] == "identities"
    notes = [n for n in rep["protocol_notes"] if "bare file name" in n]
    assert len(notes) == 1 and notes[0].startswith("1 photo(s)")
    # with the relative path in the CSV there is no fallback and no note
    ids.write_text("file,identity\nsub/1.jpg,bob\n2.jpg,carol\n")
    rep = run_audit(_cfg(prot, orig, aligned=True, identities=ids), recognizers={"mean-colour": MeanColour()})
    assert {r["identity_source"] for r in rep["images"]} == {"identities"}
    assert not any("bare file name" in n for n in rep["protocol_notes"])


def test_identities_from_pairs_file_end_to_end(tmp_path):
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    colours = {"a1": (200, 40, 40), "a2": (190, 60, 50), "b1": (40, 40, 200), "b2": (60, 50, 190)}
    protected = {"a1": (40, 200, 40), "a2": (190, 60, 50), "b1": (45, 45, 195), "b2": (60, 50, 190)}
    for n, c in colours.items():
        _solid(orig / f"{n}.png", c)
        _solid(prot / f"{n}.png", protected[n])
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("file_x,file_y,label\na1.png,a2.png,same\nb1.png,b2.png,same\na1.png,b1.png,different\n")
    th = _thresholds_file(tmp_path / "th.json", "mean-colour", {"1e-1": 0.9, "1e-2": 0.95, "1e-3": 0.99})
    rep = run_audit(_cfg(prot, orig, aligned=True, pairs=pairs, pairs_root=orig, thresholds=th),
                    recognizers={"mean-colour": MeanColour()})
    rows = {r["protected"]: r for r in rep["images"]}
    assert {r["identity_source"] for r in rows.values()} == {"pairs"}
    assert rows["a1.png"]["identity"] == rows["a2.png"]["identity"] != rows["b1.png"]["identity"]
    assert rep["counts"]["identities_known"] == 4
    d = rep["models"]["mean-colour"]["dodging"]
    assert d["protocol"] == {"other-photos": 4, "self": 0}
    expected = {}
    for n, r, f in ((r["protected"][:2], r, r["models"]["mean-colour"]["faces"][0]) for r in rows.values()):
        mate = {"a1": "a2", "a2": "a1", "b1": "b2", "b2": "b1"}[n]
        assert r["references"] == [f"{mate}.png"]  # the other photo of the same person, never itself
        expected[n] = _cos(protected[n], colours[mate])
        assert f["dodging"][0] == pytest.approx(expected[n], abs=1e-4)
        assert f["dodging_before"][0] == pytest.approx(_cos(colours[n], colours[mate]), abs=1e-4)
    # PSR = share of the 4 attempts below each threshold, from the known similarities
    ths = {"1e-1": 0.9, "1e-2": 0.95, "1e-3": 0.99}
    for far, t in ths.items():
        assert d["psr"][far] == pytest.approx(sum(s < t for s in expected.values()) / 4)
    assert d["psr"]["1e-1"] == 0.25  # only a1 (turned green) escapes at the loosest threshold
    assert "roc" in rep["models"]["mean-colour"]  # impostor pairs exist: a ROC is drawn


# ------------------------------------------------------------------------------ impersonation
def test_impersonation_psr_against_another_target_photo(tmp_path):
    orig, prot, target = tmp_path / "orig", tmp_path / "prot", tmp_path / "target"
    t_used, t_other = (230, 26, 26), (204, 77, 26)
    p_colours = {"x": (230, 26, 26), "y": (26, 26, 230)}  # x wears the target's colour exactly, y does not
    for n, c in p_colours.items():
        _solid(orig / f"{n}.png", (30, 200, 30))
        _solid(prot / f"{n}.png", c)
    _solid(target / "used.png", t_used)
    _solid(target / "other.png", t_other)
    ths = {"1e-1": 0.5, "1e-2": 0.8, "1e-3": 0.99}
    th = _thresholds_file(tmp_path / "th.json", "mean-colour", ths)
    model = {"mean-colour": MeanColour()}
    # without --target-used the audit refuses (the usual protocol needs another photo of the target)
    with pytest.raises(ConfigError, match="--target-used"):
        run_audit(_cfg(prot, orig, aligned=True, target=target, thresholds=th), recognizers=model)
    rep = run_audit(_cfg(prot, orig, aligned=True, target=target, target_used=[target / "used.png"], thresholds=th),
                    recognizers=model)
    imp = rep["models"]["mean-colour"]["impersonation"]
    sims = [_cos(c, t_other) for c in p_colours.values()]
    assert rep["counts"]["targets"] == 1 and imp["n"] == 2
    for far, t in ths.items():
        assert imp["psr"][far] == pytest.approx(sum(s >= t for s in sims) / 2)
    assert imp["psr"]["1e-2"] == 0.5 and imp["psr"]["1e-3"] == 0.0  # x is close to, not equal to, the other photo
    before = [_cos((30, 200, 30), t_other)] * 2
    assert imp["before"]["psr"]["1e-1"] == pytest.approx(sum(s >= 0.5 for s in before) / 2)
    assert not any("allow-target-reuse" in n for n in rep["protocol_notes"])
    # opting in to reuse: the photo used to protect counts, PSR rises, and the report says so
    rep2 = run_audit(_cfg(prot, orig, aligned=True, target=target, allow_target_reuse=True, thresholds=th),
                     recognizers=model)
    imp2 = rep2["models"]["mean-colour"]["impersonation"]
    sims2 = [_cos(c, t) for c in p_colours.values() for t in (t_other, t_used)]
    assert imp2["n"] == 4
    assert imp2["psr"]["1e-3"] == pytest.approx(sum(s >= 0.99 for s in sims2) / 4) == 0.25
    assert any("--allow-target-reuse" in n for n in rep2["protocol_notes"])
    assert rep2["config"]["allow_target_reuse"] is True


# ------------------------------------------------------------------------------ identification
def _expected_rank(probe, gallery: dict[str, list], true_id: str) -> int:
    """Rank of ``true_id`` by best cosine per identity, ties counted against it (computed here)."""
    best = {i: max(_cos(probe, c) for c in cols) for i, cols in gallery.items() if cols}
    return 1 + sum(1 for i, s in best.items() if i != true_id and s >= best[true_id])


def test_identification_rank1_and_rank5_differ_on_a_seven_identity_gallery(tmp_path):
    """Seven gallery identities; four probes whose protected colours push the true identity to
    rank 1, 3, 6 and 5: rank-1 after = 1/4, rank-5 after = 3/4, both 1 before."""
    orig, prot, gal = tmp_path / "orig", tmp_path / "prot", tmp_path / "gallery"
    refs = {"A": (230, 20, 20), "B": (20, 230, 20), "C": (20, 20, 230), "D": (200, 200, 20), "E": (20, 200, 200),
            "F": (200, 20, 200), "G": (150, 150, 150)}
    originals = {"A": (220, 30, 25), "B": (30, 220, 25), "C": (25, 30, 220), "D": (210, 190, 30)}
    protected = {"A": (220, 30, 25), "B": (60, 200, 150), "C": (200, 100, 120), "D": (150, 100, 200)}
    for ident, c in refs.items():
        _solid(gal / ident / "ref.png", c)
    for ident, c in originals.items():
        _solid(orig / f"{ident}.png", c)
        _solid(prot / f"{ident}.png", protected[ident])
        # the gallery holds a copy of each original: it gives the identity and is left out of the ranking
        shutil.copy(orig / f"{ident}.png", gal / ident / "same-as-original.png")
    rep = run_audit(_cfg(prot, orig, aligned=True, gallery=gal), recognizers={"mean-colour": MeanColour()})

    def gallery_for(probe: str) -> dict[str, list]:
        # every gallery photo except the copy of this probe's own original (identical to A's protected too)
        return {i: [c] + ([originals[i]] if i in originals and i != probe else []) for i, c in refs.items()}

    expected_after = {i: _expected_rank(protected[i], gallery_for(i), i) for i in originals}
    assert expected_after == {"A": 1, "B": 3, "C": 6, "D": 5}  # the constructed case holds
    rows = {r["protected"][0]: r for r in rep["images"]}
    for ident in originals:
        assert rows[ident]["identity"] == ident and rows[ident]["identity_source"] == "gallery"
        f0 = rows[ident]["models"]["mean-colour"]["faces"][0]
        assert f0["rank_before"] == _expected_rank(originals[ident], gallery_for(ident), ident) == 1
        assert f0["rank_after"] == expected_after[ident]
    ident_summary = rep["models"]["mean-colour"]["identification"]
    assert ident_summary["n"] == 4 and ident_summary["gallery_identities"] == 7
    assert ident_summary["gallery_images"] == 7 + 4
    assert ident_summary["rank1_before"] == 1.0 and ident_summary["rank5_before"] == 1.0
    assert ident_summary["rank1_after"] == sum(r == 1 for r in expected_after.values()) / 4 == 0.25
    assert ident_summary["rank5_after"] == sum(r <= 5 for r in expected_after.values()) / 4 == 0.75


# ------------------------------------------------------------------------------ utility
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
        _solid(orig / f"{n}.png", o)
        _solid(prot / f"{n}.png", p)
    rep = run_audit(_cfg(prot, orig, aligned=True, utility=True), recognizers={"mean-colour": MeanColour()},
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
    rep = run_audit(_cfg(prot, orig, utility=True), recognizers={"mean-colour": MeanColour()}, detector=mtcnn)
    u = rep["utility"]
    assert u["model"] == "expr-fer7" and u["n_faces"] == 6 and u["face_detected_rate"] == 1.0
    assert u["expression_kept_rate"] == 1.0 and u["expression_tv_mean"] == pytest.approx(0.0, abs=1e-6)
    ex = rep["images"][0]["utility"]["expression"]
    assert len(ex) == 6 and all(e["expression_before"] == e["expression_after"] for e in ex)
    # a protected photo without faces: nothing detected, nothing to compare
    Image.new("RGB", Image.open(orig / "group.jpg").size, (128, 128, 128)).save(prot / "group.png")
    rep = run_audit(_cfg(prot, orig, utility=True), recognizers={"mean-colour": MeanColour()}, detector=mtcnn)
    u = rep["utility"]
    assert u["face_detected_rate"] == 0.0 and u["n_faces"] == 0 and u["expression_kept_rate"] is None
    assert rep["images"][0]["utility"] == {"faces_detected_after": 0, "faces": 6, "expression": []}


# ------------------------------------------------------------------------------ online APIs (Azure)
def test_azure_accepts_the_quickstart_variable_names(tmp_path, monkeypatch):
    """AZURE_FACE_KEY / AZURE_FACE_ENDPOINT, or FACE_APIKEY / FACE_ENDPOINT as Azure's Face
    quickstarts name them; ours win when both are set; the key is a registered secret."""
    from facepriv.audit.apis import create_api
    from facepriv.core.secrets import redact_text

    empty = tmp_path / "apis.json"
    empty.write_text("{}")
    for v in ("AZURE_FACE_KEY", "AZURE_FACE_ENDPOINT", "FACE_APIKEY", "FACE_ENDPOINT"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(ConfigError, match="FACE_APIKEY"):
        create_api("azure", config=empty, cache=False)
    monkeypatch.setenv("FACE_APIKEY", "quickstart-key-7f3a")
    monkeypatch.setenv("FACE_ENDPOINT", "https://quickstart.example/")
    az = create_api("azure", config=empty, cache=False)
    assert az.endpoint == "https://quickstart.example" and az._key == "quickstart-key-7f3a"
    assert "quickstart-key-7f3a" not in redact_text("key quickstart-key-7f3a in a message")
    monkeypatch.setenv("AZURE_FACE_KEY", "ours-key-1b2c")
    monkeypatch.setenv("AZURE_FACE_ENDPOINT", "https://ours.example")
    az = create_api("azure", config=empty, cache=False)
    assert az.endpoint == "https://ours.example" and az._key == "ours-key-1b2c"
    # an explicit --api-endpoint still beats both environment names
    assert create_api("azure", config=empty, endpoint="http://127.0.0.1:9", cache=False).endpoint == "http://127.0.0.1:9"


def test_azure_403_is_not_retried_and_stops_the_adapter(monkeypatch):
    """Azure answers 403 for an exhausted quota or a missing Limited Access approval: retrying
    cannot help, so the first 403 stops the adapter; a 429 is retried."""
    from facepriv.audit.apis.azure import AzureFace

    class Resp:
        def __init__(self, status, body):
            self.status_code, self.ok, self.reason, self.headers, self._body = status, status < 400, "x", {}, body

        def json(self):
            return self._body

    class Session:
        """Answers the queued errors first, then like Azure: a face for /detect, a verdict for /verify."""

        def __init__(self, errors):
            self.errors, self.sent = list(errors), 0

        def post(self, url, *a, **kw):
            self.sent += 1
            if self.errors:
                status = self.errors.pop(0)
                return Resp(status, {"error": {"code": str(status), "message": "refused"}})
            if url.endswith("/detect"):
                return Resp(200, [{"faceId": f"id{self.sent}", "faceRectangle": {"width": 9, "height": 9}}])
            return Resp(200, {"isIdentical": True, "confidence": 0.93})

    img = fixture_path("obama.jpg").read_bytes()

    def adapter(errors):
        az = AzureFace("http://127.0.0.1:9", "azure-test-key-9d8e", cache=False, rate=None, retries=4,
                       sleep=lambda s: None)
        az._local.session = Session(errors)
        return az, az._local.session

    az, sess = adapter([403])
    r = az.compare(img, img)
    assert not r.ok and "HTTP 403" in r.error and "quota" in r.error
    assert sess.sent == 1 and az.stats["retries"] == 0
    again = az.compare(img, img)  # the adapter has stopped: nothing more is sent
    assert again.code == "ADAPTER_STOPPED" and sess.sent == 1
    # contrast: 429 and 503 are retried, then the comparison goes through (detect, then verify:
    # the second image is the same bytes, so its faceId is the one just detected)
    az, sess = adapter([429, 503])
    r = az.compare(img, img)
    assert r.ok and r.score == 0.93 and az.stats["retries"] == 2 and sess.sent == 2 + 2
    assert az.stats["face_id_reuses"] == 1


# ------------------------------------------------------------------------------ reports
def test_html_says_no_threshold_and_json_is_strict(tmp_path, capsys):
    orig = tmp_path / "orig"
    _solid(orig / "a.png", (120, 80, 60))
    _solid(orig / "b.png", (60, 80, 120))
    out = tmp_path / "rep"
    rep = run_audit(_cfg(orig, orig, aligned=True, out=out, quality=True, lpips=None, fid=False),
                    recognizers={"mean-colour": MeanColour()})  # no thresholds at all
    assert rep["thresholds"]["mean-colour"]["kind"] == "none"
    html = (out / "report.html").read_text()
    assert html.count("no threshold @1e-3") == 2 and "recognised @1e-3" not in html
    assert html.count("data:image/jpeg;base64,") == 6  # original | protected | difference per image
    # written again from the report alone (library use, no config object): still with thumbnails
    from facepriv.audit import write_reports

    write_reports(rep, tmp_path / "again")
    assert (tmp_path / "again" / "report.html").read_text().count("data:image/jpeg;base64,") == 6
    # identical sets: infinite PSNR, counted, and printed as strict JSON
    assert rep["quality"]["psnr"] == math.inf and rep["quality"]["n_identical"] == 2
    from facepriv.audit import summarize
    from facepriv.audit.report import json_safe
    from facepriv.cli.common import emit_json

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    emit_json(json_safe(summarize(rep)))
    data = strict(capsys.readouterr().out)
    assert data["quality"]["psnr"] == "inf" and data["quality"]["n_identical"] == 2
    emit_json({"a": float("inf"), "b": [float("nan"), -math.inf], "c": 1.5})  # emit_json alone is strict too
    assert strict(capsys.readouterr().out) == {"a": "inf", "b": ["nan", "-inf"], "c": 1.5}


# ------------------------------------------------------------------------------ calibrations
def test_calibration_reused_under_another_mode_is_flagged(tmp_path):
    orig = tmp_path / "orig"
    _solid(orig / "a.png", (120, 80, 60))
    rec = {"model": "mean-colour", "thresholds": {"1e-1": 0.5, "1e-2": 0.6, "1e-3": 0.7},
           "source": "calibrated on p.csv", "detector": "mtcnn", "aligned": False}
    store_calibration("mean-colour", rec)
    rep = run_audit(_cfg(orig, orig, aligned=True), recognizers={"mean-colour": MeanColour()})
    assert rep["thresholds"]["mean-colour"]["kind"] == "calibrated"
    notes = [n for n in rep["protocol_notes"] if "other conditions" in n]
    assert len(notes) == 1 and "whole photos there, pre-aligned crops here" in notes[0]
    ts = resolve_thresholds("mean-colour", spec=MeanColour().spec)
    assert calibration_mismatch(ts, detector="mtcnn", aligned=False) is None
    assert "detector mtcnn there, yunet here" in calibration_mismatch(ts, detector="yunet", aligned=False)
    # a calibration of a protocol model is not silently shadowed
    store_calibration("facenet-vggface2", {**rec, "model": "facenet-vggface2"})
    t = resolve_thresholds("facenet-vggface2")
    assert t.kind == "protocol" and "not used" in t.note


def test_stored_calibration_records_detector_and_alignment(tmp_path):
    from facepriv.audit import CalibrationConfig, run_calibration

    root = tmp_path / "imgs"
    for n, c in {"a1": (200, 40, 40), "a2": (190, 60, 50), "b1": (40, 40, 200), "c1": (40, 200, 40)}.items():
        _solid(root / f"{n}.png", c)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("a1.png,a2.png,same\na1.png,b1.png,different\na2.png,c1.png,different\n")
    res = run_calibration(CalibrationConfig(pairs=pairs, models=["mean-colour"], root=root, aligned=True,
                                            progress=False, device="cpu"),
                          recognizers={"mean-colour": MeanColour()})
    stored = json.loads(Path(res["mean-colour"]["stored"]).read_text())
    assert stored["aligned"] is True and stored["detector"] is None and stored["aligned_template"] == "arcface-112"
    ts = resolve_thresholds("mean-colour", spec=MeanColour().spec)
    assert calibration_mismatch(ts, detector=None, aligned=True, aligned_template="arcface-112") is None
    assert "pre-aligned crops there, whole photos here" in calibration_mismatch(ts, detector="mtcnn", aligned=False)


def test_fid_uses_pytorch_fid_and_reports_its_failures(monkeypatch, capsys):
    from pytorch_fid import fid_score

    from facepriv.audit.metrics import QualityMeter, frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (40, 6)), rng.normal(0.5, 1.2, (40, 6))
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    d, note = frechet_distance(*args)
    with warnings.catch_warnings():  # scipy's DeprecationWarning about pytorch-fid's sqrtm(disp=False)
        warnings.simplefilter("ignore")
        direct = float(fid_score.calculate_frechet_distance(*args))
    assert d == pytest.approx(direct) and note is None

    class Feat(nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 32, 32, generator=g) for _ in range(4)]

    def singular(mu1, s1, mu2, s2, eps=1e-6):  # pytorch-fid's own words for a singular product
        print("fid calculation produces singular product; adding 1e-06 to diagonal of cov estimates")
        return 1.25

    monkeypatch.setattr(fid_score, "calculate_frechet_distance", singular)
    m = QualityMeter(lpips=None, fid_model=Feat())
    for im in imgs:
        m.add(im, (im * 0.9).clamp(0, 1))
    s = m.summary()
    assert s["fid"] == 1.25 and "singular product" in s["fid_note"]
    assert "singular" not in capsys.readouterr().out  # never on stdout (it would break --json)

    def imaginary(*a, **k):
        raise ValueError("Imaginary component 3.2")

    monkeypatch.setattr(fid_score, "calculate_frechet_distance", imaginary)
    m = QualityMeter(lpips=None, fid_model=Feat())
    for im in imgs:
        m.add(im, (im * 0.9).clamp(0, 1))
    s = m.summary()
    assert s["fid"] is None and "Imaginary component 3.2" in s["unavailable"]["fid"]
    assert s["psnr"] is not None and s["ssim"] is not None  # the other metrics still run
