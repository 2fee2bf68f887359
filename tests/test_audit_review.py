"""facepriv audit: fixes from the review of the audit command (issue 5).

* the online adapters are created (keys checked) before any model loads: a missing key is a
  usage error (exit 2) before the embedding, and no report folder is written;
* a provider that stops (bad key) or fails on every pair makes the CLI exit 1, with the reason
  in the terminal, report.json and the HTML, and never the key;
* dodging keeps its two protocols apart: a note with the counts whenever a face falls back to
  self-verification, the ROC "before" / "after" over the same other-photo comparisons, the
  protocol split (and the per-face PSR) in the terminal and HTML tables;
* the ``audit calibrate`` terminal tables fit 80 columns;
* impersonation leaves out a target photo that is the image's own original, or a photo of the
  source person, and says so.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_path
from PIL import Image
from rich.console import Console
from test_audit_apis import KEY, SECRET, MockFacePP
from test_audit_rules import MeanColour, _cos, _solid, _thresholds_file
from facepriv.audit import AuditConfig, calibrate_scores, run_audit
from facepriv.models.thresholds import FARS, auc_score, roc_curve
from facepriv.core.errors import ConfigError


@pytest.fixture(autouse=True)
def _private(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRIV_THRESHOLDS_DIR", str(tmp_path / "thresholds"))
    monkeypatch.setenv("FACEPRIV_OFFLINE", "1")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # no user API config file
    for var in ("FACEPP_API_KEY", "FACEPP_API_SECRET", "FACEPP_ENDPOINT", "FACEPRIV_API_CONFIG"):
        monkeypatch.delenv(var, raising=False)


def _cfg(protected, original, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    kw.setdefault("quality", False)
    kw.setdefault("models", ["mean-colour"])
    return AuditConfig(protected=protected, original=original, **kw)


def _render(renderable, width: int) -> str:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def _photo_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """obama and biden fixtures as originals; re-saved copies (other bytes, same faces) as protected."""
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    orig.mkdir()
    prot.mkdir()
    for n in ("obama.jpg", "biden.jpg"):
        shutil.copy(fixture_path(n), orig / n)
        Image.open(orig / n).save(prot / n, quality=97)
    return orig, prot


# ------------------------------------------------------------------------------ A: adapters first
def test_missing_api_key_fails_before_any_model_or_embedding(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from facepriv.audit import runner
    from facepriv.cli import app

    work: list[str] = []

    def no_models(*a, **k):
        work.append("models loaded")
        raise AssertionError("recognition models were loaded before the API keys were checked")

    def no_embedding(self, *a, **k):
        work.append("embedding")
        raise AssertionError("images were embedded before the API keys were checked")

    monkeypatch.setattr(runner, "load_recognizers", no_models)
    monkeypatch.setattr(runner.FaceEmbeddingCache, "process", no_embedding)
    orig, prot = _photo_dirs(tmp_path)
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["audit", "-p", str(prot), "--original", str(orig), "-m", "sface", "--out", str(out),
                                   "--api", "facepp", "--no-quality"])
    assert res.exit_code == 2, res.output
    assert "FACEPP_API_KEY" in res.output
    assert work == [] and not out.exists()
    # the library raises the same usage error, before the injected models are used
    with pytest.raises(ConfigError, match="FACEPP_API_KEY"):
        run_audit(_cfg(prot, orig, apis=["facepp"], out=tmp_path / "lib"), recognizers={"mean-colour": MeanColour()})
    assert work == [] and not (tmp_path / "lib").exists()


# ------------------------------------------------------------------------------ C: a provider that stops
@pytest.mark.realmodels
def test_bad_key_exits_1_with_the_reason_and_never_the_key(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from facepriv.cli import app

    server = MockFacePP()
    try:
        orig, prot = _photo_dirs(tmp_path)
        bad = "bad-key-7f3e9a1c55"
        monkeypatch.setenv("FACEPP_API_KEY", bad)
        monkeypatch.setenv("FACEPP_API_SECRET", SECRET)
        out = tmp_path / "report"

        def args(out: Path, cache: str = "cache", retries: str = "2") -> list[str]:
            return ["audit", "-p", str(prot), "--original", str(orig), "-m", "sface", "--out", str(out), "--api", "facepp",
                    "--api-endpoint", server.url, "--api-cache", str(tmp_path / cache), "--api-rate", "0",
                    "--api-retries", retries, "--no-quality"]

        res = CliRunner().invoke(app, args(out))
        assert res.exit_code == 1, res.output
        assert server.calls <= 2  # rejected credentials are not retried; the other pair is not even sent
        assert "error: facepp stopped: Face++ rejected the credentials (HTTP 401 AUTHENTICATION_ERROR)" in res.stdout
        rep = json.loads((out / "report.json").read_text())
        a = rep["apis"]["facepp"]
        assert a["status"] == "stopped" and "AUTHENTICATION_ERROR" in a["stopped"]
        assert a["pairs"] == a["failed_pairs"] == 2 and rep["errors"] == []  # the local audit itself was fine
        html = (out / "report.html").read_text()
        assert "facepp stopped: Face++ rejected the credentials" in html
        # --json: the summary says it too, the reason goes to stderr, exit 1
        res_j = CliRunner().invoke(app, ["--json", *args(tmp_path / "report_j")])
        assert res_j.exit_code == 1
        summary = json.loads(res_j.stdout)
        assert summary["apis"]["facepp"]["status"] == "stopped"
        assert summary["api_problems"] and "AUTHENTICATION_ERROR" in summary["api_problems"][0]
        assert "facepp stopped" in res_j.stderr
        texts = [res.output, res_j.output, res_j.stderr]
        texts += [p.read_text(errors="replace") for d in (out, tmp_path / "report_j") for p in d.rglob("*")]
        assert len(texts) == 9
        for t in texts:
            assert bad not in t and SECRET not in t
        # a good key whose every pair fails (the service keeps erroring, no retries left): exit 1 too
        monkeypatch.setenv("FACEPP_API_KEY", KEY)
        server.fail_first = [(500, "INTERNAL_ERROR")] * 4
        res_f = CliRunner().invoke(app, args(tmp_path / "report_f", cache="cache_f", retries="0"))
        assert res_f.exit_code == 1, res_f.output
        assert "error: facepp: all 2 pair(s) failed: Face++ HTTP 500 INTERNAL_ERROR" in res_f.stdout
        assert json.loads((tmp_path / "report_f" / "report.json").read_text())["apis"]["facepp"]["status"] == "failed"
    finally:
        server.close()


# ------------------------------------------------------------------------------ D: dodging protocols
def test_self_verification_is_noted_and_kept_out_of_the_roc(tmp_path, monkeypatch):
    from facepriv.cli import audit as cli_audit

    orig, prot = tmp_path / "orig", tmp_path / "prot"
    clean = {"a1": (200, 40, 40), "a2": (190, 70, 50), "b1": (40, 40, 200), "c1": (40, 200, 40)}
    protected = {"a1": (20, 200, 220), "a2": (185, 75, 60), "b1": (120, 60, 170), "c1": (200, 40, 200)}
    for n in clean:
        _solid(orig / f"{n}.png", clean[n])
        _solid(prot / f"{n}.png", protected[n])
    ids = tmp_path / "ids.csv"
    ids.write_text("file,identity\na1.png,ann\na2.png,ann\nb1.png,bea\n")  # c1: identity unknown
    ths = {"1e-1": 0.9, "1e-2": 0.97, "1e-3": 0.995}
    th = _thresholds_file(tmp_path / "th.json", "mean-colour", ths)
    rep = run_audit(_cfg(prot, orig, aligned=True, identities=ids, thresholds=th, out=tmp_path / "rep"),
                    recognizers={"mean-colour": MeanColour()})
    d = rep["models"]["mean-colour"]["dodging"]
    # a1 <-> a2 are other photos of ann; bea has one photo; c1 has no identity
    other = [_cos(protected["a1"], clean["a2"]), _cos(protected["a2"], clean["a1"])]
    other_before = [_cos(clean["a1"], clean["a2"]), _cos(clean["a2"], clean["a1"])]
    self_ = [_cos(protected["b1"], clean["b1"]), _cos(protected["c1"], clean["c1"])]
    assert d["protocol"] == {"other-photos": 2, "self": 2}
    assert d["by_protocol"]["self"]["reasons"] == {"identity-unknown": 1, "no-other-photo": 1, "secondary-face": 0}
    rows = {r["protected"]: r["models"]["mean-colour"]["faces"][0] for r in rep["images"]}
    assert rows["b1.png"]["self_reason"] == "no-other-photo" and rows["c1.png"]["self_reason"] == "identity-unknown"
    for far, t in ths.items():
        assert d["by_protocol"]["other-photos"]["psr"][far] == pytest.approx(sum(s < t for s in other) / 2)
        assert d["by_protocol"]["self"]["psr"][far] == pytest.approx(sum(s < t for s in self_) / 2)
        assert d["psr"][far] == pytest.approx(sum(s < t for s in other + self_) / 4)  # headline: both protocols
        assert d["before"]["psr"][far] == pytest.approx(sum(s < t for s in other_before) / 2)
    assert d["before"]["n"] == d["by_protocol"]["other-photos"]["n"] == 2 and d["before"]["protocol"] == "other-photos"
    # (1) the note, with the counts
    note = next(n for n in rep["protocol_notes"] if "self-verification" in n)
    assert "2 of 4 face(s)" in note and "identity unknown: 1" in note and "no other clean photo of the person: 1" in note
    # (2) ROC before and after over the same population: the two other-photo comparisons
    scores = rep["scores"]["mean-colour"]
    assert len(scores["dodging_after_other_photos"]) == len(scores["dodging_before"]) == 2
    assert scores["dodging_self"] == pytest.approx(self_, abs=1e-5)
    roc = rep["models"]["mean-colour"]["roc"]
    assert roc["n_genuine"] == 2 and roc["genuine_protocol"] == "other-photos" and roc["self_left_out"] == 2
    impostors = [_cos(clean[x], clean["b1"]) for x in ("a1", "a2")]  # pool: a1, a2 (ann), b1 (bea)
    assert roc["n_impostor"] == 2
    for key, gen in (("before", other_before), ("after", other)):
        fpr, tpr, _ = roc_curve(np.array(gen), np.array(impostors))
        assert roc[key]["auc"] == pytest.approx(auc_score(fpr, tpr), abs=1e-6)
    # the AUC "after" with the self-verification scores mixed in would differ: they are really left out
    assert roc["after"]["auc"] == pytest.approx(0.75)  # protected a1 falls between the two impostor scores
    fpr, tpr, _ = roc_curve(np.array(other + self_), np.array(impostors))
    assert auc_score(fpr, tpr) != pytest.approx(roc["after"]["auc"], abs=1e-3)
    # (3) the protocol split and the per-face PSR in the terminal and HTML tables
    text = _render(cli_audit.psr_table(rep), 80)

    def row(label: str) -> list[str]:  # the cells after the label
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(label))
        return line.strip()[len(label):].split()

    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    assert row("dodging, all")[:5] == ["4", *[pct(d["psr"][f]) for f in FARS], pct(d["psr_faces"]["1e-3"])]
    assert row("other photos")[0] == "2" and row("other photos")[5] == pct(d["before"]["psr"]["1e-3"])
    assert row("self-verif.")[0] == "2" and row("self-verif.")[5] == "n/a"
    assert "faces" in text and "…" not in text and max(len(ln) for ln in text.splitlines()) <= 80
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "other photos</td>" in html and "self-verif.</td>" in html and "per-face PSR" in html
    assert "ROC before and after over the same 2 other-photo comparison(s)" in html
    assert "2 self-verification comparison(s) left out" in html


def test_only_other_photos_has_no_self_verification_note(tmp_path):
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    for n, c in (("a1", (200, 40, 40)), ("a2", (190, 70, 50))):
        _solid(orig / f"{n}.png", c)
        _solid(prot / f"{n}.png", c)
    ids = tmp_path / "ids.csv"
    ids.write_text("a1.png,ann\na2.png,ann\n")
    rep = run_audit(_cfg(prot, orig, aligned=True, identities=ids), recognizers={"mean-colour": MeanColour()})
    d = rep["models"]["mean-colour"]["dodging"]
    assert d["protocol"] == {"other-photos": 2, "self": 0} and d["by_protocol"]["self"]["n"] == 0
    assert not any("self-verification" in n for n in rep["protocol_notes"])
    from facepriv.audit.report import dodging_rows

    assert [label for label, _, _ in dodging_rows(d)] == ["dodging (others)"]


def test_psr_table_fits_80_columns_with_one_protocol():
    from rich.console import Console

    from facepriv.cli.audit import psr_table

    rates = {"1e-1": 0.0, "1e-2": 0.0, "1e-3": 0.0}
    for proto in ("self", "other-photos"):
        sub = {"n": 1, "psr": rates, "psr_faces": {"1e-3": 0.0}, "mean_similarity": 0.99}
        d = {**sub, "n_faces": 1, "before": {"psr": {"1e-3": 0.0}},
             "by_protocol": {"other-photos": {"n": 0}, "self": {"n": 0}} | {proto: sub}}
        rep = {"models": {"facenet-casia": {"dodging": d, "impersonation": {**sub, "n": 3, "before": {"psr": rates}}}}}
        console = Console(width=80, record=True)
        console.print(psr_table(rep))
        text = console.export_text()
        assert "…" not in text and "before" in text and max(len(line) for line in text.splitlines()) <= 80


# ------------------------------------------------------------------------------ G: calibrate table
def test_calibrate_tables_fit_80_columns():
    from facepriv.cli.audit import calibration_tables

    rng = np.random.default_rng(0)
    result = {}
    for name, shift in (("facenet-vggface2", 0.0), ("dlib-resnet", -1.0)):  # longest name; negative distances
        rec = calibrate_scores(rng.normal(0.6 + shift, 0.1, 300), rng.normal(0.1 + shift, 0.1, 2700),
                               default_threshold=0.5 + shift)
        rec.update(n_genuine=300, n_impostor=2700)
        result[name] = rec
    text = "".join(_render(t, 80) for t in calibration_tables(result, "deepface-pairs.csv"))
    assert "…" not in text and max(len(ln) for ln in text.splitlines()) <= 80
    for name, rec in result.items():
        assert name in text and f"{rec['auc']:.4f}" in text and f"{100 * rec['eer']:.2f}%" in text
        for far in FARS:
            assert f"{rec['thresholds'][far]:.4f} ({100 * rec['tar_at_far'][far]:.1f}%)" in text
    assert "300/2700" in text and "FAR 1e-3" in text


# ------------------------------------------------------------------------------ G: impersonation of oneself
class _RecordingAPI:
    """An adapter double that records which pairs it was asked to compare (no network)."""

    name = "recorder"

    def __init__(self):
        self.pairs: list[tuple[str, str]] = []
        self.calls = 0
        self.stats = {"cache_hits": 0, "retries": 0, "errors": 0}

    def describe(self) -> dict:
        return {"name": self.name}

    def compare_many(self, pairs, **kw):
        from facepriv.audit.apis import CompareResult

        self.pairs += [(Path(a).name, Path(b).name) for a, b in pairs]
        self.calls += len(pairs)
        return [CompareResult(score=50.0, thresholds={"default": 60.0}) for _ in pairs]


def test_impersonation_leaves_out_the_own_original_and_the_source_person(tmp_path):
    orig, prot, target = tmp_path / "orig", tmp_path / "prot", tmp_path / "target"
    clean = {"x": (200, 40, 40), "y": (40, 40, 200)}
    protected = {"x": (150, 90, 60), "y": (90, 60, 160)}
    for n in clean:
        _solid(orig / f"{n}.png", clean[n])
        _solid(prot / f"{n}.png", protected[n])
    _solid(target / "used.png", (10, 10, 10))
    shutil.copy(orig / "x.png", target / "x_copy.png")  # byte-identical to x's own original
    _solid(target / "yvonne2.png", (50, 60, 190))  # another photo of y's own person
    _solid(target / "zed.png", (120, 120, 40))  # a real target
    ids = tmp_path / "ids.csv"
    ids.write_text("file,identity\nx.png,xavier\ny.png,yvonne\n../target/yvonne2.png,yvonne\n")
    ths = {"1e-1": 0.9, "1e-2": 0.95, "1e-3": 0.99}
    th = _thresholds_file(tmp_path / "th.json", "mean-colour", ths)
    api = _RecordingAPI()
    rep = run_audit(_cfg(prot, orig, aligned=True, identities=ids, target=target, target_used=[target / "used.png"],
                         thresholds=th, out=tmp_path / "rep"),
                    recognizers={"mean-colour": MeanColour()}, apis={"recorder": api})
    rows = {r["protected"]: r for r in rep["images"]}
    assert rows["x.png"]["impersonation_excluded"] == [{"target": "x_copy.png", "reason": "own-original", "faces": "all"}]
    assert rows["y.png"]["impersonation_excluded"] == [
        {"target": "yvonne2.png", "reason": "source-identity", "faces": [0]}]
    colours = {"x_copy.png": clean["x"], "yvonne2.png": (50, 60, 190), "zed.png": (120, 120, 40)}
    kept = {"x": ["yvonne2.png", "zed.png"], "y": ["x_copy.png", "zed.png"]}  # target order: sorted file names
    sims = []
    for n, targets in kept.items():
        f = rows[f"{n}.png"]["models"]["mean-colour"]["faces"][0]
        expected = [_cos(protected[n], colours[t]) for t in targets]
        assert f["impersonation"] == pytest.approx(expected, abs=1e-5)
        assert f["impersonation_before"] == pytest.approx([_cos(clean[n], colours[t]) for t in targets], abs=1e-5)
        sims += expected
    imp = rep["models"]["mean-colour"]["impersonation"]
    assert imp["n"] == 4 and imp["excluded"] == {"own-original": 1, "source-identity": 1}
    for far, t in ths.items():
        assert imp["psr"][far] == pytest.approx(sum(s >= t for s in sims) / 4)
    # without the exclusion y would "impersonate" its own person: its similarity to yvonne2 passes 1e-3
    assert _cos(protected["y"], colours["yvonne2.png"]) < _cos(clean["y"], colours["yvonne2.png"])
    assert _cos(clean["y"], colours["yvonne2.png"]) >= ths["1e-3"]
    assert imp["before"]["psr"]["1e-3"] == pytest.approx(
        sum(_cos(clean[n], colours[t]) >= 0.99 for n, ts in kept.items() for t in ts) / 4)
    note = next(n for n in rep["protocol_notes"] if n.startswith("impersonation:"))
    assert "2 comparison(s) left out" in note and "own original" in note and "source person" in note
    # the online comparisons skip them too (the first remaining target per image)
    sent = [(a, b) for a, b in api.pairs if b in colours]
    assert sorted(sent) == [("x.png", "yvonne2.png"), ("y.png", "x_copy.png")]
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "impersonation target x_copy.png left out (own-original)" in html
