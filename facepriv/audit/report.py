"""Audit reports: ``report.json`` (everything), ``report.csv`` (one row per image) and a
self-contained ``report.html`` (summary tables, similarity histograms against the thresholds,
ROC curves, and an original | protected | amplified-difference grid; every figure and
thumbnail is an embedded base64 PNG/JPEG, nothing is fetched from anywhere).

The HTML page and the terminal summary open with :func:`verdict_line` ("Protection holds for
37 of 40 faces (93 %) against sface at FAR 1e-2"); the notes and warnings
(:func:`report_notes`) follow it folded in one ``<details>`` block.

Everything written passes through :func:`facepriv.core.secrets.redact`.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from ..core.io import atomic_write_bytes
from ..core.secrets import redact
from ..models.thresholds import FARS

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


def psnr_text(q: dict) -> str:
    """PSNR mean with the count of identical pairs (infinite PSNR) it leaves out."""
    text = f"{_fmt(q.get('psnr'), nd=2)} dB"
    n_id = q.get("n_identical") or 0
    if n_id and q.get("psnr") is not None and not (isinstance(q.get("psnr"), float) and math.isinf(q["psnr"])):
        text += f" (+ {n_id} identical pair(s), infinite PSNR, not in the mean)"
    elif n_id:
        text += f" ({n_id} identical pair(s))"
    return text


# ------------------------------------------------------------------------------ summary
PROTOCOL_LABELS = {"other-photos": "other photos", "self": "self-verif."}
#: the dodging row's label when only one protocol occurs (short: the terminal table fits 80 columns)
SINGLE_PROTOCOL_LABELS = {"other-photos": "dodging (others)", "self": "dodging (self)"}


def dodging_rows(d: dict) -> list[tuple[str, dict, dict | None]]:
    """The dodging rows a summary table shows: ``(label, stats, before)``. One row per protocol
    present (other photos: with its clean "before" over the same comparisons; self-verification
    has none), plus the headline over both when both are present. Reports written before the
    protocol split give the single headline row."""
    by = d.get("by_protocol")
    if not by:
        return [("dodging", d, d.get("before"))]
    present = [k for k in ("other-photos", "self") if (by.get(k) or {}).get("n")]
    rows: list[tuple[str, dict, dict | None]] = []
    if len(present) > 1:
        rows.append(("dodging, all", d, None))
    for k in present:
        label = "  " + PROTOCOL_LABELS[k] if len(present) > 1 else SINGLE_PROTOCOL_LABELS[k]
        rows.append((label, by[k], d.get("before") if k == "other-photos" else None))
    return rows or [("dodging", d, None)]


def api_problems(report: dict) -> list[str]:
    """One line per online provider that stopped (a fatal error such as rejected credentials)
    or whose every pair failed; the reason is the adapter's own (already redacted) message."""
    out = []
    for name, a in (report.get("apis") or {}).items():
        status = a.get("status")
        if status == "stopped":
            out.append(f"{name} stopped: {a.get('stopped') or a.get('first_error') or 'no reason given'}")
        elif status == "failed":
            out.append(f"{name}: all {a.get('pairs', 0)} pair(s) failed: {a.get('first_error') or 'no reason given'}")
    return redact(out)


def exit_code(report: dict) -> int:
    """The CLI's exit status for a finished audit: 1 when some image could not be audited or an
    online provider stopped / failed on every pair (see :func:`api_problems`), else 0."""
    return 1 if report.get("errors") or api_problems(report) else 0


#: the false-accept rate the one-line verdict is given at
VERDICT_FAR = "1e-2"


def _pct0(v: float) -> str:
    return f"{100 * v:.0f} %"


def verdict_line(report: dict, far: str = VERDICT_FAR) -> str:
    """One line saying whether the protection holds, e.g. ``Protection holds for 37 of 40 faces
    (93 %) against sface at FAR 1e-2``.

    Per face (a face holds when none of its comparisons verifies: the per-face dodging PSR),
    against the weakest model that has a threshold at ``far`` (the others' rates in brackets);
    a model judged by its default operating threshold says so. Impersonation, images that could
    not be audited and failed online APIs are appended.
    """
    models = report.get("models") or {}
    th = report.get("thresholds") or {}
    judged = []
    for m, e in models.items():
        d = e.get("dodging") or {}
        rate, n = (d.get("psr_faces") or {}).get(far), d.get("n_faces") or 0
        if rate is not None and n:
            judged.append((float(rate), m, int(n)))
    tail = []
    n_err = len(report.get("errors") or [])
    if n_err:
        tail.append(f"{n_err} image(s) could not be audited")
    problems = api_problems(report)
    if problems:
        tail.append(f"{len(problems)} online API(s) failed")
    if not judged:
        if not models:
            text = "No verdict: no face-recognition model judged the faces" + (
                " (see the online API results)" if report.get("apis") else "")
        elif not any(((e.get("dodging") or {}).get("n_faces") or 0) for e in models.values()):
            text = "No verdict: no face was found in the original photos"
        else:
            names = ", ".join(models)
            text = (f"No verdict at FAR {far}: no threshold is known for {names} (run `facepriv audit calibrate` "
                    "on labelled pairs, or pass --thresholds)")
        return "; ".join([text, *tail])
    rate, m, n = min(judged, key=lambda t: (t[0], t[1]))
    held = int(round(rate * n))
    kind = (th.get(m) or {}).get("kind")
    at = "at its default threshold, not FAR-calibrated" if kind == "default" else f"at FAR {far}"
    text = f"Protection holds for {held} of {n} faces ({_pct0(rate)}) against {m} {at}"
    others = [(r, o) for r, o, _ in judged if o != m]
    if others:
        text += (f" (the weakest of {len(judged)} models; " + ", ".join(f"{o} {_pct0(r)}" for r, o in others) + ")")
    imp = (models[m].get("impersonation") or {})
    i_rate, i_n = (imp.get("psr_faces") or {}).get(far), imp.get("n_faces") or 0
    if i_rate is not None and i_n:
        text += f"; impersonation works for {int(round(float(i_rate) * i_n))} of {i_n} ({_pct0(float(i_rate))})"
    return "; ".join([text, *tail])


def quality_notes(report: dict) -> list[str]:
    """The quality section's notes: one line for the metrics left out for want of cached
    weights (:func:`facepriv.audit.metrics.left_out_line`), the other reasons a metric was not
    computed (not the ones the user switched off), and the PSNR / FID caveats."""
    q = report.get("quality") or {}
    left = (q.get("left_out") or {})
    out = [left["line"]] if left.get("line") else []
    for k, v in (q.get("unavailable") or {}).items():
        if k in (left.get("metrics") or []) or str(v).startswith("disabled"):
            continue
        out.append(f"{k.upper() if k in ('lpips', 'fid') else k} not computed: {v}")
    for k in ("psnr_note", "fid_note"):
        if q.get(k):
            out.append(f"{k.split('_')[0].upper()}: {q[k]}")
    return out


def report_notes(report: dict) -> list[str]:
    """Every note and warning of a report, in the order the HTML lists them under the verdict:
    the protocol notes, then quality, then utility."""
    notes = list(report.get("protocol_notes") or [])
    notes += quality_notes(report)
    for k, v in ((report.get("utility") or {}).get("unavailable") or {}).items():
        notes.append(f"utility: {k.replace('_', ' ')} not computed: {v}")
    return notes


def summarize(report: dict) -> dict:
    """The compact summary the CLI prints (and ``--json`` emits)."""
    out = {"verdict": verdict_line(report),
           "models": {}, "thresholds": report.get("thresholds", {}), "quality": report.get("quality", {}),
           "faces": report.get("faces", {}), "counts": report.get("counts", {}),
           "errors": len(report.get("errors", [])), "notes": report.get("protocol_notes", [])}
    for m, e in report.get("models", {}).items():
        s = {"dodging": {k: e["dodging"][k] for k in ("n", "psr", "psr_faces", "mean_similarity", "not_detected",
                                                       "protocol", "by_protocol") if k in e["dodging"]},
             "dodging_before": e["dodging"]["before"]["psr"]}
        if "impersonation" in e:
            s["impersonation"] = {k: e["impersonation"][k] for k in ("n", "psr", "psr_faces", "mean_similarity",
                                                                     "excluded") if k in e["impersonation"]}
        if "identification" in e:
            s["identification"] = e["identification"]
        if "roc" in e:
            s["auc"] = {k: e["roc"][k]["auc"] for k in ("before", "after") if k in e["roc"]}
        out["models"][m] = s
    if "utility" in report:
        out["utility"] = report["utility"]
    if "apis" in report:
        out["apis"] = {n: {k: v for k, v in a.items() if k in ("dodging", "impersonation", "calls", "cache_hits",
                                                                  "retries", "errors", "status", "stopped",
                                                                  "first_error", "pairs", "failed_pairs")}
                       for n, a in report["apis"].items()}
        out["api_problems"] = api_problems(report)
    if "outputs" in report:
        out["outputs"] = report["outputs"]
    return redact(out)


# ------------------------------------------------------------------------------ csv
def csv_rows(report: dict) -> tuple[list[str], list[dict]]:
    models = list(report.get("models", {}))
    apis = list(report.get("apis", {}))
    cols = ["protected", "original", "identity", "identity_source", "error", "faces_original", "faces_protected",
            "faces_not_detected", "psnr", "ssim", "lpips"]
    for m in models:
        cols += [f"{m}:protocol", f"{m}:dodging_mean", f"{m}:dodging_max"] + [f"{m}:protected@{f}" for f in FARS]
        cols += [f"{m}:impersonation_max", f"{m}:rank_before", f"{m}:rank_after"]
    if "utility" in report:
        cols += ["expression_kept", "expression_tv"]
    for a in apis:
        cols += [f"{a}:dodging_score", f"{a}:impersonation_score", f"{a}:error"]
    out = []
    for r in report.get("images", []):
        row = {c: r.get(c) for c in cols[:8]}
        q = r.get("quality") or {}
        row.update(psnr=q.get("psnr"), ssim=q.get("ssim"), lpips=q.get("lpips"))
        for m in models:
            mr = (r.get("models") or {}).get(m)
            if not mr:
                continue
            f0 = mr["faces"][0] if mr["faces"] else {}
            dod = [s for f in mr["faces"] for s in f.get("dodging", []) if s is not None]
            imp = [s for f in mr["faces"] for s in f.get("impersonation", []) if s is not None]
            row[f"{m}:protocol"] = f0.get("protocol")
            row[f"{m}:dodging_mean"] = float(np.mean(dod)) if dod else None
            row[f"{m}:dodging_max"] = mr.get("dodging_max")
            for f in FARS:
                row[f"{m}:protected@{f}"] = mr.get("protected_at", {}).get(f)
            row[f"{m}:impersonation_max"] = max(imp) if imp else None
            row[f"{m}:rank_before"] = f0.get("rank_before")
            row[f"{m}:rank_after"] = f0.get("rank_after")
        # the primary face's (face 0) expression, empty when face 0 has none (not detected after
        # protection); reports written before faces were numbered have no "face": position 0
        ex = (r.get("utility") or {}).get("expression") or []
        f0 = next((e for e in ex if e.get("face", 0 if e is ex[0] else None) == 0), None)
        if f0 is not None:
            row["expression_kept"] = f0["expression_kept"]
            row["expression_tv"] = f0["expression_tv"]
        for a in apis:
            calls = (r.get("apis") or {}).get(a, [])
            d = [c for c in calls if c["kind"] == "dodging"]
            i = [c for c in calls if c["kind"] == "impersonation"]
            row[f"{a}:dodging_score"] = d[0]["score"] if d else None
            row[f"{a}:impersonation_score"] = i[0]["score"] if i else None
            row[f"{a}:error"] = "; ".join(c["error"] for c in calls if c.get("error")) or None
        out.append(row)
    return cols, out


def write_csv(report: dict, path: Path) -> Path:
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


def _roc_figure(model: str, roc: dict | None, calibration: dict | None) -> str | None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    curves = []
    if roc:
        n_gen = f", {roc['n_genuine']} other-photo pairs" if roc.get("n_genuine") is not None else ""
        for key, color in (("before", "tab:blue"), ("after", "tab:red")):
            if key in roc:
                curves.append((f"audit {key} protection (AUC {roc[key]['auc']:.3f}{n_gen})", roc[key]["fpr"],
                               roc[key]["tpr"], color))
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


def write_html(report: dict, path: Path, cfg=None) -> Path:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>facepriv audit</title><style>{_CSS}</style>"
             "</head><body>", f"<h1 class='verdict'>{html.escape(verdict_line(report))}</h1>"]
    c = report.get("config", {})
    parts.append(f"<p class='meta'>facepriv audit report · {html.escape(report.get('created', ''))} · protected "
                 f"<code>{html.escape(str(c.get('protected')))}</code>"
                 f" vs original <code>{html.escape(str(c.get('original')))}</code> · "
                 f"{report.get('counts', {}).get('evaluated', 0)} of {report.get('counts', {}).get('pairs', 0)} images evaluated"
                 f" · facepriv {html.escape(str(report.get('versions', {}).get('facepriv')))}</p>")
    notes = report_notes(report)
    if notes:
        parts.append(f"<details class='notes'><summary>{len(notes)} note(s) and warning(s)</summary>"
                     + "".join(f"<div class='note'>{html.escape(n)}</div>" for n in notes) + "</details>")
    parts += _html_psr(report)
    parts += _html_quality(report)
    parts += _html_apis(report)
    parts += _html_figures(report)
    parts += _html_images(report, cfg)
    errs = report.get("errors", [])
    if errs:
        parts.append("<h2>Errors</h2><ul>" + "".join(
            f"<li>{html.escape(str(e.get('file')))}: {html.escape(str(e.get('error')))}</li>" for e in errs) + "</ul>")
    v = report.get("versions", {})
    parts.append("<h2>Versions</h2><pre>" + html.escape(json.dumps(v, indent=1, default=str)) + "</pre>")
    parts.append("</body></html>")
    return atomic_write_bytes(path, redact("\n".join(parts)).encode())


def _html_psr(report: dict) -> list[str]:
    """Thresholds, PSR per model and protocol, identification and face counts."""
    parts: list[str] = []
    parts.append("<h2>Thresholds</h2>")
    trows = [[m, *[_fmt(t.get(f), nd=4) for f in FARS], t.get("source", "")] for m, t in report.get("thresholds", {}).items()]
    parts.append(_table(["model", *[f"FAR {f}" for f in FARS], "source"], trows))

    # summary per model
    parts.append("<h2>Protection success rate (PSR) per model</h2>")
    srows = []

    def per_face(stats: dict) -> str:
        return " / ".join(_fmt((stats.get("psr_faces") or {}).get(f), pct=True) for f in FARS)

    for m, e in report.get("models", {}).items():
        for label, d, before in dodging_rows(e["dodging"]):
            srows.append([m, label.strip(), d["n"], d.get("n_faces", "–"), *[_fmt(d["psr"].get(f), pct=True) for f in FARS],
                          per_face(d),
                          " / ".join(_fmt(before["psr"].get(f), pct=True) for f in FARS) if before else "n/a",
                          _fmt(d["mean_similarity"]), d.get("not_detected", 0)])
        if "impersonation" in e:
            i = e["impersonation"]
            srows.append([m, "impersonation", i["n"], i.get("n_faces", "–"), *[_fmt(i["psr"].get(f), pct=True) for f in FARS],
                          per_face(i), " / ".join(_fmt(i["before"]["psr"].get(f), pct=True) for f in FARS),
                          _fmt(i["mean_similarity"]), ""])
    parts.append(_table(["model", "protocol", "comparisons", "faces", *[f"PSR @ {f}" for f in FARS],
                         "per-face PSR @ " + " / ".join(FARS), "PSR before (clean, same comparisons)",
                         "mean similarity", "face not detected"], srows, left=2))
    parts.append("<p>Dodging rows: <i>other photos</i> compares each protected face with other clean photos of the "
                 "same person (its <i>before</i> is the same comparisons made with the clean original); "
                 "<i>self-verif.</i> compares it with its own original (weaker; no <i>before</i>); <i>all</i> is the "
                 "headline PSR over both. Per-face PSR: a face counts as protected when none of its comparisons "
                 "verifies (impersonation: when one reaches the threshold).</p>")
    idrows = [[m, e["identification"]["n"], _fmt(e["identification"]["rank1_before"], pct=True),
               _fmt(e["identification"]["rank1_after"], pct=True), _fmt(e["identification"]["rank5_before"], pct=True),
               _fmt(e["identification"]["rank5_after"], pct=True)]
              for m, e in report.get("models", {}).items() if "identification" in e]
    if idrows:
        parts.append("<h3>Identification (gallery)</h3>")
        parts.append(_table(["model", "probes", "rank-1 before", "rank-1 after", "rank-5 before", "rank-5 after"], idrows))
    f = report.get("faces", {})
    parts.append(f"<p>Faces in originals: {f.get('original', 0)}; still detected after protection: {f.get('matched', 0)}; "
                 f"not detected: {f.get('not_detected', 0)} (counted as protected for dodging); protected images "
                 f"without any face: {f.get('images_no_face_after', 0)}.</p>")
    return parts


def _html_quality(report: dict) -> list[str]:
    """Image quality and utility."""
    parts: list[str] = []
    q = report.get("quality", {})
    parts.append("<h2>Image quality (protected vs original)</h2>")
    parts.append(_table(["PSNR (dB)", "identical pairs (infinite PSNR, not in the mean)", "SSIM", "LPIPS", "FID"],
                        [[_fmt(q.get("psnr"), nd=2), q.get("n_identical", 0), _fmt(q.get("ssim"), nd=4),
                          _fmt(q.get("lpips"), nd=4), _fmt(q.get("fid"), nd=2)]], left=0))
    if quality_notes(report):
        parts.append("<p>Notes on these figures (metrics left out, caveats): see the notes under the verdict "
                     "at the top.</p>")
    if "utility" in report:
        u = report["utility"]
        parts.append("<h2>Utility</h2>")
        parts.append(_table(["face still detected", "expression kept", "mean expression TV distance"],
                            [[_fmt(u.get("face_detected_rate"), pct=True), _fmt(u.get("expression_kept_rate"), pct=True),
                              _fmt(u.get("expression_tv_mean"))]], left=0))
        if u.get("face_detection"):
            parts.append(f"<p>Face still detected: {html.escape(str(u['face_detection']))}, over the "
                         f"{u.get('faces_judged', 0)} crop(s) whose original face it found "
                         f"({u.get('faces_left_out', 0)} left out).</p>")
    return parts


def _html_apis(report: dict) -> list[str]:
    """The online services, where the audit used any."""
    parts: list[str] = []
    if "apis" in report:
        parts.append("<h2>Online APIs</h2>")
        for line in api_problems(report):
            parts.append(f"<div class='note err'>{html.escape(line)}</div>")
        arows = []
        for n, a in report["apis"].items():
            for kind in ("dodging", "impersonation"):
                if kind in a:
                    s = a[kind]
                    arows.append([n, kind, s["n"], ", ".join(f"{k}: {_fmt(v, pct=True)}" for k, v in s["psr"].items()),
                                  thresholds_seen_text(s.get("thresholds_seen")),
                                  _fmt(s["mean_score"], nd=2), s["no_face_protected"], s["errors"], s.get("cached", 0),
                                  a.get("status", "")])
        parts.append(_table(["API", "protocol", "pairs", "PSR at the provider's thresholds",
                             "thresholds used (min–max seen)", "mean score", "no face (protected)", "errors", "cached",
                             "status"], arows, left=2))
        for n, a in report["apis"].items():
            if a.get("first_error") and a.get("status") not in ("stopped", "failed"):
                parts.append(f"<div class='note'>{html.escape(n)}: first error: {html.escape(str(a['first_error']))}</div>")
    return parts


def _html_figures(report: dict) -> list[str]:
    """Per model: the similarity histograms and the ROC."""
    parts: list[str] = []
    parts.append("<h2>Similarity distributions and ROC</h2>")
    for m in report.get("models", {}):
        th = report.get("thresholds", {}).get(m, {})
        hist = _histogram(m, report.get("scores", {}).get(m, {}), th)
        roc = _roc_figure(m, report["models"][m].get("roc"), (report.get("calibration") or {}).get(m))
        parts.append("<div>")
        if hist:
            parts.append(f"<img alt='{html.escape(m)} histogram' src='data:image/png;base64,{hist}'>")
        if roc:
            parts.append(f"<img alt='{html.escape(m)} ROC' src='data:image/png;base64,{roc}'>")
        parts.append("</div>")
        r_entry = report["models"][m].get("roc") or {}
        if r_entry.get("n_genuine") is not None:
            parts.append(f"<p>{html.escape(m)}: ROC before and after over the same {r_entry['n_genuine']} other-photo "
                         f"comparison(s) against {r_entry.get('n_impostor')} impostor pair(s); "
                         f"{r_entry.get('self_left_out', 0)} self-verification comparison(s) left out (they have no "
                         "before; the histogram shows them separately).</p>")
    return parts


def _html_images(report: dict, cfg) -> list[str]:
    """The per-image grid: thumbnails and each image's details (at most ``html_max_images``)."""
    c = report.get("config", {})
    parts: list[str] = []
    images = report.get("images", [])
    limit = getattr(cfg, "html_max_images", 60) if cfg is not None else int(c.get("html_max_images") or 60)
    prot_root = Path(cfg.protected) if cfg is not None else (Path(c["protected"]) if c.get("protected") else None)
    orig_root = Path(cfg.original) if cfg is not None else (Path(c["original"]) if c.get("original") else None)
    parts.append(f"<h2>Images ({min(limit, len(images))} of {len(images)})</h2>")
    parts.append("<table class='grid'><tr><th>original</th><th>protected</th><th>|difference| amplified</th>"
                 "<th class='l'>details</th></tr>")
    models = list(report.get("models", {}))
    for r in images[:limit]:
        parts.append(_html_image_row(r, models, prot_root, orig_root))
    parts.append("</table>")
    return parts


def _html_image_row(r: dict, models: list[str], prot_root: Path | None, orig_root: Path | None) -> str:
    th = None
    if prot_root is not None and orig_root is not None:
        prot = prot_root if prot_root.is_file() else prot_root / r["protected"]
        orig = orig_root if orig_root.is_file() else orig_root / r["original"]
        th = _thumbs(prot, orig)
    cells = ["<td>–</td>"] * 3
    if th:
        a, b, d, gain = th
        cells = [f"<td><img src='data:image/jpeg;base64,{a}'></td>", f"<td><img src='data:image/jpeg;base64,{b}'></td>",
                 f"<td><img src='data:image/jpeg;base64,{d}'><br>×{gain:.1f}</td>"]
    det = [f"<b>{html.escape(r['protected'])}</b>"]
    if r.get("identity"):
        det.append(f"identity: {html.escape(str(r['identity']))} ({html.escape(str(r.get('identity_source')))})")
    if r.get("error"):
        det.append(f"<span class='err'>{html.escape(r['error'])}</span>")
    for m in models:
        mr = (r.get("models") or {}).get(m)
        if not mr:
            continue
        pa = mr.get("protected_at", {}).get("1e-3")
        if pa is None:  # the model has no threshold: nothing can be decided
            verdict = "<span>no threshold @1e-3</span>"
        else:
            verdict = f"<span class='{'ok' if pa else 'bad'}'>{'protected' if pa else 'recognised'} @1e-3</span>"
        det.append(f"{html.escape(m)}: max sim {_fmt(mr.get('dodging_max'))} · {verdict}")
    qq = r.get("quality") or {}
    if qq:
        det.append(f"PSNR {_fmt(qq.get('psnr'), nd=2)} dB · SSIM {_fmt(qq.get('ssim'), nd=4)}")
    if r.get("resized"):
        det.append(html.escape(r["resized"]))
    for x in r.get("impersonation_excluded") or []:
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


def write_reports(report: dict, out: str | Path, cfg=None) -> dict[str, Path]:
    """Write report.json, report.csv and report.html under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "csv": out / "report.csv", "html": out / "report.html"}
    full = dict(report)
    full["outputs"] = {k: str(v) for k, v in paths.items()}
    atomic_write_bytes(paths["json"], json.dumps(json_safe(redact(full)), indent=1, default=str,
                                                 allow_nan=False).encode())
    write_csv(report, paths["csv"])
    write_html(report, paths["html"], cfg)
    return paths
