"""``facepriv audit``: measure how well protected photos resist face recognition.

``facepriv audit --protected DIR --original DIR ...`` runs the audit; ``facepriv audit
calibrate --pairs FILE --models ...`` computes FAR thresholds from labelled clean pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape as rich_escape
from rich.table import Table

from . import common
from .common import err_console, handle_errors, out_console, state

if TYPE_CHECKING:
    from ..audit.schema import AuditReport

HELP = """Audit protected photos: verification (dodging), impersonation and identification per face-recognition
model at FAR 1e-1/1e-2/1e-3, image quality (PSNR, SSIM, LPIPS, FID), optional utility and online APIs.
Writes OUT/report.json, report.csv and a self-contained report.html.

Dodging: the protected face should no longer match other photos of the same person. Impersonation
(--target): it should match the target person instead. FAR (false-accept rate) 1e-3: each model's
threshold is set so that 1 in 1000 pairs of different people would be taken for the same person.
The protection success rate (PSR) is the share of comparisons that defeat recognition.

Examples:
  facepriv audit --protected protected/ --original photos/ --gallery gallery/ --models dlib-resnet,sface --out report/
  facepriv audit --protected p/ --original o/ --target target/ --target-used target/used.jpg --out report/
  facepriv audit --protected p/ --original o/ --api facepp --out report/     # keys: FACEPP_API_KEY / FACEPP_API_SECRET
  facepriv audit calibrate --pairs pairs.csv --models dlib-resnet,sface
"""

app = typer.Typer(help=HELP, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})

Models = Annotated[str, typer.Option("--models", "-m", help="Comma-separated recognition models from the registry.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Faces per forward pass (per model).")]
Aligned = Annotated[bool, typer.Option("--aligned", help="Inputs are pre-aligned face crops: no detection.")]
AlignedTemplate = Annotated[str, typer.Option(
    "--aligned-template", help="Template the pre-aligned crops follow: arcface-112, facenet-160, dlib-150, ...")]


@app.callback(invoke_without_command=True)
@handle_errors
def audit(
    ctx: typer.Context,
    protected: Annotated[Path | None, typer.Option("--protected", "-p", help="Protected photos (folder or file).")] = None,
    original: Annotated[Path | None, typer.Option("--original", help="Clean originals (folder or file); matched to the protected photos by relative path.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder (report.json, report.csv, report.html).")] = Path("audit-report"),
    models: Models = "dlib-resnet,facenet-casia,sface",
    gallery: Annotated[Path | None, typer.Option("--gallery", help="Identity gallery: GALLERY/<identity>/*.jpg.")] = None,
    target: Annotated[Path | None, typer.Option("--target", help="Photo(s) of the impersonation target (file or folder).")] = None,
    target_used: Annotated[list[Path] | None, typer.Option(
        "--target-used", metavar="PATH", help="Target photo used when protecting (excluded from impersonation; repeatable). "
                              "Required with --target unless --allow-target-reuse.")] = None,
    allow_target_reuse: Annotated[bool, typer.Option(
        "--allow-target-reuse", help="With --target but no --target-used: measure impersonation against every target "
                                     "photo, probably including the one used to protect (optimistic; noted).")] = False,
    pairs: Annotated[Path | None, typer.Option("--pairs", help="Labelled pairs CSV (file_x,file_y,same/different): identities.")] = None,
    pairs_root: Annotated[Path | None, typer.Option("--pairs-root", help="Folder the pairs' paths are relative to.")] = None,
    identities: Annotated[Path | None, typer.Option("--identities", help="CSV file,identity for the originals.")] = None,
    thresholds: Annotated[Path | None, typer.Option("--thresholds", help="Thresholds JSON (overrides protocol/calibrated).")] = None,
    aligned: Aligned = False,
    aligned_template: AlignedTemplate = "arcface-112",
    detector: common.Detector = "mtcnn",
    min_face_size: common.MinFaceSize = 20.0,
    landmarks: Annotated[str, typer.Option(
        "--landmarks", help="protected: detect faces in the protected photo (realistic) | original: embed it at the "
                            "original's landmarks (stricter for pixel-level protections).")] = "protected",
    max_refs: Annotated[int, typer.Option(
        "--max-refs", min=0, help="Other clean photos of the person each face is compared with (a fixed-seed "
                                  "sample per image when there are more; 0 = all).")] = 20,
    batch_size: BatchSize = 32,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="Mixed precision: faster on a GPU, checked per model against full precision. \\[default: on with CUDA, else off]", show_default=False)] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Threads reading/detecting/aligning images.")] = 2,
    quality: Annotated[bool, typer.Option("--quality/--no-quality", help="Image-quality metrics (PSNR, SSIM, LPIPS, FID): how much the photos changed.")] = True,
    lpips: Annotated[str, typer.Option("--lpips", help="LPIPS model: lpips-alex | lpips-vgg | lpips-squeeze | none.")] = "lpips-alex",
    fid: Annotated[bool, typer.Option("--fid/--no-fid", help="FID (distance between the protected and original sets as a whole; needs many images).")] = True,
    download: Annotated[bool, typer.Option("--download/--no-download", help="Let quality metrics (LPIPS, FID) download their weights.")] = True,
    utility: Annotated[bool, typer.Option("--utility", help="Also check expression kept and face still detected (with --aligned: by --detector on padded crops).")] = False,
    api: Annotated[list[str] | None, typer.Option("--api", metavar="NAME", help="Online face-comparison service: facepp | rekognition | azure (repeatable).")] = None,
    api_endpoint: Annotated[list[str] | None, typer.Option(
        "--api-endpoint", metavar="NAME=URL", help="Endpoint of one API: NAME=URL (repeatable), or a plain URL with a single --api.")] = None,
    api_threshold: Annotated[list[str] | None, typer.Option(
        "--api-threshold", metavar="NAME=VALUE", help="Decision threshold of one API: NAME=VALUE (rekognition: similarity, default 80; "
                                "azure: confidence, default 0.5; repeatable), or a plain VALUE with a single --api.")] = None,
    api_timeout: Annotated[float, typer.Option("--api-timeout", min=0.1, help="Seconds per API request.")] = 30.0,
    api_retries: Annotated[int, typer.Option("--api-retries", min=0,
                                             help="Retries of a rate-limited / failed API request.")] = 4,
    api_config: Annotated[Path | None, typer.Option("--api-config", help="JSON/TOML file with API keys (never printed).")] = None,
    api_concurrency: Annotated[int, typer.Option("--api-concurrency", min=1, help="Requests in flight per API.")] = 2,
    api_rate: Annotated[float, typer.Option("--api-rate", min=0.0, help="Requests per second per API (0 = unlimited).")] = 2.0,
    api_max_refs: Annotated[int, typer.Option("--api-max-refs", min=1, help="Reference photos per image sent to APIs.")] = 1,
    api_cache: Annotated[Path | None, typer.Option("--api-cache", help="Response cache folder (default FACEPRIV_HOME/api-cache).")] = None,
    glob: common.Glob = None,
    max_images: Annotated[int | None, typer.Option("--max-images", min=1, help="Audit only the first N images.")] = None,
    max_pixels: common.MaxPixels = None,
    html_max_images: Annotated[int, typer.Option("--html-max-images", min=0, help="Images shown in report.html.")] = 60,
):
    if ctx.invoked_subcommand is not None:
        return
    if protected is None or original is None:
        err_console.print("[red]error:[/red] --protected and --original are required (see `facepriv audit --help`)")
        raise typer.Exit(2)
    from ..audit import AuditConfig, run_audit, summarize
    from ..audit.report import api_problems, exit_code, json_safe
    from ..audit.schema import as_report

    cfg = AuditConfig(
        protected=protected, original=original, models=common.split_list(models), out=out, gallery=gallery,
        target=target, target_used=list(target_used or []), allow_target_reuse=allow_target_reuse, pairs=pairs, pairs_root=pairs_root, identities=identities,
        aligned=aligned, aligned_template=aligned_template, detector=detector, min_face_size=min_face_size,
        landmarks=landmarks, max_refs=max_refs, thresholds=thresholds, device=state.device, batch_size=batch_size, amp=amp,
        workers=workers, quality=quality, lpips=None if lpips.lower() in ("none", "off", "") else lpips, fid=fid,
        download=download, utility=utility, apis=list(api or []), api_endpoint=list(api_endpoint or []) or None,
        api_threshold=list(api_threshold or []) or None, api_timeout=api_timeout, api_retries=api_retries,
        api_config=api_config,
        api_concurrency=api_concurrency, api_rate=api_rate or None, api_max_refs=api_max_refs, api_cache=api_cache,
        glob=glob, max_images=max_images, max_pixels=max_pixels, html_max_images=html_max_images,
        progress=not (state.quiet or state.json),
    )
    report = as_report(run_audit(cfg))
    summary = summarize(report)
    if state.json:
        common.emit_json(json_safe(summary))
        for line in api_problems(report):
            common.print_error(line)
    elif state.quiet:  # errors only
        print_problems(report)
    else:
        print_summary(report)
    raise typer.Exit(exit_code(report))


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _num(v, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return f"{v:.{nd}f}"


def psr_table(report: AuditReport | Mapping) -> Table:
    """The PSR summary (fits 80 columns): per model, one row per dodging protocol present (and
    the headline over both when both are), and impersonation; per-comparison PSR at each FAR,
    per-face PSR and the clean "before" (same comparisons) at FAR 1e-3, and the mean similarity."""
    from rich import box

    from ..audit.report import psr_rows
    from ..audit.schema import as_report
    from ..models.thresholds import FARS

    t = Table(title="protection success rate (PSR): share of comparisons that defeat recognition",
              header_style="bold", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
              caption="faces: per-face PSR (a face is protected when none of its comparisons verifies); "
                      "before: the same comparisons with the clean photo (n/a: self-verification has none)",
              caption_justify="left")
    for c in ("model / protocol", "n", *[f"PSR {f}" for f in FARS], "faces 1e-3", "before 1e-3", "mean sim"):
        t.add_column(c, justify="left" if c == "model / protocol" else "right", no_wrap=c == "model / protocol")
    for m, e in as_report(report).models.items():
        t.add_row(rich_escape(m), style="bold")
        for label, d, before in psr_rows(e):
            t.add_row("  " + label, str(d.n), *[_pct(d.psr.get(f)) for f in FARS], _pct((d.psr_faces or {}).get("1e-3")),
                      _pct(before.psr.get("1e-3")) if before is not None else "n/a", _num(d.mean_similarity))
    return t


def print_problems(report: AuditReport | Mapping) -> None:
    """``--quiet``: only what went wrong, as errors on stderr (stopped or failing APIs, images that
    could not be audited)."""
    from ..audit.report import api_problems
    from ..audit.schema import as_report

    report = as_report(report).redacted()
    for line in api_problems(report):
        common.print_error(line)
    for e in report.errors:
        common.print_error(f"{e.get('file')}: {e.get('error')}")


def print_summary(report: AuditReport | Mapping) -> None:
    """The terminal summary: the verdict, the PSR, thresholds and identification tables, quality,
    faces, utility, online APIs, notes, problems and where the report files are."""
    from ..audit.report import api_problems, verdict_line
    from ..audit.schema import as_report

    report = as_report(report).redacted()
    out_console.print(verdict_line(report), markup=False, highlight=False, style="bold")
    out_console.print(psr_table(report))
    for table in _model_tables(report):
        out_console.print(table)
    _print_figures(report)
    for n in report.protocol_notes:
        out_console.print(common.labelled("note:", "yellow", n), soft_wrap=True)
    for line in api_problems(report):
        common.print_error(line, out_console)
    if report.errors:
        out_console.print(f"[red]{len(report.errors)} image(s) could not be audited:[/red]")
        for e in report.errors[:20]:
            out_console.print(f"  {e.get('file')}: {e.get('error')}", highlight=False, markup=False)
    outs = report.outputs or {}
    if outs:
        out_console.print(f"report: {outs.get('html')} (+ report.json, report.csv)", highlight=False, markup=False)


def _model_tables(report: AuditReport) -> list[Table]:
    """The thresholds table, and the identification table where a gallery was used."""
    from ..models.thresholds import FARS

    tt = Table(title="thresholds (similarity, higher = same person)", header_style="bold")
    for c in ("model", *[f"FAR {f}" for f in FARS], "source"):
        tt.add_column(c, justify="left" if c in ("model", "source") else "right")
    for m, tm in report.thresholds.items():
        tt.add_row(m, *[_num(tm.at(f), 4) for f in FARS], str(tm.source))
    ids = [(m, e.identification) for m, e in report.models.items() if e.identification is not None]
    if not ids:
        return [tt]
    t2 = Table(title="identification (gallery)", header_style="bold")
    for c in ("model", "probes", "rank-1 before", "rank-1 after", "rank-5 before", "rank-5 after"):
        t2.add_column(c, justify="left" if c == "model" else "right")
    for m, s in ids:
        t2.add_row(m, str(s.n), _pct(s.rank1_before), _pct(s.rank1_after), _pct(s.rank5_before), _pct(s.rank5_after))
    return [tt, t2]


def _print_figures(report: AuditReport) -> None:
    """Quality (with its notes), faces, utility and the online APIs, one line each."""
    from ..audit.report import psnr_text, quality_notes, thresholds_seen_text

    q = report.quality
    out_console.print(f"quality: PSNR {psnr_text(q)} · SSIM {_num(q.ssim, 4)} · "
                      f"LPIPS {_num(q.lpips, 4)} · FID {_num(q.fid, 2)}")
    for note in quality_notes(report):
        out_console.print(common.labelled("  note:", "yellow", note), soft_wrap=True)
    f = report.faces
    out_console.print(f"faces: {f.original} in originals, {f.not_detected} no longer detected after "
                      "protection (counted as protected for dodging)")
    u = report.utility
    if u is not None:
        how = f" ({u.face_detection}, {u.faces_judged or 0} crop(s))" if u.face_detection else ""
        out_console.print(f"utility: face still detected {_pct(u.face_detected_rate)}{how}, expression kept "
                          f"{_pct(u.expression_kept_rate)}", highlight=False, markup=False)
    for name, a in (report.apis or {}).items():
        for kind, s in (("dodging", a.dodging), ("impersonation", a.impersonation)):
            if s is not None:
                rates = ", ".join(f"{k}: {_pct(v)}" for k, v in s.psr.items()) or "no scores"
                out_console.print(f"{name} {kind}: {s.n} pairs, PSR {rates} (thresholds "
                                  f"{thresholds_seen_text(s.thresholds_seen)}); no face in protected "
                                  f"{s.no_face_protected}, errors {s.errors}, cached {s.cached or 0}",
                                  highlight=False, markup=False)
        out_console.print(f"{name}: {a.calls} requests sent, {a.counter('cache_hits')} cache hits, "
                          f"{a.counter('retries')} retries", highlight=False, markup=False)
        if a.first_error and a.status not in ("stopped", "failed"):
            out_console.print(f"{name}: first error: {a.first_error}", highlight=False, markup=False)


def calibration_tables(result: dict, name: str) -> list[Table]:
    """The calibration in two tables that fit 80 columns: the pairs and the ROC summary per
    model, then the threshold and TAR at each FAR (``--json`` and ``--out`` keep every field)."""
    from ..models.thresholds import FARS

    t = Table(title=f"calibration on {name}", header_style="bold")
    for c in ("model", "pairs same/diff", "AUC", "EER", "acc best", "acc default"):
        t.add_column(c, justify="left" if c == "model" else "right")
    for m, r in result.items():
        t.add_row(m, f"{r['n_genuine']}/{r['n_impostor']}", f"{r['auc']:.4f}", f"{100 * r['eer']:.2f}%",
                  _pct(r.get("best_accuracy")), _pct(r.get("accuracy_at_default")))
    t2 = Table(title="threshold (TAR) at each false-accept rate", header_style="bold")
    t2.add_column("model", justify="left")
    for f in FARS:
        t2.add_column(f"FAR {f}", justify="right")
    for m, r in result.items():
        cells = []
        for f in FARS:
            thr = (r.get("thresholds") or {}).get(f)
            tar = (r.get("tar_at_far") or {}).get(f)
            cells.append("–" if thr is None else f"{thr:.4f} ({_pct(tar)})")
        t2.add_row(m, *cells)
    return [t, t2]


@app.command("calibrate", no_args_is_help=True)
@handle_errors
def calibrate(
    pairs: Annotated[Path, typer.Option(
        "--pairs", help="Labelled clean pairs: LFW's pairs.txt as distributed (name n1 n2 / name1 n1 name2 n2), or "
                        "one pair per line file_x,file_y,label (comma, semicolon, tab or space separated; label "
                        "same/different, yes/no, 1/0).")],
    models: Models = "dlib-resnet,facenet-casia,sface",
    root: Annotated[Path | None, typer.Option(
        "--root", help="Where the pairs' images are (default: the pairs file's folder). LFW: the folder holding "
                       "the person folders <Name>/<Name>_0001.jpg (its images/ or lfw/ sub-folder is also tried); "
                       "a list: the folder its relative paths start at.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Also write every model's calibration to this JSON "
                                                           "(usable with `audit --thresholds`).")] = None,
    store: Annotated[bool, typer.Option("--store/--no-store", help="Store under FACEPRIV_HOME/thresholds for later "
                                                                   "audits.")] = True,
    detector: common.Detector = "mtcnn",
    aligned: Aligned = False,
    aligned_template: AlignedTemplate = "arcface-112",
    batch_size: BatchSize = 32,
    min_face_size: common.MinFaceSize = 20.0,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Threads reading/detecting/aligning images.")] = 2,
):
    """Compute FAR 1e-1/1e-2/1e-3 thresholds, ROC AUC, EER and accuracy from labelled clean pairs."""
    from ..audit import CalibrationConfig, run_calibration
    from ..audit.report import json_safe

    cfg = CalibrationConfig(pairs=pairs, models=common.split_list(models), root=root, out=out, store=store,
                            detector=detector, aligned=aligned, aligned_template=aligned_template,
                            device=state.device, batch_size=batch_size, min_face_size=min_face_size,
                            workers=workers, progress=not (state.quiet or state.json))
    result = run_calibration(cfg)
    if state.json:
        common.emit_json(json_safe({m: {k: v for k, v in r.items() if k not in ("roc", "genuine_scores",
                                                                                 "impostor_scores")}
                                    for m, r in result.items()}))
        return
    for t in calibration_tables(result, pairs.name):
        out_console.print(t)
    first = next(iter(result.values()), {})
    sk = first.get("skipped_pairs", {})
    if sk.get("no_face") or sk.get("error"):
        out_console.print(f"[yellow]{sk.get('no_face', 0)} pair(s) without a detected face and {sk.get('error', 0)} "
                          "unreadable pair(s) were left out[/yellow]")
    for m, r in result.items():
        if r.get("note"):
            out_console.print(common.labelled(f"note ({m}):", "yellow", r["note"]), soft_wrap=True)
        if r.get("stored"):
            out_console.print(f"{m}: stored in {r['stored']}", highlight=False, markup=False)
    if out is not None:
        out_console.print(f"all calibrations: {out}", highlight=False, markup=False)
