"""Where the audit's thresholds come from: published protocol values, the ones a model ships, a
stored calibration, a thresholds file (with its notes, and a note when it lacks a model), a
default operating point (said loudly), or none at all; calibrations reused under other
conditions are flagged.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from facepriv.audit import FARS, calibrate_scores, resolve_thresholds, run_audit
from facepriv.models.thresholds import calibration_mismatch, calibration_record, store_calibration
from facepriv.core.errors import ConfigError

from .helpers import MeanColour, audit_cfg, solid


def test_threshold_sources_in_order(tmp_path):
    from facepriv.models import get_spec

    # published protocol thresholds
    t = resolve_thresholds("facenet-vggface2")
    assert t.kind == "protocol" and t.values["1e-3"] == pytest.approx(0.591191) and "protocol" in t.source
    # the offline default recognisers ship FAR thresholds calibrated on LFW (spec values, taken as is)
    sface = get_spec("sface")
    t = resolve_thresholds("sface")
    assert t.kind == "protocol" and t.values == {f: sface.thresholds[f] for f in FARS} and "LFW" in t.source
    # a model with only a default operating point (here a stand-in spec) falls back to it loudly
    toy = type("S", (), {"name": "toy-fr", "thresholds": {"default": 0.363}, "threshold_source": "toy default"})()
    t = resolve_thresholds("toy-fr", spec=toy)
    assert t.kind == "default" and set(t.values.values()) == {0.363} and "NOT FAR-calibrated" in t.note
    # a stored calibration is used automatically
    rec = {"model": "toy-fr", "thresholds": {"1e-1": 0.2, "1e-2": 0.3, "1e-3": 0.4}, "source": "calibrated on x.csv"}
    store_calibration("toy-fr", rec)
    t = resolve_thresholds("toy-fr", spec=toy)
    assert t.kind == "calibrated" and t.values == rec["thresholds"] and t.source == "calibrated on x.csv"
    assert resolve_thresholds("facenet-vggface2").kind == "protocol"  # protocol values win over calibration
    # an explicit file overrides everything
    f = tmp_path / "th.json"
    f.write_text(json.dumps({"sface": {"1e-1": 0.1, "1e-2": 0.11, "1e-3": 0.12},
                             "facenet-vggface2": {"default": 0.5}}))
    assert resolve_thresholds("sface", file=f).values["1e-3"] == 0.12
    t = resolve_thresholds("facenet-vggface2", file=f, spec=get_spec("facenet-vggface2"))
    assert t.kind == "file" and set(t.values.values()) == {0.5}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sface": {"1e-1": 0.1}}))
    with pytest.raises(ConfigError, match="1e-2"):
        resolve_thresholds("sface", file=bad)


def test_model_without_any_threshold_still_reports_similarities(monkeypatch, tmp_path):
    """No protocol, calibration or default: the audit goes on, success rates are None, never invented."""
    from facepriv.audit.metrics import psr
    from facepriv.models.thresholds import resolve_thresholds
    from facepriv.models import get_spec

    monkeypatch.setenv("FACEPRIV_THRESHOLDS_DIR", str(tmp_path))
    spec = dataclasses.replace(get_spec("arcface-r100"), name="no-threshold-fr", thresholds={})
    ts = resolve_thresholds("no-threshold-fr", spec=spec)
    assert ts.kind == "none" and all(v is None for v in ts.values.values()) and "calibrate" in ts.note
    assert psr([0.1, 0.9, None], ts.values) == {"1e-1": None, "1e-2": None, "1e-3": None}


# ------------------------------------------------------------------------------ thresholds files
def _calibration_file(tmp_path: Path, model: str, single: bool) -> Path:
    cal = calibrate_scores([0.9, 0.8, 0.85], [0.1, 0.2], default_threshold=0.5)
    assert "only 2 impostor pairs" in cal["note"]
    rec = calibration_record(model, cal, pairs_file=tmp_path / "pairs.csv")
    f = tmp_path / ("one.json" if single else "all.json")
    f.write_text(json.dumps(rec if single else {"models": {model: rec}}))
    return f


@pytest.mark.parametrize("single", [True, False])
def test_thresholds_file_keeps_the_calibration_note(tmp_path, single):
    f = _calibration_file(tmp_path, "mean-colour", single)
    ts = resolve_thresholds("mean-colour", spec=MeanColour().spec, file=f)
    assert ts.kind == "file" and "only 2 impostor pairs" in ts.note and set(ts.values) == set(FARS)
    assert ts.to_json()["note"] == ts.note


def test_thresholds_file_without_the_model_says_which_source_is_used(tmp_path):
    from facepriv.models.thresholds import _read_threshold_file

    f = tmp_path / "th_other.json"
    f.write_text(json.dumps({"dlib-resnet": {"1e-1": -0.7, "1e-2": -0.6, "1e-3": -0.5}}))
    toy = MeanColour("toy-fr")
    toy.spec.thresholds = {"default": 0.363}  # no FAR values -> its default threshold
    ts = resolve_thresholds("toy-fr", spec=toy.spec, file=f)
    assert ts.kind == "default"
    assert ts.note.startswith("the thresholds file th_other.json has no entry for toy-fr (it has: dlib-resnet), so "
                              "the default thresholds are used instead (default:")
    assert "NOT FAR-calibrated" in ts.note  # the fallback's own warning is kept
    # the runner passes the parsed file as file_data too: same note
    same = resolve_thresholds("toy-fr", spec=toy.spec, file=f, file_data=_read_threshold_file(f))
    assert same.note == ts.note
    # sface ships FAR thresholds (calibrated on LFW): those are named instead
    sf = resolve_thresholds("sface", file=f)
    assert sf.kind == "protocol" and "so the protocol thresholds are used instead (protocol:" in sf.note
    # no thresholds at all for a model the file lacks: still said, and why
    none = resolve_thresholds("mean-colour", spec=MeanColour().spec, file=f)
    assert none.kind == "none" and "no entry for mean-colour" in none.note and "no thresholds are used" in none.note
    # a model the file has: no such note
    assert resolve_thresholds("dlib-resnet", file=f).note is None


def test_audit_with_thresholds_file_reports_both_notes(tmp_path):
    from facepriv.audit import AuditConfig, run_audit

    orig, prot = tmp_path / "orig", tmp_path / "prot"
    solid(orig / "a.png", (200, 40, 40))
    solid(prot / "a.png", (40, 40, 200))
    f = _calibration_file(tmp_path, "mean-colour", single=False)
    cfg = AuditConfig(protected=prot, original=orig, models=["mean-colour", "other-colour"], aligned=True,
                      quality=False, progress=False, device="cpu", thresholds=f)
    rep = run_audit(cfg, recognizers={"mean-colour": MeanColour(), "other-colour": MeanColour("other-colour")})
    notes = " | ".join(rep["protocol_notes"])
    assert "only 2 impostor pairs" in notes
    assert "the thresholds file all.json has no entry for other-colour" in notes
    assert rep["thresholds"]["mean-colour"]["kind"] == "file"


# ------------------------------------------------------------------------------ stored calibrations
def test_calibration_reused_under_another_mode_is_flagged(tmp_path):
    orig = tmp_path / "orig"
    solid(orig / "a.png", (120, 80, 60))
    rec = {"model": "mean-colour", "thresholds": {"1e-1": 0.5, "1e-2": 0.6, "1e-3": 0.7},
           "source": "calibrated on p.csv", "detector": "mtcnn", "aligned": False}
    store_calibration("mean-colour", rec)
    rep = run_audit(audit_cfg(orig, orig, aligned=True), recognizers={"mean-colour": MeanColour()})
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
