"""facepriv audit, second review round: a real detector for "face still detected" on aligned
crops, quality read-ahead in batches, face indices in utility rows, model versions, absolute
config paths, --max-refs, vectorised identification, thin-statistics notes and the terminal's
quality notes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fixture_path
from PIL import Image
from torch import nn

from facepriv.audit import AuditConfig, run_audit
from facepriv.audit.metrics import QualityMeter, identity_rank
from facepriv.audit.report import csv_rows
from facepriv.audit.runner import (_sim, _thin_statistics_notes, gallery_ranks, model_versions, pad_for_detection,
                                   sample_refs)
from facepriv.models.thresholds import ThresholdSet


@pytest.fixture(autouse=True)
def _private(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRIV_THRESHOLDS_DIR", str(tmp_path / "thresholds"))
    monkeypatch.setenv("FACEPRIV_OFFLINE", "1")


class MeanColour(nn.Module):
    """A fake recogniser: the embedding of a crop is the mean RGB of its centre."""

    def __init__(self, name: str = "mean-colour"):
        super().__init__()
        self.spec = type("S", (), {"template": "arcface-112", "input_size": (112, 112), "metric": "cosine",
                                   "name": name, "thresholds": {"1e-1": 0.9, "1e-2": 0.95, "1e-3": 0.99},
                                   "threshold_source": "test", "architecture": "mean colour", "runtime": "torch"})()

    def forward(self, x):
        return x[:, :, 28:84, 28:84].mean((2, 3))


class ColourExpression(nn.Module):
    labels = ("red", "green", "blue")

    def __init__(self):
        super().__init__()
        self.spec = MeanColour(name="colour-expression").spec

    def forward(self, x):
        return 20.0 * x[:, :, 28:84, 28:84].mean((2, 3))


def _solid(path: Path, rgb, size: int = 112) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), rgb, dtype=np.uint8)).save(path)
    return path


def _cfg(protected, original, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    kw.setdefault("quality", False)
    kw.setdefault("models", ["mean-colour"])
    return AuditConfig(protected=protected, original=original, **kw)


def _aligned_crop(detector, name: str, size: int = 112) -> np.ndarray:
    from facepriv.core.align import align_faces
    from facepriv.core.io import load_image

    img = load_image(fixture_path(name))
    face = max(detector.detect(img.rgb), key=lambda f: f.width * f.height)
    x = torch.from_numpy(img.rgb).permute(2, 0, 1).float() / 255
    crop = align_faces(x, torch.from_numpy(face.landmarks[None].astype(np.float32)), "arcface-112",
                       size=(size, size)).crops[0]
    return (crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------ 1: aligned utility
def test_pad_for_detection_puts_the_crop_in_the_middle_half():
    crop = np.full((40, 60, 3), 200, dtype=np.uint8)
    out = pad_for_detection(crop)
    assert out.shape == (80, 120, 3)
    assert (out[20:60, 30:90] == 200).all() and (out[:20] == 127).all() and (out[:, :30] == 127).all()


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
    _solid(prot / "biden.png", (128, 128, 128))
    _solid(orig / "wall.png", (90, 140, 60))
    _solid(prot / "wall.png", (90, 140, 60))
    rep = run_audit(_cfg(prot, orig, aligned=True, utility=True), recognizers={"mean-colour": MeanColour()},
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
    rep = run_audit(_cfg(prot, orig, aligned=True, utility=True, glob="wall*"),
                    recognizers={"mean-colour": MeanColour()}, detector=mtcnn, expression_model=ColourExpression())
    assert rep["utility"]["face_detected_rate"] is None and rep["utility"]["faces_left_out"] == 1


def test_aligned_utility_without_a_detector_still_audits(tmp_path, monkeypatch):
    import facepriv.models as models

    def missing(*a, **k):
        raise RuntimeError("mtcnn weights not on this machine")

    monkeypatch.setattr(models, "create_model", missing)
    _solid(tmp_path / "o" / "a.png", (200, 30, 30))
    _solid(tmp_path / "p" / "a.png", (190, 40, 30))
    rep = run_audit(_cfg(tmp_path / "p", tmp_path / "o", aligned=True, utility=True),
                    recognizers={"mean-colour": MeanColour()}, expression_model=ColourExpression())
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
    _solid(tmp_path / "o" / "a.png", (200, 30, 30))
    _solid(tmp_path / "p" / "a.png", (190, 40, 30))
    rep = run_audit(_cfg(tmp_path / "p", tmp_path / "o", aligned=True), recognizers={"mean-colour": MeanColour()})
    assert rep["versions"]["detector"] is None and "detector_model" not in rep["versions"]


# ------------------------------------------------------------------------------ 2: quality read-ahead
class _BatchMeter(QualityMeter):
    """The real PSNR / SSIM meter with an all-or-nothing ``add_many`` that records its chunks;
    images under 16 px are refused (by ``add`` and, for the whole chunk, by ``add_many``)."""

    def __init__(self):
        super().__init__(lpips=None, fid=False)
        self.chunks: list[int] = []

    def _rows(self, pairs):
        if any(min(a.shape[-2:]) < 16 for a, _ in pairs):
            raise ValueError("image too small")
        base = getattr(QualityMeter, "add_many", None)
        return base(self, pairs) if base else [QualityMeter.add(self, a, b) for a, b in pairs]

    def add(self, protected, original):
        return self._rows([(protected, original)])[0]

    def add_many(self, pairs):
        self.chunks.append(len(pairs))
        return self._rows(pairs)


def test_quality_reads_ahead_and_feeds_add_many_in_batches(tmp_path, monkeypatch):
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    rng = np.random.default_rng(0)
    for k in range(7):
        a = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        b = np.clip(a.astype(int) + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
        orig.mkdir(exist_ok=True)
        prot.mkdir(exist_ok=True)
        Image.fromarray(a).save(orig / f"{k}.png")
        Image.fromarray(b).save(prot / f"{k}.png")
    (prot / "3.png").write_bytes(b"not an image")  # fails only its own row
    kw = dict(aligned=True, quality=True, batch_size=2, workers=2)
    rep_b = run_audit(_cfg(prot, orig, **kw), recognizers={"mean-colour": MeanColour()},
                      quality_meter=(meter := _BatchMeter()))
    plain = QualityMeter(lpips=None, fid=False)
    rep_p = run_audit(_cfg(prot, orig, **kw), recognizers={"mean-colour": MeanColour()}, quality_meter=plain)
    assert meter.chunks == [2, 2, 2]  # 6 readable pairs in chunks of --batch-size
    qb = {r["protected"]: r["quality"] for r in rep_b["images"]}
    qp = {r["protected"]: r["quality"] for r in rep_p["images"]}
    assert "error" in qb["3.png"] and set(qb) == {f"{k}.png" for k in range(7)}
    for k in (0, 1, 2, 4, 5, 6):
        assert qb[f"{k}.png"] == qp[f"{k}.png"] and qb[f"{k}.png"]["psnr"] > 0
    assert rep_b["quality"]["psnr"] == rep_p["quality"]["psnr"] and rep_b["quality"]["n"] == 6

    # a chunk the meter refuses is redone pair by pair: only the pair at fault fails
    small = tmp_path / "small"
    shutil.copytree(prot, small)
    (small / "3.png").unlink()
    Image.fromarray(np.full((8, 8, 3), 100, dtype=np.uint8)).save(small / "5.png")
    meter2 = _BatchMeter()
    rep = run_audit(_cfg(small, orig, **kw), recognizers={"mean-colour": MeanColour()}, quality_meter=meter2)
    q = {r["protected"]: r["quality"] for r in rep["images"]}
    assert q["5.png"] == {"error": "image too small"}
    assert all(q[f"{k}.png"] == qp[f"{k}.png"] for k in (0, 1, 2, 4, 6))
    assert rep["quality"]["n"] == 5  # the refused chunk's other pair was added once, not twice


def test_quality_memory_is_bounded_by_pixels_not_by_batch_size(tmp_path, monkeypatch):
    """Full-size photos must not be held by the batch: chunks stop at QUALITY_CHUNK_PIXELS, the
    read-ahead holds at most workers + 2 decoded pairs, and only the chunk being measured is float."""
    import facepriv.audit.quality as quality

    orig, prot = tmp_path / "orig", tmp_path / "prot"
    orig.mkdir()
    prot.mkdir()
    rng = np.random.default_rng(1)
    for k in range(12):
        a = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(a).save(orig / f"{k}.png")
        Image.fromarray(255 - a).save(prot / f"{k}.png")
    pair_px = 2 * 40 * 48
    monkeypatch.setattr(quality, "QUALITY_CHUNK_PIXELS", 3 * pair_px)  # three pairs fit, a fourth does not
    loaded, floats_live, peak = [0], [0], {"loaded_not_fed": 0, "float": 0}
    real_load = quality.load_image

    def counting_load(path, **kw):
        loaded[0] += 1
        return real_load(path, **kw)

    monkeypatch.setattr(quality, "load_image", counting_load)

    class Meter(_BatchMeter):
        fed = 0

        def add_many(self, pairs):
            floats_live[0] = 2 * len(pairs)
            peak["float"] = max(peak["float"], floats_live[0])
            peak["loaded_not_fed"] = max(peak["loaded_not_fed"], loaded[0] - 2 * self.fed)
            Meter.fed += len(pairs)
            return super().add_many(pairs)

    meter = Meter()
    kw = dict(aligned=True, quality=True, batch_size=32, workers=2)
    rep = run_audit(_cfg(prot, orig, **kw), recognizers={"mean-colour": MeanColour()}, quality_meter=meter)
    assert meter.chunks == [3, 3, 3, 3]  # cut by pixels, not at --batch-size 32
    assert peak["float"] == 6  # one chunk of float images at a time
    # decoded but not yet measured: the chunk (3 pairs), the pair that closed it, and the
    # read-ahead (workers + 2 = 4 pairs); with --batch-size 32 the old code held 2 x 32 + 32
    assert peak["loaded_not_fed"] <= 2 * (3 + 1 + 4)
    assert rep["quality"]["n"] == 12


# ------------------------------------------------------------------------------ 3: face indices
def test_csv_takes_the_expression_of_face_0_only():
    def report(expr):
        return {"models": {}, "utility": {}, "images": [{"protected": "a.jpg", "original": "a.jpg",
                                                          "utility": {"expression": expr}}]}

    face1 = {"face": 1, "expression_kept": False, "expression_tv": 0.7}
    face0 = {"face": 0, "expression_kept": True, "expression_tv": 0.1}
    _, rows = csv_rows(report([face1]))
    assert rows[0].get("expression_kept") is None and rows[0].get("expression_tv") is None
    _, rows = csv_rows(report([face1, face0]))
    assert rows[0]["expression_kept"] is True and rows[0]["expression_tv"] == 0.1


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
    rep = run_audit(_cfg(prot, orig, utility=True, out=tmp_path / "rep"), recognizers={"mean-colour": MeanColour()},
                    detector=mtcnn)
    ex = rep["images"][0]["utility"]["expression"]
    assert len(ex) == len(faces) - 1 and sorted(e["face"] for e in ex) == list(range(1, len(faces)))
    with open(tmp_path / "rep" / "report.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["expression_kept"] == "" and row["expression_tv"] == ""
    amp = rep["versions"]["expression_model"]["amp"]
    assert rep["versions"]["expression_model"]["name"] == "expr-fer7" and amp == rep["models"]["mean-colour"]["amp"]
    assert rep["versions"]["expression_model"]["sha256"]  # the registry pins the weights


# ------------------------------------------------------------------------------ 4, 5: versions, config
def test_versions_name_quality_weights_and_config_paths_are_absolute(tmp_path, monkeypatch):
    class FakeMeter:  # what model_versions reads of a QualityMeter
        lpips, lpips_name, fid_model = object(), "lpips-alex", object()

    v = model_versions({"mean-colour": MeanColour()}, "mtcnn", detector_role="faces of every photo",
                       quality_meter=FakeMeter())
    assert v["quality"]["lpips"]["name"] == "lpips-alex" and v["quality"]["fid"]["name"] == "fid-inception"
    for entry in (v["quality"]["lpips"], v["quality"]["fid"], v["detector_model"]):
        assert entry["weights"] and (entry["sha256"] or entry["version"])
    FakeMeter.lpips = None
    assert "lpips" not in model_versions({}, None, quality_meter=FakeMeter())["quality"]

    monkeypatch.chdir(tmp_path)
    _solid(tmp_path / "o" / "a.png", (200, 30, 30))
    _solid(tmp_path / "p" / "a.png", (190, 40, 30))
    (tmp_path / "ids.csv").write_text("a.png,alice\n")
    rep = run_audit(_cfg(Path("p"), Path("o"), aligned=True, identities=Path("ids.csv"), out=Path("rep")),
                    recognizers={"mean-colour": MeanColour()})
    c = rep["config"]
    assert c["protected"] == str(tmp_path / "p") and c["original"] == str(tmp_path / "o")
    assert c["identities"] == str(tmp_path / "ids.csv") and c["out"] == str(tmp_path / "rep")
    written = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert written["config"]["protected"] == str(tmp_path / "p") and written["config"]["max_refs"] == 20


# ------------------------------------------------------------------------------ 6: --max-refs
def test_max_refs_samples_references_deterministically(tmp_path):
    orig, prot, gal = tmp_path / "orig", tmp_path / "prot", tmp_path / "gallery"
    _solid(orig / "alice" / "a.png", (220, 30, 30))  # identity from the gallery folder name
    _solid(prot / "alice" / "a.png", (200, 60, 40))
    for k in range(6):
        _solid(gal / "alice" / f"{k}.png", (215 - 10 * k, 30 + 5 * k, 30))
    _solid(gal / "bob" / "0.png", (30, 30, 220))
    run = lambda **kw: run_audit(_cfg(prot, orig, aligned=True, gallery=gal, **kw),  # noqa: E731
                                 recognizers={"mean-colour": MeanColour(), "mc2": MeanColour("mc2")})
    rep = run(max_refs=3)
    row = rep["images"][0]
    assert len(row["references"]) == 3 and row["references_total"] == 6
    assert len(set(row["references"])) == 3 and all(r.startswith("alice/") for r in row["references"])
    for m in ("mean-colour", "mc2"):  # labels once per image; per model only the scores
        f0 = row["models"][m]["faces"][0]
        assert "references" not in f0 and len(f0["dodging"]) == 3
    assert rep["config"]["max_refs"] == 3
    assert any("--max-refs 3" in n and "fixed-seed" in n for n in rep["protocol_notes"])
    assert run(max_refs=3)["images"][0]["references"] == row["references"]  # same sample every run
    full = run(max_refs=0)["images"][0]
    assert len(full["references"]) == 6 and "references_total" not in full
    # the online APIs get the same (sampled) references as the local models
    class Recorder:
        calls, stats, stopped_reason = 0, {}, None

        def __init__(self):
            self.sent = []

        def describe(self):
            return {"name": "recorder"}

        def compare_many(self, pairs, **kw):
            from facepriv.audit.apis.base import CompareResult

            self.sent += [(Path(a).name, Path(b).relative_to(gal).as_posix()) for a, b in pairs]
            return [CompareResult(score=0.1, thresholds={"1e-3": 0.5}) for _ in pairs]

    api = Recorder()
    rep = run_audit(_cfg(prot, orig, aligned=True, gallery=gal, max_refs=3, api_max_refs=5),
                    recognizers={"mean-colour": MeanColour()}, apis={"rec": api})
    assert [b for _, b in api.sent] == rep["images"][0]["references"] == row["references"]
    assert {r["protocol"] for r in rep["images"][0]["apis"]["rec"]} == {"other-photos"}
    # the sample keeps the pool order and depends only on the image, not on the other images
    refs = list(range(50))
    s = sample_refs(refs, 5, "x/a.png")
    assert s == sorted(s) and s == sample_refs(refs, 5, "x/a.png") and s != sample_refs(refs, 5, "x/b.png")
    assert sample_refs(refs, 0, "x") == refs and sample_refs(refs[:3], 5, "x") == refs[:3]


# ------------------------------------------------------------------------------ 7: vectorised ranks
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_gallery_ranks_match_the_per_probe_loop_with_ties(metric):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    # duplicated embeddings under different identities make exact ties
    gallery = torch.cat([base, base[:3], torch.randn(5, 8, generator=g)])
    ids = ["a", "b", "c", "d", "e", "f", "b", "c", "a", "g", "a", "b", "h", "d"]
    probes = torch.cat([base[[0, 1, 2, 4]], torch.randn(6, 8, generator=g)])
    true = ["a", "b", "c", "e", "a", "g", "h", "z", "d", "f"]
    exclude = [[0], [], [1, 6], [4], [], [9], [12], [], [3, 13], [5]]
    got = gallery_ranks(gallery, ids, probes, true, exclude, metric, chunk=3)
    want = []
    for p, t, ex in zip(probes, true, exclude):
        keep = [k for k in range(len(ids)) if k not in ex]
        kid = [ids[k] for k in keep]
        want.append(identity_rank(_sim(p, gallery[keep], metric)[0], kid, t) if t in kid else None)
    assert got == want
    # a big gallery shrinks the probe chunk to a memory budget: same ranks
    import facepriv.audit.protocols as protocols

    old_cells = protocols.RANK_CELLS
    try:
        protocols.RANK_CELLS = 2 * len(ids)  # two probes per product
        assert gallery_ranks(gallery, ids, probes, true, exclude, metric) == want
    finally:
        protocols.RANK_CELLS = old_cells
    assert want[6] is None and want[7] is None and want[8] is None  # identity gone / unknown
    assert any(r is not None and r > 1 for r in want)
    # a tie counts against the true identity
    assert gallery_ranks(torch.eye(2)[[0, 0]], ["x", "y"], torch.eye(2)[:1], ["x"], None, metric) == [2]


# ------------------------------------------------------------------------------ 8: thin statistics
def test_thin_statistics_notes():
    models = {"m": {"identification": {"n": 3, "gallery_identities": 4}, "roc": {"n_impostor": 150}},
              "big": {"identification": {"n": 3, "gallery_identities": 6}, "roc": {"n_impostor": 5000}}}
    th = {"m": ThresholdSet("m", {}, "calibrated on x", "calibrated", calibration={"n_impostor": 50}),
          "big": ThresholdSet("big", {}, "calibrated", "calibrated", note="only 50 impostor pairs: ...",
                              calibration={"n_impostor": 50})}
    notes = _thin_statistics_notes(models, th)
    text = " | ".join(notes)
    assert "identification (m)" in text and "rank-5 is 100% by definition" in text and "(big)" not in text
    assert "ROC (m): only 150 impostor pair(s): the curve cannot resolve FAR 1e-3 " in text
    assert "thresholds (m): calibrated on only 50 impostor pair(s): FAR 1e-2, 1e-3 " in text
    assert len(notes) == 3  # big: enough identities and impostors; its thresholds carry their own note


def test_small_gallery_is_noted_end_to_end(tmp_path):
    orig, prot, gal = tmp_path / "orig", tmp_path / "prot", tmp_path / "gallery"
    _solid(orig / "alice" / "a.png", (220, 30, 30))
    _solid(prot / "alice" / "a.png", (30, 220, 30))
    _solid(gal / "alice" / "1.png", (210, 40, 30))
    _solid(gal / "alice" / "2.png", (200, 50, 30))
    _solid(gal / "bob" / "1.png", (30, 30, 220))
    rep = run_audit(_cfg(prot, orig, aligned=True, gallery=gal), recognizers={"mean-colour": MeanColour()})
    assert rep["models"]["mean-colour"]["identification"]["rank5_after"] == 1.0
    assert any("only 2 identities, so rank-5 is 100% by definition" in n for n in rep["protocol_notes"])
    assert any("ROC (mean-colour): only" in n for n in rep["protocol_notes"])


# ------------------------------------------------------------------------------ 9: terminal notes
def test_terminal_prints_the_quality_notes_verbatim(capsys, monkeypatch):
    from facepriv.cli import audit as cli_audit
    from facepriv.cli import common

    rep = {"models": {}, "thresholds": {}, "faces": {},
           "quality": {"psnr": 31.0, "n_identical": 1, "psnr_note": "1 of 2 protected image(s) are [bold]identical[/bold]",
                       "fid": 12.5, "fid_note": "FID over 2 images is strongly biased [x]", "unavailable": {}}}
    monkeypatch.setattr(common.out_console, "width", 300)
    cli_audit.print_summary(rep)
    out = capsys.readouterr().out
    assert "PSNR: 1 of 2 protected image(s) are [bold]identical[/bold]" in out
    assert "FID: FID over 2 images is strongly biased [x]" in out
