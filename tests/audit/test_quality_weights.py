"""A first run without the LPIPS / FID weights: offline (or with downloads off, or without a
network) the two metrics are left out with one short line saying how to enable them, never
connection errors or a traceback; other failures to load are reported as such. Fake
recognisers on solid-colour crops, no network.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from facepriv.audit.metrics import QualityMeter
from facepriv.audit.report import quality_notes, summarize

from .helpers import CONNECTION_TEXT, audit_crops, no_network

pytestmark = pytest.mark.usefixtures("online_empty_home")


def test_offline_switch_leaves_lpips_and_fid_out_with_one_line_and_no_download(monkeypatch):
    calls = []
    no_network(monkeypatch, calls)
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
    no_network(monkeypatch, calls)
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
    no_network(monkeypatch)
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
        tmp_path, colour_crops, monkeypatch, capsys):
    no_network(monkeypatch)
    rep = audit_crops(colour_crops, tmp_path / "rep", quality=True)  # default LPIPS + FID, downloads allowed
    printed = capsys.readouterr()
    assert not CONNECTION_TEXT.search(printed.out + printed.err)
    notes = quality_notes(rep)
    about = [n for n in notes if "LPIPS" in n or "FID" in n or "lpips" in n or "fid" in n]
    assert len(about) == 1 and about[0].startswith("LPIPS and FID left out") and len(about[0]) < 200
    assert notes == [n for n in notes if not CONNECTION_TEXT.search(n)]
    assert summarize(rep)["quality"]["left_out"]["line"] == about[0]
