"""Pairing protected files and faces with their originals: files by relative path (never by
order), faces by IoU, also across photos saved at another size and pre-aligned crops of
another size; missing folders name their option.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import fixture_path
from PIL import Image

from facepriv.audit import run_audit
from facepriv.audit import inputs as inp
from facepriv.audit.inputs import match_files
from facepriv.audit.metrics import match_faces
from facepriv.core.errors import ConfigError
from facepriv.models.thresholds import FARS

from .helpers import MeanColour, audit_cfg, colour_cos, random_image, real_audit_cfg, solid, write_thresholds


def test_files_are_matched_by_relative_path_not_order(tmp_path):
    o, p = tmp_path / "orig", tmp_path / "prot"
    for rel in ("b/z.jpg", "a.jpg", "c/y.jpg", "only_orig.jpg"):
        random_image(o / rel)
    for rel in ("c/y.png", "a.jpg", "b/z.jpg", "stray.png"):  # suffix changed, different order, one stray
        random_image(p / rel)
    pairs, errors = inp.match_files(p, o)
    got = {fp.rel: fp.original_rel for fp in pairs}
    assert got == {"a.jpg": "a.jpg", "b/z.jpg": "b/z.jpg", "c/y.png": "c/y.jpg"}
    assert [e["file"] for e in errors] == ["stray.png"] and "no original" in errors[0]["error"]
    single, _ = inp.match_files(p / "a.jpg", o / "b/z.jpg")
    assert single[0].original == (o / "b/z.jpg").resolve()


def test_missing_folders_name_their_option(tmp_path):
    solid(tmp_path / "o" / "a.png", (1, 2, 3))
    with pytest.raises(ConfigError, match=r"^--protected folder nope does not exist$"):
        match_files("nope", tmp_path / "o")
    with pytest.raises(ConfigError, match=r"^--original folder .*missing does not exist$"):
        match_files(tmp_path / "o", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images found under the --protected folder"):
        match_files(tmp_path / "empty", tmp_path / "o")


@pytest.mark.realmodels
def test_swapped_files_show_matching_is_by_name(tmp_path, photo_sets, real_models, mtcnn):
    orig, _ = photo_sets
    prot = tmp_path / "prot"
    prot.mkdir()
    # protected/obama.jpg holds biden and vice versa: with name matching both must fail verification
    shutil.copy(orig / "biden.jpg", prot / "obama.jpg")
    shutil.copy(orig / "obama.jpg", prot / "biden.jpg")
    rep = run_audit(real_audit_cfg(prot, orig), recognizers=real_models, detector=mtcnn)
    for m in real_models:
        d = rep["models"][m]["dodging"]
        assert d["protocol"] == {"other-photos": 0, "self": 2} and d["psr"]["1e-3"] == 1.0
    assert any("self-verification" in n for n in rep["protocol_notes"])


# ------------------------------------------------------------------------------ faces across sizes
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
    rep = run_audit(audit_cfg(prot, orig, models=["sface"]), recognizers={"sface": sface}, detector=det)
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
    rep2 = run_audit(audit_cfg(prot, orig, models=["sface"], landmarks="original"), recognizers={"sface": sface},
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
    th = write_thresholds(tmp_path / "th.json", "mean-colour", {"1e-1": 0.9, "1e-2": 0.99, "1e-3": 0.999})
    rep = run_audit(audit_cfg(prot, orig, aligned=True, thresholds=th), recognizers={"mean-colour": model})
    assert rep["config"]["aligned"] is True and rep["versions"]["detector"] is None
    for row in rep["images"]:
        assert row["faces_matched"] == 1 and row["faces_not_detected"] == 0
        sim = row["models"]["mean-colour"]["faces"][0]["dodging"][0]
        # the expected value: cosine of the two crops' centre mean colours, computed here
        o = np.asarray(Image.open(orig / row["original"]), dtype=np.float64)[56:168, 56:168].reshape(-1, 3).mean(0)
        p = np.asarray(Image.open(prot / row["protected"]), dtype=np.float64)[28:84, 28:84].reshape(-1, 3).mean(0)
        assert sim == pytest.approx(colour_cos(o, p), abs=2e-3) and sim > 0.999
    d = rep["models"]["mean-colour"]["dodging"]
    assert d["not_detected"] == 0 and d["psr"] == {f: 0.0 for f in FARS}


@pytest.mark.realmodels
def test_landmarks_from_original_and_faces_matched_by_iou(tmp_path, real_models, mtcnn):
    orig, prot = tmp_path / "o", tmp_path / "p"
    orig.mkdir()
    shutil.copy(fixture_path("group.jpg"), orig / "group.jpg")
    img = np.asarray(Image.open(orig / "group.jpg").convert("RGB")).copy()
    prot.mkdir()
    Image.fromarray(img).save(prot / "group.png")
    rep = run_audit(real_audit_cfg(prot, orig, landmarks="original"), recognizers=real_models, detector=mtcnn)
    faces = rep["images"][0]["models"]["sface"]["faces"]
    assert len(faces) == 6 and all(f["protocol"] == "self" and f["dodging"][0] > 0.99 for f in faces)
    # mirrored: the faces move, IoU matching finds them at their new places
    Image.fromarray(img[:, ::-1].copy()).save(prot / "group.png")
    rep = run_audit(real_audit_cfg(prot, orig), recognizers=real_models, detector=mtcnn)
    assert rep["images"][0]["faces_matched"] < 6  # mirrored boxes do not overlap their originals
