"""Decision thresholds at fixed false-accept rates: where they come from, and calibration.

Convention everywhere: similarity "higher = same person" (Euclidean models: negative
distance), and a pair *verifies* when ``similarity >= threshold``.

Sources, in the order :func:`resolve_thresholds` uses them:

1. an explicit thresholds file (``--thresholds FILE``: ``{model: {"1e-3": t, ...}}`` or one
   calibration JSON written by :func:`calibrate`); a calibration's ``note`` (e.g. too few
   impostor pairs to resolve a FAR) comes with it, and a model the file has no entry for
   falls through to the next sources with a note saying so;
2. the published protocol thresholds in the model's registry spec (FAR 1e-1/1e-2/1e-3 of the
   TIP-IM / AMT-GAN / DiffAM protocol models);
3. thresholds calibrated earlier on your labelled clean pairs
   (``FACEPRIV_HOME/thresholds/<model>.json`` or ``$FACEPRIV_THRESHOLDS_DIR/<model>.json``,
   written by ``facepriv audit calibrate``);
3b. the FAR thresholds facepriv ships for its offline recognisers (calibrated on LFW's
   pairs.txt; ``ModelSpec.threshold_kind == "shipped"``): reported like protocol values, but a
   calibration of your own (3) takes precedence;
4. the spec's single "default" operating threshold for every FAR, with a loud note that it is
   not FAR-specific.

:func:`calibrate_scores` turns genuine/impostor scores into FAR thresholds (impostor score
quantiles), the ROC curve, AUC, EER and verification accuracy.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError

FARS = ("1e-1", "1e-2", "1e-3")


@dataclass
class ThresholdSet:
    """Thresholds of one model at each FAR, and where they came from."""

    model: str
    values: dict[str, float]
    source: str
    kind: str  # file | protocol | calibrated | default | none
    note: str | None = None
    calibration: dict | None = field(default=None, repr=False)  # stored calibration (ROC...) if any

    def to_json(self) -> dict:
        out: dict = {far: self.values.get(far) for far in FARS}
        out["source"] = self.source
        out["kind"] = self.kind
        if self.note:
            out["note"] = self.note
        return out


def thresholds_dir() -> Path:
    """Where calibrations are stored: ``FACEPRIV_THRESHOLDS_DIR`` or ``FACEPRIV_HOME/thresholds``."""
    env = os.environ.get("FACEPRIV_THRESHOLDS_DIR")
    if env:
        return Path(env).expanduser()
    from .hub import home

    return home() / "thresholds"


def _safe_name(model: str) -> str:
    return "".join(c if (c.isalnum() or c in "-_.") else "_" for c in model)


def calibrated_path(model: str) -> Path:
    return thresholds_dir() / f"{_safe_name(model)}.json"


def load_calibrated(model: str) -> dict | None:
    p = calibrated_path(model)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "thresholds" in data else None


def store_calibration(model: str, calibration: dict, path: str | Path | None = None) -> Path:
    """Write a calibration JSON (atomically) to ``path`` or ``FACEPRIV_HOME/thresholds/<model>.json``."""
    from ..core.io import atomic_write_bytes

    dst = Path(path) if path is not None else calibrated_path(model)
    return atomic_write_bytes(dst, json.dumps(calibration, indent=1).encode())


def _read_threshold_file(path: Path) -> dict[str, dict]:
    """model -> {"thresholds": {...}, ...} from a thresholds file (several formats accepted)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read thresholds file {path}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"thresholds file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"thresholds file {path}: expected a JSON object")
    if "model" in data and "thresholds" in data:  # one calibration file
        return {data["model"]: data}
    if "models" in data and isinstance(data["models"], dict):  # several calibrations
        data = data["models"]
    out = {}
    for model, val in data.items():
        if not isinstance(val, dict):
            raise ConfigError(f"thresholds file {path}: {model}: expected an object of FAR -> threshold")
        out[model] = val if "thresholds" in val else {"thresholds": val}
    return out


def _file_entry(model: str, entry: dict, file: str | Path | None) -> ThresholdSet:
    """The thresholds of ``model`` from its entry in a thresholds file (and the entry's note)."""
    label = Path(file).name if file else "?"
    raw = entry.get("thresholds")
    if not isinstance(raw, dict):
        raise ConfigError(f"thresholds file {label}: {model}: expected an object of FAR -> threshold")
    try:
        vals = {k: float(v) for k, v in raw.items() if k in FARS or k == "default"}
    except (TypeError, ValueError):
        raise ConfigError(f"thresholds file {label}: {model}: every threshold must be a number") from None
    if "default" in vals and not any(k in vals for k in FARS):
        vals = dict.fromkeys(FARS, vals["default"])
    missing = [f for f in FARS if f not in vals]
    if missing:
        raise ConfigError(f"thresholds file {file}: {model} has no threshold for FAR {', '.join(missing)}")
    note = entry.get("note") if isinstance(entry.get("note"), str) and entry.get("note") else None
    return ThresholdSet(model, {f: vals[f] for f in FARS},
                        f"file {label}" + (f" ({entry['source']})" if entry.get("source") else ""), "file",
                        note=note, calibration=entry if "roc" in entry else None)


def resolve_thresholds(model: str, *, spec=None, file: str | Path | None = None,
                       file_data: dict | None = None) -> ThresholdSet:
    """The thresholds to use for ``model`` (see the module docstring for the order).

    An entry of the thresholds file keeps its calibration's ``note`` (e.g. too few impostor
    pairs to resolve a FAR). A thresholds file without an entry for ``model`` is not an error:
    the next source is used, with a note saying so.
    """
    if file is not None and file_data is None:
        file_data = _read_threshold_file(Path(file))
    if file_data and model in file_data:
        return _file_entry(model, file_data[model], file)
    ts = _builtin_thresholds(model, spec)
    if file is not None or file_data is not None:
        label = f"the thresholds file {Path(file).name}" if file is not None else "the thresholds file"
        names = sorted(file_data or ())
        listed = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") or "none"
        used = "no thresholds are" if ts.kind == "none" else f"the {ts.kind} thresholds are"
        missing = f"{label} has no entry for {model} (it has: {listed}), so {used} used instead ({ts.source})"
        ts.note = missing + (f"; {ts.note}" if ts.note else "")
    return ts


def _builtin_thresholds(model: str, spec=None) -> ThresholdSet:
    """Sources 2-4 of the module docstring (protocol, stored calibration, default), or none."""
    if spec is None:
        from . import get_spec

        spec = get_spec(model)
    th = dict(getattr(spec, "thresholds", {}) or {})
    cal = load_calibrated(model)
    shipped = getattr(spec, "threshold_kind", "protocol") == "shipped"
    if all(f in th for f in FARS) and not (shipped and cal is not None):
        note = None
        if cal is not None:
            note = (f"a stored calibration of {model} ({calibrated_path(model)}) is not used: the published protocol "
                    "thresholds take precedence; pass it with --thresholds FILE to use it instead")
        return ThresholdSet(model, {f: float(th[f]) for f in FARS},
                            f"protocol: {spec.threshold_source or 'published'}", "protocol", note=note)
    if cal is not None:
        return ThresholdSet(model, {f: float(cal["thresholds"][f]) for f in FARS},
                            cal.get("source") or f"calibrated ({calibrated_path(model)})", "calibrated",
                            note=cal.get("note"), calibration=cal)
    if "default" in th:
        t = float(th["default"])
        return ThresholdSet(
            model, dict.fromkeys(FARS, t), f"default: {spec.threshold_source or 'model default'}", "default",
            note=(f"NOT FAR-calibrated: {model} has no protocol thresholds and no calibration, so its single "
                  f"default operating threshold {t:g} is used for every FAR. Run `facepriv audit calibrate "
                  f"--pairs PAIRS.csv --models {model}` on labelled clean pairs for real FAR thresholds."))
    # No threshold at all: similarities are still measured and reported, success rates are not.
    return ThresholdSet(
        model, dict.fromkeys(FARS), "none", "none",
        note=(f"NO THRESHOLDS: {model} has no protocol values, calibration or default, so its protection "
              f"success rates cannot be computed (similarities are still reported). Run `facepriv audit "
              f"calibrate --pairs PAIRS.csv --models {model}` or pass --thresholds FILE."))


def calibration_mismatch(ts: ThresholdSet, *, detector: str | None, aligned: bool,
                         aligned_template: str | None = None) -> str | None:
    """A note when a calibration is reused with another detector or alignment mode than the one
    it was computed with (its thresholds then describe other score distributions)."""
    cal = ts.calibration
    if not cal or ts.kind not in ("calibrated", "file"):
        return None
    if "aligned" not in cal and "detector" not in cal:
        return (f"the calibration of {ts.model} does not record the detector or alignment mode it was computed "
                "with; re-run `facepriv audit calibrate` if they differ from this audit's")
    was_aligned = bool(cal["aligned"]) if "aligned" in cal else cal.get("detector") is None
    diffs = []
    if was_aligned != bool(aligned):
        diffs.append(f"{'pre-aligned crops' if was_aligned else 'whole photos'} there, "
                     f"{'pre-aligned crops' if aligned else 'whole photos'} here")
    elif aligned and cal.get("aligned_template") and aligned_template and cal["aligned_template"] != aligned_template:
        diffs.append(f"crops aligned to {cal['aligned_template']} there, to {aligned_template} here")
    elif not aligned and cal.get("detector") != detector:
        diffs.append(f"detector {cal.get('detector')} there, {detector} here")
    if not diffs:
        return None
    return (f"the calibration of {ts.model} was computed under other conditions ({'; '.join(diffs)}): its FAR "
            "thresholds may not hold for this audit; re-run `facepriv audit calibrate` with the same options")


# ------------------------------------------------------------------------------ calibration
def roc_curve(genuine: Sequence[float], impostor: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of "verified iff score >= t": (fpr, tpr, thresholds), thresholds descending.

    Starts at (0, 0) with threshold +inf and ends at (1, 1).
    """
    g = np.asarray(genuine, dtype=np.float64)
    i = np.asarray(impostor, dtype=np.float64)
    if len(g) == 0 or len(i) == 0:
        raise ValueError("an ROC needs at least one genuine and one impostor score")
    scores = np.concatenate([g, i])
    labels = np.concatenate([np.ones(len(g)), np.zeros(len(i))])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    distinct = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tps = np.cumsum(labels)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / len(g)]
    fpr = np.r_[0.0, fps / len(i)]
    thr = np.r_[np.inf, scores[distinct]]
    return fpr, tpr, thr


def auc_score(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def eer(genuine: Sequence[float], impostor: Sequence[float]) -> tuple[float, float]:
    """Equal error rate and its threshold (linear interpolation where FAR and FRR cross)."""
    fpr, tpr, thr = roc_curve(genuine, impostor)
    fnr = 1 - tpr
    diff = fpr - fnr  # increases along the curve (fpr up, fnr down)
    k = int(np.argmax(diff >= 0))
    if k == 0:
        return float(fpr[0]), float(thr[1] if len(thr) > 1 else thr[0])
    d0, d1 = diff[k - 1], diff[k]
    w = 0.0 if d1 == d0 else -d0 / (d1 - d0)
    rate = float(fpr[k - 1] + w * (fpr[k] - fpr[k - 1]))
    t0 = thr[k - 1] if np.isfinite(thr[k - 1]) else thr[k]
    return rate, float(t0 + w * (thr[k] - t0))


def far_threshold(impostor: Sequence[float], far: float) -> tuple[float, str | None]:
    """Lowest threshold whose false-accept rate on ``impostor`` is at most ``far``.

    With n impostor scores sorted high to low, at most k = floor(far * n) may reach the
    threshold: it is placed midway between the k-th and (k+1)-th highest scores (just above
    the highest when k = 0). Returns (threshold, note); the note says when n is too small to
    resolve ``far``.
    """
    s = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    n = len(s)
    if n == 0:
        raise ValueError("no impostor scores")
    k = int(math.floor(far * n + 1e-9))
    note = None
    if k == 0:
        t = float(np.nextafter(s[0], np.inf))
        if far * n < 1:
            note = (f"only {n} impostor pairs: FAR {far:g} needs at least {math.ceil(1 / far)}; the threshold is "
                    "just above the highest impostor score (observed FAR 0, true FAR not resolved)")
        return t, note
    if k >= n:
        return float(np.nextafter(s[-1], -np.inf)), None
    hi, lo = s[k - 1], s[k]
    t = float((hi + lo) / 2) if hi > lo else float(np.nextafter(lo, np.inf))
    return t, note


def accuracy_at(genuine: np.ndarray, impostor: np.ndarray, t: float) -> float:
    return float(((genuine >= t).sum() + (impostor < t).sum()) / (len(genuine) + len(impostor)))


def best_accuracy(genuine: Sequence[float], impostor: Sequence[float]) -> tuple[float, float]:
    """Best verification accuracy over all thresholds, and that threshold (midpoint between scores).

    The candidates are the midpoints between consecutive distinct scores plus one threshold below
    and one above them all; the first best candidate (lowest threshold) wins. Counting with
    binary search on the sorted scores makes this O(n log n).
    """
    g = np.sort(np.asarray(genuine, dtype=np.float64))
    i = np.sort(np.asarray(impostor, dtype=np.float64))
    cand = np.unique(np.concatenate([g, i]))
    mids = np.r_[cand[0] - 1e-6, (cand[:-1] + cand[1:]) / 2, cand[-1] + 1e-6]
    accepted = len(g) - np.searchsorted(g, mids, side="left")  # genuine >= t
    rejected = np.searchsorted(i, mids, side="left")  # impostor < t
    accs = (accepted + rejected) / (len(g) + len(i))
    j = int(np.argmax(accs))
    return float(accs[j]), float(mids[j])


def _downsample_roc(fpr, tpr, thr, max_points: int = 400) -> dict:
    n = len(fpr)
    idx = np.unique(np.r_[np.linspace(0, n - 1, min(n, max_points)).round().astype(int), n - 1])
    return {"fpr": [round(float(v), 6) for v in fpr[idx]], "tpr": [round(float(v), 6) for v in tpr[idx]],
            "threshold": [None if not np.isfinite(t) else round(float(t), 6) for t in thr[idx]]}


def missing_pairs_message(n_genuine: int, n_impostor: int, where: str = "the pairs") -> str:
    """Why a calibration cannot be computed: it needs both genuine and impostor scores."""
    lacking = [what for what, n in (("two photos of the same person (label same)", n_genuine),
                                    ("photos of two different people (label different)", n_impostor)) if n == 0]
    return (f"calibration needs both genuine and impostor pairs, but {where} gave {n_genuine} genuine and "
            f"{n_impostor} impostor pair(s) with a face in both photos: add pairs of {' and pairs of '.join(lacking)}")


def calibrate_scores(genuine: Sequence[float], impostor: Sequence[float], *,
                     default_threshold: float | None = None, fars: Sequence[str] = FARS) -> dict:
    """FAR thresholds, ROC, AUC, EER and accuracy from clean genuine / impostor similarity scores."""
    g = np.asarray(genuine, dtype=np.float64)
    i = np.asarray(impostor, dtype=np.float64)
    if len(g) == 0 or len(i) == 0:
        raise ConfigError(missing_pairs_message(len(g), len(i)))
    fpr, tpr, thr = roc_curve(g, i)
    thresholds, notes, tar = {}, [], {}
    for far in fars:
        t, note = far_threshold(i, float(far))
        thresholds[far] = t
        tar[far] = float((g >= t).mean())
        if note:
            notes.append(note)
    rate, t_eer = eer(g, i)
    acc, t_acc = best_accuracy(g, i)
    out = {
        "thresholds": thresholds,
        "tar_at_far": tar,
        "n_genuine": int(len(g)), "n_impostor": int(len(i)),
        "auc": auc_score(fpr, tpr), "eer": rate, "eer_threshold": t_eer,
        "best_accuracy": acc, "best_threshold": t_acc,
        "genuine_mean": float(g.mean()), "impostor_mean": float(i.mean()),
        "roc": _downsample_roc(fpr, tpr, thr),
    }
    if default_threshold is not None:
        out["default_threshold"] = float(default_threshold)
        out["accuracy_at_default"] = accuracy_at(g, i, float(default_threshold))
    if notes:
        out["note"] = notes[-1] if len(set(notes)) == 1 else "; ".join(dict.fromkeys(notes))
    return out


def calibration_record(model: str, scores: dict, *, pairs_file: str | Path | None, spec=None,
                       extra: dict | None = None) -> dict:
    """A storable calibration: scores summary + provenance (which pairs, model, when)."""
    from .. import __version__

    src = f"calibrated on {Path(pairs_file).name if pairs_file else 'pairs'} " \
          f"({scores['n_genuine']} genuine / {scores['n_impostor']} impostor pairs, {time.strftime('%Y-%m-%d')})"
    rec = {"model": model, "source": src, "pairs_file": str(pairs_file) if pairs_file else None,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "facepriv_version": __version__,
           "metric": getattr(spec, "metric", None), **scores}
    if extra:
        rec.update(extra)
    return rec
