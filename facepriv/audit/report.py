"""Audit reports: ``report.json`` (everything), ``report.csv`` (one row per image) and a
self-contained ``report.html`` (summary tables, similarity histograms against the thresholds,
ROC curves, and an original | protected | amplified-difference grid; every figure and
thumbnail is an embedded base64 PNG/JPEG, nothing is fetched from anywhere).

The HTML page and the terminal summary open with :func:`verdict_line` ("Protection holds for
37 of 40 faces (93 %) against sface at FAR 1e-2"); the notes and warnings
(:func:`report_notes`) follow it folded in one ``<details>`` block.

Every function here reads the typed report (:class:`~facepriv.audit.schema.AuditReport`);
each also takes a plain dict (a loaded report.json), read with ``AuditReport.from_json``.
Everything written passes through :func:`facepriv.core.secrets.redact`.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from ..core.io import atomic_write_bytes
from ..core.secrets import redact
from ..models.thresholds import FARS
from .schema import (AuditReport, Before, Dodging, ImageRow, Impersonation, ModelResult, QualitySummary, Rates, Roc,
                     as_report, json_of)

THUMB_SIDE = 224


def _fmt(v, pct: bool = False, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int | float):
        if isinstance(v, float) and math.isinf(v):
            return "∞"
        if isinstance(v, float) and math.isnan(v):
            return "nan"
        return f"{100 * v:.1f}%" if pct else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))
    return str(v)


def thresholds_seen_text(seen: dict | None, nd: int = 2) -> str:
    """``{"1e-3": [lo, hi], ...}`` -> ``"1e-3: 62.10–62.30, 1e-4: 69.1"`` (one value when lo == hi)."""
    if not seen:
        return "no thresholds (no score)"
    parts = []
    for k, v in seen.items():
        lo, hi = (v[0], v[-1]) if isinstance(v, list | tuple) and v else (v, v)
        parts.append(f"{k}: {_fmt(lo, nd=nd)}" if lo == hi else f"{k}: {_fmt(lo, nd=nd)}–{_fmt(hi, nd=nd)}")
    return ", ".join(parts)


def psnr_text(q: QualitySummary | Mapping) -> str:
    """PSNR mean with the count of identical pairs (infinite PSNR) it leaves out."""
    q = q if isinstance(q, QualitySummary) else QualitySummary.from_json(q)
    text = f"{_fmt(q.psnr, nd=2)} dB"
    n_id = q.n_identical or 0
    if n_id and q.psnr is not None and not (isinstance(q.psnr, float) and math.isinf(q.psnr)):
        text += f" (+ {n_id} identical pair(s), infinite PSNR, not in the mean)"
    elif n_id:
        text += f" ({n_id} identical pair(s))"
    return text


# ------------------------------------------------------------------------------ summary
PROTOCOL_LABELS = {"other-photos": "other photos", "self": "self-verif."}
#: the dodging row's label when only one protocol occurs (short: the terminal table fits 80 columns)
SINGLE_PROTOCOL_LABELS = {"other-photos": "dodging (others)", "self": "dodging (self)"}


PsrRow = tuple[str, Rates, Before | None]


def dodging_rows(d: Dodging | Mapping) -> list[PsrRow]:
    """The dodging rows a summary table shows: ``(label, stats, before)``. One row per protocol
    present (other photos: with its clean "before" over the same comparisons; self-verification
    has none), plus the headline over both when both are present. Reports written before the
    protocol split give the single headline row."""
    d = d if isinstance(d, Dodging) else Dodging.from_json(d)
    by = d.by_protocol
    if not by:
        return [("dodging", d, d.before)]
    present = [k for k in ("other-photos", "self") if by.get(k) is not None and by[k].n]
    rows: list[PsrRow] = []
    if len(present) > 1:
        rows.append(("dodging, all", d, None))
    for k in present:
        label = "  " + PROTOCOL_LABELS[k] if len(present) > 1 else SINGLE_PROTOCOL_LABELS[k]
        rows.append((label, by[k], d.before if k == "other-photos" else None))
    return rows or [("dodging", d, None)]


def psr_rows(entry: ModelResult) -> list[PsrRow]:
    """A model's rows in the PSR tables (terminal and HTML): :func:`dodging_rows`, then
    impersonation (with its clean "before") where it was measured."""
    rows = dodging_rows(entry.dodging)
    if entry.impersonation is not None:
        rows.append(("impersonation", entry.impersonation, entry.impersonation.before))
    return rows


def api_problems(report: AuditReport | Mapping) -> list[str]:
    """One line per online provider that stopped (a fatal error such as rejected credentials)
    or whose every pair failed; the reason is the adapter's own (already redacted) message."""
    out = []
    for name, a in (as_report(report).apis or {}).items():
        if a.status == "stopped":
            out.append(f"{name} stopped: {a.stopped or a.first_error or 'no reason given'}")
        elif a.status == "failed":
            out.append(f"{name}: all {a.pairs or 0} pair(s) failed: {a.first_error or 'no reason given'}")
    return redact(out)


def exit_code(report: AuditReport | Mapping) -> int:
    """The CLI's exit status for a finished audit: 1 when some image could not be audited or an
    online provider stopped / failed on every pair (see :func:`api_problems`), else 0."""
    report = as_report(report)
    return 1 if report.errors or api_problems(report) else 0


#: the false-accept rate the one-line verdict is given at
VERDICT_FAR = "1e-2"


def _pct0(v: float) -> str:
    return f"{100 * v:.0f} %"


def verdict_line(report: AuditReport | Mapping, far: str = VERDICT_FAR) -> str:
    """One line saying whether the protection holds, e.g. ``Protection holds for 37 of 40 faces
    (93 %) against sface at FAR 1e-2``.

    Per face (a face holds when none of its comparisons verifies: the per-face dodging PSR),
    against the weakest model that has a threshold at ``far`` (the others' rates in brackets);
    a model judged by its default operating threshold says so. Impersonation, images that could
    not be audited and failed online APIs are appended.
    """
    report = as_report(report)
    models, th = report.models, report.thresholds
    judged = []
    for m, e in models.items():
        rate, n = (e.dodging.psr_faces or {}).get(far), e.dodging.n_faces or 0
        if rate is not None and n:
            judged.append((float(rate), m, int(n)))
    tail = []
    n_err = len(report.errors or [])
    if n_err:
        tail.append(f"{n_err} image(s) could not be audited")
    problems = api_problems(report)
    if problems:
        tail.append(f"{len(problems)} online API(s) failed")
    if not judged:
        if not models:
            text = "No verdict: no face-recognition model judged the faces" + (
                " (see the online API results)" if report.apis else "")
        elif not any((e.dodging.n_faces or 0) for e in models.values()):
            text = "No verdict: no face was found in the original photos"
        else:
            names = ", ".join(models)
            text = (f"No verdict at FAR {far}: no threshold is known for {names} (run `facepriv audit calibrate` "
                    "on labelled pairs, or pass --thresholds)")
        return "; ".join([text, *tail])
    rate, m, n = min(judged, key=lambda t: (t[0], t[1]))
    held = int(round(rate * n))
    kind = th[m].kind if m in th else None
    at = "at its default threshold, not FAR-calibrated" if kind == "default" else f"at FAR {far}"
    text = f"Protection holds for {held} of {n} faces ({_pct0(rate)}) against {m} {at}"
    others = [(r, o) for r, o, _ in judged if o != m]
    if others:
        text += (f" (the weakest of {len(judged)} models; " + ", ".join(f"{o} {_pct0(r)}" for r, o in others) + ")")
    imp = models[m].impersonation or Impersonation()
    i_rate, i_n = (imp.psr_faces or {}).get(far), imp.n_faces or 0
    if i_rate is not None and i_n:
        text += f"; impersonation works for {int(round(float(i_rate) * i_n))} of {i_n} ({_pct0(float(i_rate))})"
    return "; ".join([text, *tail])


def quality_notes(report: AuditReport | Mapping) -> list[str]:
    """The quality section's notes: one line for the metrics left out for want of cached
    weights (:func:`facepriv.audit.metrics.left_out_line`), the other reasons a metric was not
    computed (not the ones the user switched off), and the PSNR / FID caveats."""
    q = as_report(report).quality
    left = q.left_out or {}
    out = [left["line"]] if left.get("line") else []
    for k, v in (q.unavailable or {}).items():
        if k in (left.get("metrics") or []) or str(v).startswith("disabled"):
            continue
        out.append(f"{k.upper() if k in ('lpips', 'fid') else k} not computed: {v}")
    for label, note in (("PSNR", q.psnr_note), ("FID", q.fid_note)):
        if note:
            out.append(f"{label}: {note}")
    return out


def report_notes(report: AuditReport | Mapping) -> list[str]:
    """Every note and warning of a report, in the order the HTML lists them under the verdict:
    the protocol notes, then quality, then utility."""
    report = as_report(report)
    notes = list(report.protocol_notes or [])
    notes += quality_notes(report)
    for k, v in ((report.utility.unavailable if report.utility else None) or {}).items():
        notes.append(f"utility: {k.replace('_', ' ')} not computed: {v}")
    return notes


#: what the summary keeps of each section
SUMMARY_KEYS = {
    "dodging": ("n", "psr", "psr_faces", "mean_similarity", "not_detected", "protocol", "by_protocol"),
    "impersonation": ("n", "psr", "psr_faces", "mean_similarity", "excluded"),
    "api": ("dodging", "impersonation", "calls", "cache_hits", "retries", "errors", "status", "stopped",
            "first_error", "pairs", "failed_pairs"),
}


def _keep(section, keys: tuple[str, ...]) -> dict:
    """The JSON of ``section`` limited to ``keys`` (in the section's order)."""
    return {k: v for k, v in section.to_json().items() if k in keys}


def summarize(report: AuditReport | Mapping) -> dict:
    """The compact summary the CLI prints (and ``--json`` emits)."""
    report = as_report(report)
    out = {"verdict": verdict_line(report), "models": {}, "thresholds": json_of(report.thresholds),
           "quality": report.quality.to_json(), "faces": report.faces.to_json(), "counts": report.counts.to_json(),
           "errors": len(report.errors), "notes": report.protocol_notes}
    for m, e in report.models.items():
        s = {"dodging": _keep(e.dodging, SUMMARY_KEYS["dodging"]),
             "dodging_before": e.dodging.before.psr if e.dodging.before is not None else None}
        if e.impersonation is not None:
            s["impersonation"] = _keep(e.impersonation, SUMMARY_KEYS["impersonation"])
        if e.identification is not None:
            s["identification"] = e.identification.to_json()
        if e.roc is not None:
            s["auc"] = {k: getattr(e.roc, k).auc for k in ("before", "after") if getattr(e.roc, k) is not None}
        out["models"][m] = s
    if report.utility is not None:
        out["utility"] = report.utility.to_json()
    if report.apis is not None:
        out["apis"] = {n: _keep(a, SUMMARY_KEYS["api"]) for n, a in report.apis.items()}
        out["api_problems"] = api_problems(report)
    if report.outputs is not None:
        out["outputs"] = report.outputs
    return redact(out)


# ------------------------------------------------------------------------------ csv
def csv_rows(report: AuditReport | Mapping) -> tuple[list[str], list[dict]]:
    """report.csv: its columns, and one row per image (None: empty cell)."""
    report = as_report(report)
    models = list(report.models)
    apis = list(report.apis or {})
    cols = ["protected", "original", "identity", "identity_source", "error", "faces_original", "faces_protected",
            "faces_not_detected", "psnr", "ssim", "lpips"]
    for m in models:
        cols += [f"{m}:protocol", f"{m}:dodging_mean", f"{m}:dodging_max"] + [f"{m}:protected@{f}" for f in FARS]
        cols += [f"{m}:impersonation_max", f"{m}:rank_before", f"{m}:rank_after"]
    if report.utility is not None:
        cols += ["expression_kept", "expression_tv"]
    for a in apis:
        cols += [f"{a}:dodging_score", f"{a}:impersonation_score", f"{a}:error"]
    return cols, [_csv_row(r, cols[:8], models, apis) for r in report.images]


def _csv_row(r: ImageRow, first: list[str], models: list[str], apis: list[str]) -> dict:
    row = {c: getattr(r, c) for c in first}
    q = r.quality or {}
    row.update(psnr=q.get("psnr"), ssim=q.get("ssim"), lpips=q.get("lpips"))
    for m in models:
        mr = r.models.get(m)
        if mr is None:
            continue
        f0 = mr.faces[0] if mr.faces else {}
        dod = [s for f in mr.faces for s in f.get("dodging", []) if s is not None]
        imp = [s for f in mr.faces for s in f.get("impersonation", []) if s is not None]
        row[f"{m}:protocol"] = f0.get("protocol")
        row[f"{m}:dodging_mean"] = float(np.mean(dod)) if dod else None
        row[f"{m}:dodging_max"] = mr.dodging_max
        for f in FARS:
            row[f"{m}:protected@{f}"] = mr.protected_at.get(f)
        row[f"{m}:impersonation_max"] = max(imp) if imp else None
        row[f"{m}:rank_before"] = f0.get("rank_before")
        row[f"{m}:rank_after"] = f0.get("rank_after")
    # the primary face's (face 0) expression, empty when face 0 has none (not detected after
    # protection); reports written before faces were numbered have no "face": position 0
    ex = (r.utility or {}).get("expression") or []
    f0 = next((e for e in ex if e.get("face", 0 if e is ex[0] else None) == 0), None)
    if f0 is not None:
        row["expression_kept"] = f0["expression_kept"]
        row["expression_tv"] = f0["expression_tv"]
    for a in apis:
        calls = (r.apis or {}).get(a, [])
        d = [c for c in calls if c["kind"] == "dodging"]
        i = [c for c in calls if c["kind"] == "impersonation"]
        row[f"{a}:dodging_score"] = d[0]["score"] if d else None
        row[f"{a}:impersonation_score"] = i[0]["score"] if i else None
        row[f"{a}:error"] = "; ".join(c["error"] for c in calls if c.get("error")) or None
    return row


def write_csv(report: AuditReport | Mapping, path: Path) -> Path:
    cols, rows = csv_rows(report)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else (round(v, 6) if isinstance(v, float) else v)) for k, v in r.items()})
    return atomic_write_bytes(path, redact(buf.getvalue()).encode())


# ------------------------------------------------------------------------------ figures
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _histogram(model: str, scores: dict, thresholds: dict) -> str | None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if "dodging_after_other_photos" in scores:  # before and after over the same other-photo comparisons
        series = [("clean, other photos (before)", scores.get("dodging_before"), "tab:blue"),
                  ("protected, other photos (after)", scores.get("dodging_after_other_photos"), "tab:red"),
                  ("protected, self-verification (no before)", scores.get("dodging_self"), "tab:orange"),
                  ("impersonation after", scores.get("impersonation_after"), "tab:green")]
    else:  # a report written before the protocol split
        series = [("clean (before)", scores.get("dodging_before"), "tab:blue"),
                  ("protected (after)", scores.get("dodging_after"), "tab:red"),
                  ("impersonation after", scores.get("impersonation_after"), "tab:green")]
    series = [(n, [v for v in vals if v is not None], c) for n, vals, c in series if vals]
    series = [s for s in series if s[1]]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    allv = np.concatenate([np.asarray(v, dtype=float) for _, v, _ in series])
    tvals = [thresholds.get(f) for f in FARS if thresholds.get(f) is not None]
    lo, hi = float(min([allv.min(), *tvals])), float(max([allv.max(), *tvals]))
    bins = np.linspace(lo - 1e-6, hi + 1e-6, 31)
    for name, vals, color in series:
        ax.hist(vals, bins=bins, alpha=0.5, label=f"{name} (n={len(vals)})", color=color)
    for f, style in zip(FARS, ("--", "-.", ":")):
        if thresholds.get(f) is not None:
            ax.axvline(thresholds[f], color="k", linestyle=style, linewidth=1, label=f"threshold FAR {f}")
    ax.set_title(f"{model}: similarity to clean photos (higher = same person)", fontsize=9)
    ax.set_xlabel("similarity", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
    return _png(fig)


def _roc_figure(model: str, roc: Roc | None, calibration: dict | None) -> str | None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    curves = []
    if roc is not None:
        n_gen = f", {roc.n_genuine} other-photo pairs" if roc.n_genuine is not None else ""
        for key, color in (("before", "tab:blue"), ("after", "tab:red")):
            curve = getattr(roc, key)
            if curve is not None:
                curves.append((f"audit {key} protection (AUC {curve.auc:.3f}{n_gen})", curve.fpr, curve.tpr, color))
    if calibration and calibration.get("roc"):
        c = calibration["roc"]
        curves.append((f"calibration pairs (AUC {calibration.get('auc', float('nan')):.3f})", c["fpr"], c["tpr"], "tab:gray"))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    for name, fpr, tpr, color in curves:
        ax.plot(np.maximum(np.asarray(fpr, dtype=float), 1e-4), tpr, label=name, color=color)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_ylim(0, 1.01)
    for f in FARS:
        ax.axvline(float(f), color="k", linewidth=0.5, linestyle=":")
    ax.set_xlabel("false accept rate", fontsize=8)
    ax.set_ylabel("true accept rate", fontsize=8)
    ax.set_title(f"{model}: ROC", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="lower right")
    return _png(fig)


def _thumbs(protected: Path, original: Path) -> tuple[str, str, str, float] | None:
    """Base64 JPEG thumbnails of original, protected and |difference| amplified; and the gain."""
    from PIL import Image

    from ..core.io import load_image

    try:
        a = load_image(original).rgb.astype(np.float32)
        b = load_image(protected).rgb.astype(np.float32)
    except Exception:  # noqa: BLE001 - a thumbnail is never worth failing the report for
        return None
    if a.shape != b.shape:
        b = np.asarray(Image.fromarray(b.astype(np.uint8)).resize((a.shape[1], a.shape[0]), Image.BILINEAR),
                       dtype=np.float32)
    diff = np.abs(b - a)
    p99 = float(np.percentile(diff, 99.5)) if diff.size else 0.0
    gain = min(50.0, 255.0 / p99) if p99 > 0 else 1.0
    amp = np.clip(diff * gain, 0, 255).astype(np.uint8)

    def enc(arr: np.ndarray) -> str:
        im = Image.fromarray(arr.astype(np.uint8))
        im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        return base64.b64encode(buf.getvalue()).decode()

    return enc(a), enc(b), enc(amp), gain


# ------------------------------------------------------------------------------ html
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.6em 0 1.2em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}.note{background:#fff4d6;border-left:4px solid #e0a800;padding:.4em .8em;margin:.3em 0}
.err{color:#b00020}.grid td{vertical-align:top;text-align:center;font-size:11px}.ok{color:#0a7d27}.bad{color:#b00020}
img{max-width:100%}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
h1.verdict{font-size:1.45em;margin:.2em 0 .3em 0}p.meta{color:#555;margin-top:0}
details.notes{margin:.6em 0 1em 0}details.notes summary{cursor:pointer;color:#8a6d00}
"""


def _table(headers: list[str], rows: list[list], left: int = 1) -> str:
    h = "".join(f"<th class='l'>{html.escape(c)}</th>" if i < left else f"<th>{html.escape(c)}</th>"
                for i, c in enumerate(headers))
    body = ""
    for r in rows:
        body += "<tr>" + "".join(f"<td class='l'>{html.escape(str(c))}</td>" if i < left else f"<td>{html.escape(str(c))}</td>"
                                 for i, c in enumerate(r)) + "</tr>"
    return f"<table><tr>{h}</tr>{body}</table>"


def _figures_table(cells: dict[str, object]) -> str:
    """A one-row table of figures: ``{header: value}``."""
    return _table(list(cells), [list(cells.values())], left=0)


def write_html(report: AuditReport | Mapping, path: Path, cfg=None) -> Path:
    """report.html (self-contained); ``cfg`` (the audit's) says where the photos are, else the
    report's own ``config``."""
    report = as_report(report)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>facepriv audit</title><style>{_CSS}</style>"
             "</head><body>", f"<h1 class='verdict'>{html.escape(verdict_line(report))}</h1>"]
    c = report.config
    parts.append(f"<p class='meta'>facepriv audit report · {html.escape(report.created)} · protected "
                 f"<code>{html.escape(str(c.get('protected')))}</code>"
                 f" vs original <code>{html.escape(str(c.get('original')))}</code> · "
                 f"{report.counts.evaluated} of {report.counts.pairs} images evaluated"
                 f" · facepriv {html.escape(str(report.versions.facepriv))}</p>")
    notes = report_notes(report)
    if notes:
        parts.append(f"<details class='notes'><summary>{len(notes)} note(s) and warning(s)</summary>"
                     + "".join(f"<div class='note'>{html.escape(n)}</div>" for n in notes) + "</details>")
    parts += _html_psr(report)
    parts += _html_quality(report)
    parts += _html_apis(report)
    parts += _html_figures(report)
    parts += _html_images(report, cfg)
    if report.errors:
        parts.append("<h2>Errors</h2><ul>" + "".join(
            f"<li>{html.escape(str(e.get('file')))}: {html.escape(str(e.get('error')))}</li>" for e in report.errors)
            + "</ul>")
    parts.append("<h2>Versions</h2><pre>" + html.escape(json.dumps(report.versions.to_json(), indent=1, default=str))
                 + "</pre>")
    parts.append("</body></html>")
    return atomic_write_bytes(path, redact("\n".join(parts)).encode())


def _psr_cells(stats: Rates | Before | None) -> str:
    """``a / b / c``: a PSR at each FAR (``n/a`` where there is none)."""
    if stats is None:
        return "n/a"
    return " / ".join(_fmt(stats.psr.get(f), pct=True) for f in FARS)


def _html_psr(report: AuditReport) -> Iterator[str]:
    """Thresholds, PSR per model and protocol, identification and face counts."""
    yield "<h2>Thresholds</h2>"
    trows = [[m, *[_fmt(t.at(f), nd=4) for f in FARS], t.source] for m, t in report.thresholds.items()]
    yield _table(["model", *[f"FAR {f}" for f in FARS], "source"], trows)

    # summary per model
    yield "<h2>Protection success rate (PSR) per model</h2>"
    srows = []
    for m, e in report.models.items():
        for label, d, before in psr_rows(e):
            imp = isinstance(d, Impersonation)
            srows.append([m, label.strip(), d.n, "–" if d.n_faces is None else d.n_faces,
                          *[_fmt(d.psr.get(f), pct=True) for f in FARS],
                          " / ".join(_fmt((d.psr_faces or {}).get(f), pct=True) for f in FARS), _psr_cells(before),
                          _fmt(d.mean_similarity), "" if imp else (d.not_detected or 0)])
    yield _table(["model", "protocol", "comparisons", "faces", *[f"PSR @ {f}" for f in FARS],
                  "per-face PSR @ " + " / ".join(FARS), "PSR before (clean, same comparisons)",
                  "mean similarity", "face not detected"], srows, left=2)
    yield ("<p>Dodging rows: <i>other photos</i> compares each protected face with other clean photos of the "
           "same person (its <i>before</i> is the same comparisons made with the clean original); "
           "<i>self-verif.</i> compares it with its own original (weaker; no <i>before</i>); <i>all</i> is the "
           "headline PSR over both. Per-face PSR: a face counts as protected when none of its comparisons "
           "verifies (impersonation: when one reaches the threshold).</p>")
    idrows = [[m, i.n, _fmt(i.rank1_before, pct=True), _fmt(i.rank1_after, pct=True), _fmt(i.rank5_before, pct=True),
               _fmt(i.rank5_after, pct=True)]
              for m, i in ((m, e.identification) for m, e in report.models.items()) if i is not None]
    if idrows:
        yield "<h3>Identification (gallery)</h3>"
        yield _table(["model", "probes", "rank-1 before", "rank-1 after", "rank-5 before", "rank-5 after"], idrows)
    f = report.faces
    yield (f"<p>Faces in originals: {f.original}; still detected after protection: {f.matched}; "
           f"not detected: {f.not_detected} (counted as protected for dodging); protected images "
           f"without any face: {f.images_no_face_after}.</p>")


def _html_quality(report: AuditReport) -> Iterator[str]:
    """Image quality and utility."""
    q = report.quality
    yield "<h2>Image quality (protected vs original)</h2>"
    yield _figures_table({
 "PSNR (dB)": _fmt(q.psnr, nd=2), "identical pairs (infinite PSNR, not in the mean)": q.n_identical or 0,
 "SSIM": _fmt(q.ssim, nd=4), "LPIPS": _fmt(q.lpips, nd=4), "FID": _fmt(q.fid, nd=2)})
    if quality_notes(report):
        yield ("<p>Notes on these figures (metrics left out, caveats): see the notes under the verdict "
               "at the top.</p>")
    u = report.utility
    if u is not None:
        yield "<h2>Utility</h2>"
        yield _figures_table({"face still detected": _fmt(u.face_detected_rate, pct=True),
                              "expression kept": _fmt(u.expression_kept_rate, pct=True),
                              "mean expression TV distance": _fmt(u.expression_tv_mean)})
        if u.face_detection:
            yield (f"<p>Face still detected: {html.escape(str(u.face_detection))}, over the "
                   f"{u.faces_judged or 0} crop(s) whose original face it found "
                   f"({u.faces_left_out or 0} left out).</p>")


def _html_apis(report: AuditReport) -> Iterator[str]:
    """The online services, where the audit used any."""
    if report.apis is not None:
        yield "<h2>Online APIs</h2>"
        for line in api_problems(report):
            yield f"<div class='note err'>{html.escape(line)}</div>"
        arows = []
        for n, a in report.apis.items():
            for kind, s in (("dodging", a.dodging), ("impersonation", a.impersonation)):
                if s is not None:
                    arows.append([n, kind, s.n, ", ".join(f"{k}: {_fmt(v, pct=True)}" for k, v in s.psr.items()),
                                  thresholds_seen_text(s.thresholds_seen), _fmt(s.mean_score, nd=2),
                                  s.no_face_protected, s.errors, s.cached or 0, a.status or ""])
        yield _table(["API", "protocol", "pairs", "PSR at the provider's thresholds",
                      "thresholds used (min–max seen)", "mean score", "no face (protected)", "errors", "cached",
                      "status"], arows, left=2)
        for n, a in report.apis.items():
            if a.first_error and a.status not in ("stopped", "failed"):
                yield f"<div class='note'>{html.escape(n)}: first error: {html.escape(str(a.first_error))}</div>"


def _html_figures(report: AuditReport) -> Iterator[str]:
    """Per model: the similarity histograms and the ROC."""
    yield "<h2>Similarity distributions and ROC</h2>"
    for m, e in report.models.items():
        th = report.thresholds[m].values if m in report.thresholds else {}
        hist = _histogram(m, report.scores.get(m, {}), th)
        roc = _roc_figure(m, e.roc, (report.calibration or {}).get(m))
        yield "<div>"
        if hist:
            yield f"<img alt='{html.escape(m)} histogram' src='data:image/png;base64,{hist}'>"
        if roc:
            yield f"<img alt='{html.escape(m)} ROC' src='data:image/png;base64,{roc}'>"
        yield "</div>"
        if e.roc is not None and e.roc.n_genuine is not None:
            yield (f"<p>{html.escape(m)}: ROC before and after over the same {e.roc.n_genuine} other-photo "
                   f"comparison(s) against {e.roc.n_impostor} impostor pair(s); "
                   f"{e.roc.self_left_out or 0} self-verification comparison(s) left out (they have no "
                   "before; the histogram shows them separately).</p>")


def _html_images(report: AuditReport, cfg) -> Iterator[str]:
    """The per-image grid: thumbnails and each image's details (at most ``html_max_images``)."""
    c = report.config
    images = report.images
    limit = getattr(cfg, "html_max_images", 60) if cfg is not None else int(c.get("html_max_images") or 60)
    prot_root = Path(cfg.protected) if cfg is not None else (Path(c["protected"]) if c.get("protected") else None)
    orig_root = Path(cfg.original) if cfg is not None else (Path(c["original"]) if c.get("original") else None)
    yield f"<h2>Images ({min(limit, len(images))} of {len(images)})</h2>"
    yield ("<table class='grid'><tr><th>original</th><th>protected</th><th>|difference| amplified</th>"
           "<th class='l'>details</th></tr>")
    models = list(report.models)
    for r in images[:limit]:
        yield _html_image_row(r, models, prot_root, orig_root)
    yield "</table>"


def _html_image_row(r: ImageRow, models: list[str], prot_root: Path | None, orig_root: Path | None) -> str:
    th = None
    if prot_root is not None and orig_root is not None:
        prot = prot_root if prot_root.is_file() else prot_root / r.protected
        orig = orig_root if orig_root.is_file() else orig_root / r.original
        th = _thumbs(prot, orig)
    cells = ["<td>–</td>"] * 3
    if th:
        a, b, d, gain = th
        cells = [f"<td><img src='data:image/jpeg;base64,{a}'></td>", f"<td><img src='data:image/jpeg;base64,{b}'></td>",
                 f"<td><img src='data:image/jpeg;base64,{d}'><br>×{gain:.1f}</td>"]
    det = [f"<b>{html.escape(r.protected)}</b>"]
    if r.identity:
        det.append(f"identity: {html.escape(str(r.identity))} ({html.escape(str(r.identity_source))})")
    if r.error:
        det.append(f"<span class='err'>{html.escape(r.error)}</span>")
    for m in models:
        mr = r.models.get(m)
        if mr is None:
            continue
        pa = mr.protected_at.get("1e-3")
        if pa is None:  # the model has no threshold: nothing can be decided
            verdict = "<span>no threshold @1e-3</span>"
        else:
            verdict = f"<span class='{'ok' if pa else 'bad'}'>{'protected' if pa else 'recognised'} @1e-3</span>"
        det.append(f"{html.escape(m)}: max sim {_fmt(mr.dodging_max)} · {verdict}")
    qq = r.quality or {}
    if qq:
        det.append(f"PSNR {_fmt(qq.get('psnr'), nd=2)} dB · SSIM {_fmt(qq.get('ssim'), nd=4)}")
    if r.resized:
        det.append(html.escape(r.resized))
    for x in r.impersonation_excluded or []:
        det.append(f"impersonation target {html.escape(str(x.get('target')))} left out "
                   f"({html.escape(str(x.get('reason')))})")
    return "<tr>" + "".join(cells) + f"<td class='l'>{'<br>'.join(det)}</td></tr>"


def json_safe(obj):
    """Strict JSON: non-finite floats become the strings "inf" / "-inf" / "nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_reports(report: AuditReport | Mapping, out: str | Path, cfg=None) -> dict[str, Path]:
    """Write report.json, report.csv and report.html under ``out``."""
    report = as_report(report)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "csv": out / "report.csv", "html": out / "report.html"}
    full = dataclasses.replace(report, outputs={k: str(v) for k, v in paths.items()})
    atomic_write_bytes(paths["json"], json.dumps(json_safe(redact(full.to_json())), indent=1, default=str,
                                                 allow_nan=False).encode())
    write_csv(report, paths["csv"])
    write_html(report, paths["html"], cfg)
    return paths
