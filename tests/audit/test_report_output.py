"""What the report says and how it is written: the one-line verdict, report.html (verdict first,
notes folded, "no threshold"), strict report.json, report.csv rows, and the model versions
and absolute paths recorded in it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from facepriv.audit import run_audit
from facepriv.audit.report import csv_rows, report_notes, summarize, verdict_line
from facepriv.audit.versions import model_versions

from .helpers import CONNECTION_TEXT, CalibratedMeanColour, MeanColour, audit_cfg, audit_crops, no_network, solid


@pytest.mark.usefixtures("online_empty_home")
def test_verdict_names_the_weakest_model_and_counts_faces(tmp_path, colour_crops):
    rep = audit_crops(colour_crops, tmp_path / "rep", quality=False)
    # strict: a and b fall below 0.8 (cos 0.41), c and d are the same colour: 2 of 4 faces hold
    assert rep["models"]["strict"]["dodging"]["psr_faces"]["1e-2"] == 0.5
    assert verdict_line(rep) == ("Protection holds for 2 of 4 faces (50 %) against strict at FAR 1e-2")
    lenient = MeanColour("lenient", {"1e-1": 0.1, "1e-2": 0.2, "1e-3": 0.3}, "test")  # no face falls below 0.2
    rep2 = audit_crops(colour_crops, tmp_path / "rep2", quality=False,
                       recognizers={"strict": MeanColour("strict", {"1e-1": 0.7, "1e-2": 0.8, "1e-3": 0.9}, "test"),
                                    "lenient": lenient})
    assert verdict_line(rep2) == ("Protection holds for 0 of 4 faces (0 %) against lenient at FAR 1e-2 "
                                  "(the weakest of 2 models; strict 50 %)")
    assert summarize(rep2)["verdict"] == verdict_line(rep2)


@pytest.mark.usefixtures("online_empty_home")
def test_verdict_says_when_the_threshold_is_only_a_default_or_missing(tmp_path, colour_crops):
    default = {"d": MeanColour("d", {"default": 0.8}, "test")}
    rep = audit_crops(colour_crops, tmp_path / "rep", quality=False, recognizers=default)
    assert verdict_line(rep) == "Protection holds for 2 of 4 faces (50 %) against d at its default threshold, " \
                                "not FAR-calibrated"
    none = {"n": MeanColour("n", {}, "test")}
    rep = audit_crops(colour_crops, tmp_path / "rep2", quality=False, recognizers=none)
    assert verdict_line(rep).startswith("No verdict at FAR 1e-2: no threshold is known for n")
    rep["errors"] = [{"file": "x.png", "error": "unreadable"}]
    assert verdict_line(rep).endswith("; 1 image(s) could not be audited")


@pytest.mark.usefixtures("online_empty_home")
def test_html_opens_with_the_verdict_and_folds_the_notes(tmp_path, colour_crops, monkeypatch):
    no_network(monkeypatch)
    rep = audit_crops(colour_crops, tmp_path / "rep", quality=True)
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


def test_html_says_no_threshold_and_json_is_strict(tmp_path, capsys):
    orig = tmp_path / "orig"
    solid(orig / "a.png", (120, 80, 60))
    solid(orig / "b.png", (60, 80, 120))
    out = tmp_path / "rep"
    rep = run_audit(audit_cfg(orig, orig, aligned=True, out=out, quality=True, lpips=None, fid=False),
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


def test_versions_name_quality_weights_and_config_paths_are_absolute(tmp_path, monkeypatch):
    class FakeMeter:  # what model_versions reads of a QualityMeter
        lpips, lpips_name, fid_model = object(), "lpips-alex", object()

    v = model_versions({"mean-colour": CalibratedMeanColour()}, "mtcnn", detector_role="faces of every photo",
                       quality_meter=FakeMeter())
    assert v["quality"]["lpips"]["name"] == "lpips-alex" and v["quality"]["fid"]["name"] == "fid-inception"
    for entry in (v["quality"]["lpips"], v["quality"]["fid"], v["detector_model"]):
        assert entry["weights"] and (entry["sha256"] or entry["version"])
    FakeMeter.lpips = None
    assert "lpips" not in model_versions({}, None, quality_meter=FakeMeter())["quality"]

    monkeypatch.chdir(tmp_path)
    solid(tmp_path / "o" / "a.png", (200, 30, 30))
    solid(tmp_path / "p" / "a.png", (190, 40, 30))
    (tmp_path / "ids.csv").write_text("a.png,alice\n")
    rep = run_audit(audit_cfg(Path("p"), Path("o"), aligned=True, identities=Path("ids.csv"), out=Path("rep")),
                    recognizers={"mean-colour": CalibratedMeanColour()})
    c = rep["config"]
    assert c["protected"] == str(tmp_path / "p") and c["original"] == str(tmp_path / "o")
    assert c["identities"] == str(tmp_path / "ids.csv") and c["out"] == str(tmp_path / "rep")
    written = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert written["config"]["protected"] == str(tmp_path / "p") and written["config"]["max_refs"] == 20
