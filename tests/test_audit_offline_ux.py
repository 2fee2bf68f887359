"""facepriv audit, first experience: offline, LPIPS and FID are left out with one short line
saying how to enable them (no connection errors, no traceback); the report opens with one
verdict line and folds its notes away. Fake recognisers on solid-colour crops, no network."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from torch import nn

from facepriv.audit import AuditConfig, run_audit
from facepriv.audit.metrics import QualityMeter
from facepriv.audit.report import quality_notes, report_notes, summarize, verdict_line

CONNECTION_TEXT = re.compile(r"HTTPSConnectionPool|Max retries|NameResolution|Traceback|could not download")


@pytest.fixture(autouse=True)
def _private(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRIV_HOME", str(tmp_path / "home"))  # an empty model cache
    monkeypatch.setenv("FACEPRIV_THRESHOLDS_DIR", str(tmp_path / "thresholds"))
    monkeypatch.delenv("FACEPRIV_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _no_network(monkeypatch, calls: list | None = None):
    """Every HTTP request fails the way it does without a network (a long urllib3 message)."""
    msg = ("HTTPSConnectionPool(host='download.pytorch.org', port=443): Max retries exceeded with url: "
           "/models/alexnet-owt-7be5be79.pth (Caused by NameResolutionError(\"HTTPSConnection(host="
           "'download.pytorch.org', port=443): Failed to resolve 'download.pytorch.org' ([Errno -2] Name or "
           "service not known)\"))")

    def get(url, *a, **kw):
        if calls is not None:
            calls.append(url)
        raise requests.ConnectionError(msg)

    monkeypatch.setattr(requests, "get", get)
    monkeypatch.setattr(requests.Session, "get", lambda self, url, *a, **kw: get(url))


class MeanColour(nn.Module):
    """Embedding = mean RGB of the crop's centre: solid-colour crops have known similarities."""

    def __init__(self, name: str, thresholds: dict):
        super().__init__()
        self.spec = type("S", (), {"template": "arcface-112", "input_size": (112, 112), "metric": "cosine",
                                   "name": name, "thresholds": dict(thresholds), "threshold_source": "test",
                                   "architecture": "mean colour", "runtime": "torch"})()

    def forward(self, x):
        return x[:, :, 28:84, 28:84].mean((2, 3))


def _solid(path: Path, rgb) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((112, 112, 3), rgb, dtype=np.uint8)).save(path)


@pytest.fixture
def crops(tmp_path):
    """Four aligned crops; the protected copies of a.png and b.png changed colour (their
    similarity to the original drops to 0.41), c.png and d.png are left as they were."""
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    for name, rgb in (("a.png", (200, 40, 40)), ("b.png", (40, 200, 40)), ("c.png", (40, 40, 200)),
                      ("d.png", (90, 90, 90))):
        _solid(orig / name, rgb)
    _solid(prot / "a.png", (40, 200, 40))
    _solid(prot / "b.png", (200, 40, 40))
    _solid(prot / "c.png", (40, 40, 200))
    _solid(prot / "d.png", (90, 90, 90))
    return prot, orig


def _audit(crops, out, **kw):
    prot, orig = crops
    recognizers = kw.pop("recognizers", None) or {
        "strict": MeanColour("strict", {"1e-1": 0.7, "1e-2": 0.8, "1e-3": 0.9})}  # a and b protected
    cfg = AuditConfig(protected=prot, original=orig, models=list(recognizers), aligned=True, progress=False,
                      device="cpu", out=out, **kw)
    return run_audit(cfg, recognizers=recognizers)


# ------------------------------------------------------------------------------ quality offline
def test_offline_switch_leaves_lpips_and_fid_out_with_one_line_and_no_download(monkeypatch):
    calls = []
    _no_network(monkeypatch, calls)
    monkeypatch.setenv("FACEPRIV_OFFLINE", "1")
    s = QualityMeter(lpips="lpips-alex", fid=True).summary()
    assert calls == []  # nothing was even tried
    assert s["lpips"] is None and s["fid"] is None
    line = s["left_out"]["line"]
    assert line == ("LPIPS and FID left out: their weights are not cached and the offline switch is on; fetch with "
                    "`facepriv models fetch lpips-alex fid-inception` or pass --lpips none --no-fid")
    assert s["left_out"]["why"] == ["offline"] and s["left_out"]["models"] == ["lpips-alex", "fid-inception"]
    # the per-metric reasons stay short and say how to get the weights
    for k, name in (("lpips", "lpips-alex"), ("fid", "fid-inception")):
        assert len(s["unavailable"][k]) < 160 and f"facepriv models fetch {name}" in s["unavailable"][k]


def test_a_failed_download_is_left_out_in_one_short_line_without_connection_text(monkeypatch):
    calls = []
    _no_network(monkeypatch, calls)
    s = QualityMeter(lpips="lpips-squeeze", fid=True).summary()
    assert len(calls) == 1  # FID is not tried once the LPIPS download showed there is no network
    assert s["left_out"]["why"] == ["no-network"]
    line = s["left_out"]["line"]
    assert line.startswith("LPIPS and FID left out: their weights are not cached and could not be downloaded")
    assert "facepriv models fetch lpips-squeeze fid-inception" in line and len(line) < 200
    for text in (line, *s["unavailable"].values()):
        assert not CONNECTION_TEXT.search(text), text
    assert "NameResolutionError" in s["left_out"]["detail"]["lpips"]  # the registry's error, kept in the JSON


def test_no_download_flag_names_itself_and_a_single_metric_reads_right(monkeypatch):
    _no_network(monkeypatch)
    s = QualityMeter(lpips=None, fid=True, download=False).summary()
    assert s["left_out"]["line"] == ("FID left out: its weights are not cached and downloads are off (--no-download); "
                                     "fetch with `facepriv models fetch fid-inception` or pass --no-fid")
    assert s["unavailable"]["lpips"] == "disabled"


def test_other_failures_to_load_are_reported_not_left_out(monkeypatch):
    """Broken weights are not "offline": the metric's own error is reported, and no fetch is advised."""
    import facepriv.models as models

    real = models.availability

    def cached(spec):
        a = real(spec)
        return type(a)(True, "cached", None, Path("/nowhere"))

    def broken(name, **kw):
        raise RuntimeError("unexpected key in state_dict")

    monkeypatch.setattr(models, "availability", cached)
    monkeypatch.setattr(models, "create_model", broken)
    s = QualityMeter(lpips="lpips-alex", fid=False).summary()
    assert "left_out" not in s and "unexpected key in state_dict" in s["unavailable"]["lpips"]


def test_an_offline_audit_prints_nothing_about_connections_and_notes_the_left_out_metrics_once(
        tmp_path, crops, monkeypatch, capsys):
    _no_network(monkeypatch)
    rep = _audit(crops, tmp_path / "rep", quality=True)  # default LPIPS + FID, downloads allowed
    printed = capsys.readouterr()
    assert not CONNECTION_TEXT.search(printed.out + printed.err)
    notes = quality_notes(rep)
    about = [n for n in notes if "LPIPS" in n or "FID" in n or "lpips" in n or "fid" in n]
    assert len(about) == 1 and about[0].startswith("LPIPS and FID left out") and len(about[0]) < 200
    assert notes == [n for n in notes if not CONNECTION_TEXT.search(n)]
    assert summarize(rep)["quality"]["left_out"]["line"] == about[0]


# ------------------------------------------------------------------------------ verdict
def test_verdict_names_the_weakest_model_and_counts_faces(tmp_path, crops):
    rep = _audit(crops, tmp_path / "rep", quality=False)
    # strict: a and b fall below 0.8 (cos 0.41), c and d are the same colour: 2 of 4 faces hold
    assert rep["models"]["strict"]["dodging"]["psr_faces"]["1e-2"] == 0.5
    assert verdict_line(rep) == ("Protection holds for 2 of 4 faces (50 %) against strict at FAR 1e-2")
    lenient = MeanColour("lenient", {"1e-1": 0.1, "1e-2": 0.2, "1e-3": 0.3})  # no face falls below 0.2
    rep2 = _audit(crops, tmp_path / "rep2", quality=False,
                  recognizers={"strict": MeanColour("strict", {"1e-1": 0.7, "1e-2": 0.8, "1e-3": 0.9}),
                               "lenient": lenient})
    assert verdict_line(rep2) == ("Protection holds for 0 of 4 faces (0 %) against lenient at FAR 1e-2 "
                                  "(the weakest of 2 models; strict 50 %)")
    assert summarize(rep2)["verdict"] == verdict_line(rep2)


def test_verdict_says_when_the_threshold_is_only_a_default_or_missing(tmp_path, crops):
    default = {"d": MeanColour("d", {"default": 0.8})}
    rep = _audit(crops, tmp_path / "rep", quality=False, recognizers=default)
    assert verdict_line(rep) == "Protection holds for 2 of 4 faces (50 %) against d at its default threshold, " \
                                "not FAR-calibrated"
    none = {"n": MeanColour("n", {})}
    rep = _audit(crops, tmp_path / "rep2", quality=False, recognizers=none)
    assert verdict_line(rep).startswith("No verdict at FAR 1e-2: no threshold is known for n")
    rep["errors"] = [{"file": "x.png", "error": "unreadable"}]
    assert verdict_line(rep).endswith("; 1 image(s) could not be audited")


# ------------------------------------------------------------------------------ html
def test_html_opens_with_the_verdict_and_folds_the_notes(tmp_path, crops, monkeypatch):
    _no_network(monkeypatch)
    rep = _audit(crops, tmp_path / "rep", quality=True)
    page = (tmp_path / "rep" / "report.html").read_text()
    body = page[page.index("<body>") + len("<body>"):].lstrip()
    verdict = verdict_line(rep)
    assert body.startswith(f"<h1 class='verdict'>{verdict}</h1>")
    # the notes (protocol notes, the left-out quality metrics) are in one <details> block
    notes = report_notes(rep)
    assert notes and any(n.startswith("LPIPS and FID left out") for n in notes)
    m = re.search(r"<details class='notes'><summary>(\d+) note\(s\) and warning\(s\)</summary>(.*?)</details>",
                  page, re.S)
    assert m and int(m.group(1)) == len(notes)
    assert m.group(2).count("<div class='note'>") == len(notes) and "LPIPS and FID left out" in m.group(2)
    assert page.index("<details") < page.index("<h2>")  # right under the verdict, before any section
    assert page.count("<div class='note'>") == len(notes)  # and nowhere else
    assert not CONNECTION_TEXT.search(page)
