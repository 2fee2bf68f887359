"""The typed audit report (facepriv.audit.schema): run_audit builds an AuditReport; report.json,
report.csv, report.html and the terminal summary read it; a report.json read back gives the same
report, the same files and the same summary."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from torch import nn

from facepriv.audit import AuditConfig, run_audit, summarize, write_reports
from facepriv.audit.report import csv_rows, exit_code, psr_rows, verdict_line
from facepriv.audit.schema import ApiResult, AuditReport, Dodging, ImageRow, ModelResult, ThresholdEntry, as_report


class _MeanColour(nn.Module):
    """A recogniser whose embedding is the mean colour of the crop's centre."""

    def __init__(self, name: str):
        super().__init__()
        self.spec = type("S", (), {"template": "arcface-112", "input_size": (112, 112), "metric": "cosine",
                                   "name": name, "thresholds": {}, "threshold_source": None,
                                   "architecture": "mean colour", "runtime": "torch"})()

    def forward(self, x):
        return x[:, :, 28:84, 28:84].mean((2, 3))


class _Service:
    """An online service answering every comparison with score 50 (one in three fails)."""

    calls, stopped_reason = 0, None
    stats = {"cache_hits": 1, "retries": 0, "errors": 0, "throttled": 2}

    def describe(self):
        return {"name": "svc"}

    def compare_many(self, pairs, **kw):
        from facepriv.audit.apis.base import CompareResult

        self.calls += len(pairs)
        return [CompareResult(score=None, thresholds={}, error="HTTP 503") if k % 3 == 0
                else CompareResult(score=50.0, thresholds={"1e-3": 60.0}) for k in range(len(pairs))]


def _solid(path: Path, rgb) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((112, 112, 3), rgb, dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A finished audit with impersonation, a gallery, quality, thresholds and an online service."""
    tmp = tmp_path_factory.mktemp("audit")
    orig, prot, target, gal = tmp / "orig", tmp / "prot", tmp / "target", tmp / "gal"
    for n, clean, protected in (("x", (200, 40, 40), (150, 90, 60)), ("y", (40, 40, 200), (90, 60, 160)),
                                ("z", (30, 200, 30), (30, 200, 30))):
        _solid(orig / f"{n}.png", clean)
        _solid(prot / f"{n}.png", protected)
    _solid(target / "used.png", (10, 10, 10))
    _solid(target / "zed.png", (120, 120, 40))
    for k in range(3):
        _solid(gal / "xavier" / f"{k}.png", (215 - 10 * k, 30 + 5 * k, 30))
    _solid(gal / "yvonne" / "0.png", (30, 30, 220))
    ids = tmp / "ids.csv"
    ids.write_text("file,identity\nx.png,xavier\ny.png,yvonne\n")
    th = tmp / "th.json"
    th.write_text(json.dumps({"mc": {"1e-1": 0.9, "1e-2": 0.95, "1e-3": 0.99}}))
    cfg = AuditConfig(protected=prot, original=orig, models=["mc", "mc2"], aligned=True, identities=ids,
                      target=target, target_used=[target / "used.png"], gallery=gal, thresholds=th, lpips=None,
                      fid=False, progress=False, device="cpu", out=tmp / "rep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACEPRIV_OFFLINE", "1")
        mp.setenv("FACEPRIV_THRESHOLDS_DIR", str(tmp / "thresholds"))
        rep = run_audit(cfg, recognizers={"mc": _MeanColour("mc"), "mc2": _MeanColour("mc2")},
                        apis={"svc": _Service()})
    return rep, tmp / "rep"


def _terminal(report) -> str:
    from facepriv.cli import audit as cli_audit, common

    buf = io.StringIO()
    saved = cli_audit.out_console, common.out_console
    cli_audit.out_console = common.out_console = Console(file=buf, width=300, color_system=None)
    try:
        cli_audit.print_summary(report)
    finally:
        cli_audit.out_console, common.out_console = saved
    return buf.getvalue()


def test_report_json_read_back_is_written_again_byte_for_byte(audited):
    rep, out = audited
    text = (out / "report.json").read_text()
    loaded = AuditReport.from_json(json.loads(text))
    assert json.dumps(loaded.to_json(), indent=1) == text
    typed = AuditReport.from_json(rep)
    assert typed.to_json() == rep and list(typed.to_json()) == list(rep)
    assert typed.models["mc"].dodging.by_protocol["other-photos"].n == rep["models"]["mc"]["dodging"]["by_protocol"][
        "other-photos"]["n"]
    assert typed.images[0].models["mc"].faces == rep["images"][0]["models"]["mc"]["faces"]


def test_writers_give_the_same_files_from_the_typed_report_and_from_its_json(audited, tmp_path):
    rep, out = audited
    loaded = json.loads((out / "report.json").read_text())
    files = {}
    for name, report in (("typed", AuditReport.from_json(loaded)), ("dict", loaded)):
        write_reports(report, tmp_path / "again")
        files[name] = {f: (tmp_path / "again" / f).read_bytes() for f in ("report.json", "report.csv", "report.html")}
    assert files["typed"] == files["dict"]
    assert files["dict"]["report.csv"] == (out / "report.csv").read_bytes()
    assert csv_rows(AuditReport.from_json(rep)) == csv_rows(rep)


def test_terminal_and_json_summaries_read_the_same_from_the_typed_report(audited):
    rep, _ = audited
    typed = AuditReport.from_json(rep)
    assert summarize(typed) == summarize(rep)
    assert summarize(typed)["apis"]["svc"]["cache_hits"] == 1
    text = _terminal(typed)
    assert text == _terminal(rep)
    assert verdict_line(typed) in text
    assert f"svc: {rep['apis']['svc']['calls']} requests sent, 1 cache hits, 0 retries" in text


def test_psr_rows_list_dodging_protocols_then_impersonation(audited):
    rep, _ = audited
    rows = psr_rows(AuditReport.from_json(rep).models["mc"])
    assert [label for label, _, _ in rows] == ["dodging, all", "  other photos", "  self-verif.", "impersonation"]
    label, imp, before = rows[-1]
    assert imp.n == rep["models"]["mc"]["impersonation"]["n"] and before.psr == rep["models"]["mc"]["impersonation"][
        "before"]["psr"]


def test_keys_the_schema_does_not_know_are_kept_in_place():
    d = {"facepriv_report": "audit", "version": 1, "models": {"m": {
        "dodging": {"n": 2, "psr": {"1e-3": 0.5}, "mean_similarity": 0.4, "future": [1, 2]}, "amp": None}},
        "apis": {"svc": {"provider": {"name": "svc"}, "calls": 3, "cache_hits": 1, "throttled": 2, "status": "ok",
                         "stopped": None, "first_error": None}},
        "later": {"kept": True}}
    report = AuditReport.from_json(d)
    assert report.models["m"].dodging.extra == {"future": [1, 2]} and report.extra == {"later": {"kept": True}}
    assert report.apis["svc"].counter("throttled") == 2 and report.apis["svc"].counter("retries") == 0
    again = report.to_json()
    assert again["models"]["m"]["dodging"] == {"n": 2, "psr": {"1e-3": 0.5}, "mean_similarity": 0.4,
                                               "future": [1, 2]}
    assert list(again["apis"]["svc"]) == ["provider", "calls", "cache_hits", "throttled", "status", "stopped",
                                          "first_error"]
    assert again["later"] == {"kept": True}


def test_optional_fields_are_left_out_while_unset_and_kept_when_none_is_a_value():
    entry = ModelResult(dodging=Dodging(n=1, psr={"1e-3": 1.0}), amp=None).to_json()
    assert "impersonation" not in entry and "identification" not in entry and "roc" not in entry
    assert entry["amp"] is None and entry["dodging"] == {"n": 1, "psr": {"1e-3": 1.0}, "mean_similarity": None}
    api = ApiResult(calls=1, status="failed", first_error=None).to_json()
    assert api == {"calls": 1, "status": "failed", "stopped": None, "first_error": None}
    th = ThresholdEntry.from_json({"1e-3": 0.3, "source": "file t.json", "kind": "file"})
    assert th.at("1e-3") == 0.3 and th.at("1e-1") is None
    assert th.to_json() == {"1e-1": None, "1e-2": None, "1e-3": 0.3, "source": "file t.json", "kind": "file"}


def test_a_partial_report_reads_with_defaults():
    report = as_report({"errors": [{"file": "x.jpg", "error": "unreadable"}]})
    assert report.errors[0]["file"] == "x.jpg" and report.models == {} and report.apis is None
    assert exit_code(report) == 1
    assert verdict_line(report) == ("No verdict: no face-recognition model judged the faces; 1 image(s) could "
                                    "not be audited")
    assert as_report(report) is report
    row = ImageRow.from_json({"protected": "a.png", "original": "a.png", "identity": None, "identity_source": None,
                              "error": "no face detected in the original", "models": {}})
    assert row.to_json() == {"protected": "a.png", "original": "a.png", "identity": None, "identity_source": None,
                             "error": "no face detected in the original", "models": {}}
