"""Calibration: FAR thresholds, ROC / AUC / EER and best accuracy computed from genuine and
impostor scores, usage errors without one kind of pair, `facepriv audit calibrate` end to end
and what a stored calibration records.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from facepriv.audit import FARS, calibrate_scores, resolve_thresholds
from facepriv.models.thresholds import auc_score, best_accuracy, calibration_mismatch, eer, far_threshold, roc_curve
from facepriv.core.errors import ConfigError

from .helpers import MeanColour, solid


def test_far_threshold_is_the_lowest_threshold_within_the_far():
    rng = np.random.default_rng(0)
    imp = rng.normal(0, 1, 5000)
    for far in (1e-1, 1e-2, 1e-3):
        t, note = far_threshold(imp, far)
        assert note is None
        assert (imp >= t).mean() <= far
        # any lower threshold at the next impostor score would exceed the FAR
        below = np.sort(imp)[::-1][int(far * len(imp))]
        assert (imp >= below).mean() > far and below < t
    t, note = far_threshold(imp[:200], 1e-3)
    assert t > imp[:200].max() and "only 200 impostor pairs" in note


def test_roc_auc_eer_on_known_scores():
    gen = [0.9, 0.8, 0.7, 0.4]
    imp = [0.5, 0.3, 0.2, 0.1]
    fpr, tpr, thr = roc_curve(gen, imp)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1 and thr[0] == np.inf
    # AUC = P(genuine > impostor) = 15/16 (only 0.4 < 0.5 is mis-ordered)
    assert auc_score(fpr, tpr) == pytest.approx(15 / 16)
    rate, t = eer(gen, imp)
    assert rate == pytest.approx(0.25) and 0.4 <= t <= 0.5
    rng = np.random.default_rng(1)
    g, i = rng.normal(2, 1, 400), rng.normal(0, 1, 600)
    mw = (g[:, None] > i[None, :]).mean()
    f, tp, _ = roc_curve(g, i)
    assert auc_score(f, tp) == pytest.approx(mw, abs=1e-9)
    cal = calibrate_scores(g, i, default_threshold=1.0)
    assert set(cal["thresholds"]) == set(FARS)
    assert cal["thresholds"]["1e-1"] < cal["thresholds"]["1e-2"] < cal["thresholds"]["1e-3"]
    assert cal["accuracy_at_default"] == pytest.approx(((g >= 1).sum() + (i < 1).sum()) / 1000)
    assert cal["best_accuracy"] >= cal["accuracy_at_default"]
    assert 0.1 < cal["eer"] < 0.2 and "note" in cal  # 600 impostors cannot resolve FAR 1e-3


def _best_accuracy_quadratic(genuine, impostor):
    """The previous O(n^2) definition, kept here as the reference."""
    g, i = np.asarray(genuine, dtype=np.float64), np.asarray(impostor, dtype=np.float64)
    cand = np.unique(np.concatenate([g, i]))
    mids = np.r_[cand[0] - 1e-6, (cand[:-1] + cand[1:]) / 2, cand[-1] + 1e-6]
    accs = np.array([((g >= t).sum() + (i < t).sum()) / (len(g) + len(i)) for t in mids])
    j = int(np.argmax(accs))
    return float(accs[j]), float(mids[j])


def test_best_accuracy_matches_the_quadratic_definition_with_ties():
    rng = np.random.default_rng(7)
    cases = [([0.5], [0.5]), ([1.0], []), ([], [0.2, 0.2]), ([0.3, 0.3, 0.3], [0.3, 0.3]), ([0.9, 0.1], [0.5])]
    for k in range(60):
        ng, ni = int(rng.integers(1, 120)), int(rng.integers(1, 160))
        g, i = rng.normal(1.0, 1.0, ng), rng.normal(0.0, 1.0, ni)
        if k % 2 == 0:  # many ties, within and across the two sets
            g, i = np.round(g, 1), np.round(i, 1)
        if k % 5 == 0:
            i[: ni // 2] = g[0]
        cases.append((g, i))
    for g, i in cases:
        assert best_accuracy(g, i) == _best_accuracy_quadratic(g, i)
    # large inputs are fine (the quadratic version takes minutes on this)
    g, i = rng.normal(1, 1, 60_000), rng.normal(0, 1, 90_000)
    acc, t = best_accuracy(g, i)
    assert acc == ((g >= t).sum() + (i < t).sum()) / (len(g) + len(i)) and 0.6 < acc < 0.8


def test_calibration_without_impostor_or_genuine_pairs_is_a_usage_error():
    with pytest.raises(ConfigError, match=r"1 genuine and 0 impostor.*different people \(label different\)"):
        calibrate_scores([0.9], [])
    with pytest.raises(ConfigError, match=r"0 genuine and 2 impostor.*same person \(label same\)"):
        calibrate_scores([], [0.1, 0.2])


# ------------------------------------------------------------------------------ audit calibrate
def test_cli_calibrate_with_only_same_pairs_exits_2_with_a_plain_message(tmp_path, monkeypatch):
    from facepriv.audit import runner
    from facepriv.cli import app

    root = tmp_path / "imgs"
    solid(root / "a1.png", (200, 40, 40))
    solid(root / "a2.png", (190, 60, 50))
    solid(root / "b1.png", (40, 40, 200))
    pairs = root / "pairs.csv"
    pairs.write_text("a1.png,a2.png,same\na2.png,a1.png,same\n")
    monkeypatch.setattr(runner, "load_recognizers", lambda names, device: {"mean-colour": MeanColour()})
    res = CliRunner().invoke(app, ["-q", "audit", "calibrate", "--pairs", str(pairs), "--models", "mean-colour",
                                   "--aligned", "--no-store"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "error: calibration needs both genuine and impostor pairs" in text
    assert "pairs.csv (2 same / 0 different pairs) gave 2 genuine and 0 impostor" in text
    assert "ValueError" not in text and "Traceback" not in text
    # pairs left out (here: an unreadable photo) are counted in the message
    (root / "bad.png").write_bytes(b"not an image")
    pairs.write_text("a1.png,a2.png,same\na1.png,bad.png,different\n")
    res = CliRunner().invoke(app, ["-q", "audit", "calibrate", "--pairs", str(pairs), "--models", "mean-colour",
                                   "--aligned", "--no-store"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "(1 same / 1 different pairs (0 pair(s) left out without a detected face, 1 unreadable)) gave 1 genuine " \
           "and 0 impostor" in text


def test_stored_calibration_records_detector_and_alignment(tmp_path):
    from facepriv.audit import CalibrationConfig, run_calibration

    root = tmp_path / "imgs"
    for n, c in {"a1": (200, 40, 40), "a2": (190, 60, 50), "b1": (40, 40, 200), "c1": (40, 200, 40)}.items():
        solid(root / f"{n}.png", c)
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


@pytest.mark.realmodels
@pytest.mark.slow
def test_cli_calibrate_then_audit_uses_the_calibration(tmp_path, photo_sets):
    from typer.testing import CliRunner

    from facepriv.cli import app

    orig, gal = photo_sets
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("file_x,file_y,label\nobama.jpg,obama2.jpg,same\nobama.jpg,biden.jpg,different\n"
                     "obama2.jpg,biden.jpg,different\n")
    runner = CliRunner()
    res = runner.invoke(app, ["audit", "calibrate", "--pairs", str(pairs), "--root", str(orig), "--models",
                              "dlib-resnet", "--out", str(tmp_path / "cal.json")])
    assert res.exit_code == 0, res.output
    assert "dlib-resnet" in res.stdout and "AUC" in res.stdout
    stored = json.loads((tmp_path / "thresholds" / "dlib-resnet.json").read_text())
    assert stored["n_genuine"] == 1 and stored["n_impostor"] == 2 and stored["auc"] == 1.0
    assert json.loads((tmp_path / "cal.json").read_text())["models"]["dlib-resnet"]["thresholds"]
    # dlib-resnet ships FAR thresholds calibrated on LFW; a calibration of the user's own comes first
    res = runner.invoke(app, ["--json", "audit", "--protected", str(orig), "--original", str(orig), "--models",
                              "dlib-resnet", "--gallery", str(gal), "--out", str(tmp_path / "rep"), "--no-fid",
                              "--lpips", "none"])
    assert res.exit_code == 0, res.output
    # strict JSON: the infinite PSNR of this clean-vs-clean run is the string "inf", never Infinity
    summary = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert summary["quality"]["psnr"] == "inf" and summary["quality"]["n_identical"] == 3
    th = summary["thresholds"]["dlib-resnet"]
    assert th["kind"] == "calibrated" and th["1e-3"] == pytest.approx(stored["thresholds"]["1e-3"])
    assert summary["models"]["dlib-resnet"]["dodging"]["psr"]["1e-3"] == 0.0
    # human output and usage errors
    res = runner.invoke(app, ["audit", "--protected", str(orig), "--original", str(orig), "--models", "dlib-resnet",
                              "--out", str(tmp_path / "rep2"), "--no-quality"])
    assert res.exit_code == 0 and "dodging" in res.stdout and "calibrated" in res.stdout
    assert runner.invoke(app, ["audit", "--protected", str(orig)]).exit_code == 2
    assert runner.invoke(app, ["audit", "--protected", str(orig), "--original", str(tmp_path / "nope"),
                               "--models", "sface"]).exit_code == 2
    assert runner.invoke(app, ["audit", "--protected", str(orig), "--original", str(orig), "--models",
                               "mtcnn"]).exit_code == 2
