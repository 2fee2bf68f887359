"""Shared CLI plumbing: global options, option types, error handling and output.

The CLI only parses arguments, calls the library and prints. Progress bars and messages go to
stderr; stdout carries the human summary or, with ``--json``, exactly one JSON document.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..core.errors import ConfigError, FaceprivError
from ..core.io import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, resolve_max_pixels

out_console = Console()  # stdout
err_console = Console(stderr=True)


@dataclass
class GlobalState:
    device: str = "auto"
    seed: int | None = None
    quiet: bool = False
    verbose: bool = False
    json: bool = False


state = GlobalState()

# Global options may be given anywhere on the command line; main() moves them to the front.
GLOBAL_FLAGS = {"--quiet", "-q", "--verbose", "-v", "--json"}
GLOBAL_VALUED = {"--device", "--seed"}


def hoist_global_options(argv: list[str]) -> list[str]:
    """Move global options that follow a sub-command to the front, where click expects them."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest.extend(argv[i:])
            break
        name = a.split("=", 1)[0]
        if a in GLOBAL_FLAGS:
            front.append(a)
        elif name in GLOBAL_VALUED:
            if "=" in a:
                front.append(a)
            elif i + 1 < len(argv):
                front.extend([a, argv[i + 1]])
                i += 1
            else:
                rest.append(a)
        else:
            rest.append(a)
        i += 1
    return front + rest


def labelled(label: str, style: str, text: object) -> Text:
    """``label`` in ``style``, then ``text`` exactly as it is: no Rich markup, emoji codes or
    highlighting is applied to it, so "pip install 'facepriv[aws]'" or "the [facepp] section"
    print as written (an f-string with markup on would swallow the brackets)."""
    return Text.assemble((label, style), " ", str(text))


def print_error(text: object, console: Console | None = None) -> None:
    """``error: TEXT`` on stderr (or ``console``), the text verbatim and not hard-wrapped."""
    (console or err_console).print(labelled("error:", "red", text), soft_wrap=True)


def print_warning(text: object, label: str = "warning:", console: Console | None = None) -> None:
    """``warning: TEXT`` (or another yellow label) on stderr (or ``console``), the text verbatim."""
    (console or err_console).print(labelled(label, "yellow", text), soft_wrap=True)


USAGE_EXIT = 2  # a usage error: bad option, bad setting, nothing to do (ConfigError, click's own)
FAILURE_EXIT = 1  # the run itself failed (a model, a file, a bug)


def _click_passthrough() -> tuple[type[BaseException], ...]:
    """Exceptions click/typer report themselves (usage errors exit 2, Exit its code): those of
    the click typer bundles (typer >= 0.2x, ``typer._click``) and of click itself (older typer;
    installed or not: facepriv does not depend on it)."""
    import importlib

    kinds: list = [typer.Exit, typer.BadParameter]
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        kinds += [getattr(mod, k, None) for k in ("ClickException", "Abort", "Exit")]
    return tuple(dict.fromkeys(k for k in kinds if isinstance(k, type) and issubclass(k, BaseException)))


_CLICK_PASSTHROUGH = _click_passthrough()


def _redactor():
    """:func:`facepriv.core.secrets.redact_text`, imported when an error is printed (not at
    start-up: importing it loads the ``facepriv.audit`` package). Secrets are only ever
    registered in that module, so if it cannot be imported none can have been registered and
    the text is returned as it is."""
    try:
        from ..core.secrets import redact_text
    except Exception:  # noqa: BLE001 - printing the error must not fail in turn
        return lambda text: text
    return redact_text


def _redact_trace(trace, redact) -> None:
    """Redact the exception messages and notes of a rich ``Trace`` (chained and grouped ones
    included) in place; the frames show only source lines, never values."""
    for stack in trace.stacks:
        stack.exc_value = redact(stack.exc_value)
        if getattr(stack, "notes", None):
            stack.notes = [redact(n) for n in stack.notes]
        syntax = stack.syntax_error
        if syntax is not None:
            syntax.msg, syntax.line = redact(syntax.msg), redact(syntax.line)
        for sub in getattr(stack, "exceptions", None) or ():
            _redact_trace(sub, redact)


def print_redacted_traceback(exc: BaseException, console: Console | None = None) -> None:
    """The traceback of ``exc`` (as ``Console.print_exception`` shows it) with every registered
    secret and key=value credential redacted from the messages."""
    from rich.traceback import Traceback

    trace = Traceback.extract(type(exc), exc, exc.__traceback__)
    _redact_trace(trace, _redactor())
    (console or err_console).print(Traceback(trace))


def handle_errors(fn):
    """Turn failures into a one-line message and the documented exit code.

    Only usage errors exit 2: :class:`ConfigError` (bad options or settings, an empty input
    set, outputs that would collide or replace inputs) and click's own usage errors, which
    click reports itself. Everything else - a corrupt or missing weights file, a failed
    download, an unexpected exception - exits 1; ``--verbose`` adds the traceback. Messages
    and tracebacks pass through :func:`facepriv.core.secrets.redact_text` first, so an
    exception that quotes an API key never prints it.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _CLICK_PASSTHROUGH:
            raise
        except ConfigError as exc:
            print_error(_redactor()(str(exc)))
            if state.verbose:
                print_redacted_traceback(exc)
            raise typer.Exit(USAGE_EXIT) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - expected failures and bugs alike: message, exit 1
            text = str(exc) if isinstance(exc, FaceprivError) else f"{type(exc).__name__}: {exc}"
            print_error(_redactor()(text))
            if state.verbose:
                print_redacted_traceback(exc)
            elif not isinstance(exc, FaceprivError | OSError | ValueError):
                err_console.print("[dim](run with --verbose for the traceback)[/dim]")
            raise typer.Exit(FAILURE_EXIT) from None

    return wrapper


def emit_json(payload: Any) -> None:
    """Strict JSON on stdout: non-finite floats become "inf" / "-inf" / "nan" strings (never the
    non-standard Infinity / NaN tokens)."""

    def finite(obj):
        if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
            return "nan" if obj != obj else ("inf" if obj > 0 else "-inf")
        if isinstance(obj, dict):
            return {k: finite(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [finite(v) for v in obj]
        return obj

    sys.stdout.write(json.dumps(finite(payload), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def print_batch_summary(summary, title: str) -> None:
    """Human or JSON summary of a batch run; failures are listed with their reasons.

    Where the manifest rows of this run carry per-face verification (protect's ``attack`` rows,
    deid adversarial's ``deid.adversarial.faces``), it also says per face whether each model
    still matches it, and gives a one-line verdict (``protection`` in the JSON). ``--quiet``
    keeps the verdict line and drops the per-face lines.
    """
    faces = _verified_faces(summary)
    if state.json:
        payload = summary.to_json()
        if faces:
            payload["protection"] = _protection_json(faces, _far_of(summary, faces))
        emit_json(payload)
        return
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("status")
    table.add_column("files", justify="right")
    no_face = getattr(summary, "no_face", {}) or {}
    labels = {"copied": "copied (no face found: unchanged)", "skipped": "skipped"}
    for status, n in sorted(summary.counts.items()):
        style = {"error": "red", "ok": "green"}.get(status, "yellow")
        label = labels.get(status, status) if no_face.get(status) == n else status
        table.add_row(f"[{style}]{label}[/{style}]", str(n))
    if summary.resumed:
        table.add_row("[cyan]already done (resume)[/cyan]", str(summary.resumed))
    out_console.print(table)
    copied = no_face.get("copied", 0)
    if copied:
        out_console.print(
            f"[yellow]{copied} file(s) had no face the detector could find and were written through "
            "unchanged (metadata stripped): check them, or use --on-no-face error / skip.[/yellow]")
    if summary.failures:
        out_console.print(f"[red]{len(summary.failures)} file(s) failed:[/red]")
        for path, err in summary.failures:
            first = err.splitlines()[0] if err else ""
            out_console.print(Text.assemble("  ", (str(path), "bold"), ": ", first), soft_wrap=True)
    if faces:
        _print_face_verdicts(faces, _far_of(summary, faces), per_face=not state.quiet)
    n = sum(summary.counts.values())
    rate = n / summary.elapsed if summary.elapsed > 0 else 0.0
    out_console.print(f"{n} processed in {summary.elapsed:.1f} s ({rate:.2f} img/s); manifest: "
                      f"{escape(str(summary.manifest))}")


MAX_FACE_LINES = 10  # per-face lines printed after a batch; the rest are counted
MAX_NAMED = 5  # faces named in the verdict line


@dataclass
class _FaceVerdict:
    """One face's verification as a manifest row records it."""

    file: str
    face: int
    mode: str  # dodging | impersonation
    status: str  # attacked | failed | skipped
    reason: str | None
    passed: dict[str, bool | None]  # per model: past its threshold; None = no threshold known
    far: str | None = None  # the false-accept rate of the thresholds, where the row says it

    @property
    def label(self) -> str:
        return f"{self.file} face {self.face}"

    @property
    def judged(self) -> dict[str, bool]:
        return {m: bool(p) for m, p in self.passed.items() if p is not None}

    @property
    def outcome(self) -> str:
        """protected (every model with a threshold is past it) | matches | unknown (no threshold)."""
        if self.status != "attacked":
            return "matches"
        judged = self.judged
        if not judged:
            return "unknown"
        return "protected" if all(judged.values()) else "matches"


def _face_rows_of(row: dict) -> list[tuple[dict, str | None]]:
    """(per-face report, FAR) of one manifest row: protect's ``attack`` list, deid's ``deid.*.faces``."""
    out = []
    if isinstance(row.get("attack"), list):
        out += [(r, None) for r in row["attack"] if isinstance(r, dict)]
    for info in (row.get("deid") or {}).values() if isinstance(row.get("deid"), dict) else ():
        if isinstance(info, dict) and isinstance(info.get("faces"), list):
            far = None if info.get("far") is None else str(info["far"])
            out += [(r, far) for r in info["faces"] if isinstance(r, dict)]
    return out


def _passed_of(rep: dict) -> dict[str, bool | None] | None:
    if isinstance(rep.get("passed"), dict):
        return dict(rep["passed"])
    sim = rep.get("similarity")
    if isinstance(sim, dict) and any(isinstance(v, dict) and "passed" in v for v in sim.values()):
        return {m: v.get("passed") for m, v in sim.items() if isinstance(v, dict)}
    return None


def _verified_faces(summary) -> list[_FaceVerdict]:
    """The faces of this run's manifest rows that carry a verification (or failed to be protected)."""
    path, run_id = getattr(summary, "manifest", None), getattr(summary, "run_id", "")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines() if path else []
    except OSError:
        return []
    faces = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or (run_id and row.get("run_id") != run_id):
            continue
        name = Path(str(row.get("input") or "?")).name
        for k, (rep, far) in enumerate(_face_rows_of(row)):
            status = str(rep.get("status") or "attacked")
            passed = _passed_of(rep)
            if passed is None and status == "attacked":
                continue  # nothing recorded to judge this face by (k-Same, blur, ...)
            faces.append(_FaceVerdict(name, int(rep.get("face", k)), str(rep.get("mode") or "dodging"), status,
                                      rep.get("reason"), passed or {}, far))
    return faces


def _far_of(summary, faces=None) -> str | None:
    """The false-accept rate the thresholds were taken at, where the run's details say it."""

    def find(obj, depth=0):
        if isinstance(obj, dict) and depth < 4:
            if isinstance(obj.get("far"), str | float | int):
                return str(obj["far"])
            for v in obj.values():
                hit = find(v, depth + 1)
                if hit:
                    return hit
        return None

    far = find(getattr(summary, "details", None))
    if far is None and faces:
        fars = {f.far for f in faces}
        far = fars.pop() if len(fars) == 1 else None
    return far


def _model_word(passed: bool | None, mode: str) -> str:
    if passed is None:
        return "no threshold"
    if mode == "impersonation":
        return "matches the target" if passed else "target not matched"
    return "no longer matches" if passed else "still matches"


def _face_line(f: _FaceVerdict) -> Text:
    if f.status != "attacked":
        return Text.assemble("  ", (f.label, "bold"), ": ", (f"not protected ({f.reason or f.status})", "red"))
    parts: list[tuple[str, str] | str] = ["  ", (f.label, "bold"), ":"]
    for m, p in f.passed.items():
        style = "dim" if p is None else ("green" if p else "red")
        parts += [" ", m, " ", (_model_word(p, f.mode), style), ";"]
    if parts[-1] == ";":
        parts.pop()
    return Text.assemble(*parts)


def _names(faces: list[_FaceVerdict]) -> str:
    shown = ", ".join(f.label for f in faces[:MAX_NAMED])
    return shown + (f" and {len(faces) - MAX_NAMED} more" if len(faces) > MAX_NAMED else "")


def _verdict(faces: list[_FaceVerdict], far: str | None) -> tuple[str, str]:
    """The one-line verdict and its style."""
    judged_models = list(dict.fromkeys(m for f in faces for m in f.judged))
    unjudged = [m for m in dict.fromkeys(m for f in faces for m in f.passed) if m not in judged_models]
    protected = [f for f in faces if f.outcome == "protected"]
    matches = [f for f in faces if f.outcome == "matches"]
    unknown = [f for f in faces if f.outcome == "unknown"]
    n = len(faces)
    face_s = "face" if n == 1 else "faces"
    at = f" at FAR {far}" if far else " at their thresholds"
    imp = all(f.mode == "impersonation" for f in faces)
    models = ", ".join(judged_models) if judged_models else "no model with a threshold"
    s = "es" if len(protected) == 1 else ""
    goal = f"now match{s} the target for {models}" if imp else f"no longer match{s} {models}"
    text = f"{len(protected)} of {n} {face_s} {goal}{at}" if judged_models else f"{n} {face_s}: {models} to judge by"
    if matches:
        failed = [f for f in matches if f.status != "attacked"]
        still = "do not match the target" if imp else ("still matches" if len(matches) == 1 else "still match")
        text += f"; {len(matches)} {still}: {_names(matches)}"
        if failed:
            text += f" ({len(failed)} not protected at all)"
    if unknown and judged_models:
        text += f"; {len(unknown)} without a threshold to judge"
    if unjudged:
        text += f" ({', '.join(unjudged)}: no threshold)"
    style = "green" if protected and len(protected) == n else ("red" if matches else "yellow")
    return text, style


def _print_face_verdicts(faces: list[_FaceVerdict], far: str | None, per_face: bool = True) -> None:
    if per_face:
        for f in faces[:MAX_FACE_LINES]:
            out_console.print(_face_line(f), soft_wrap=True)
        if len(faces) > MAX_FACE_LINES:
            rest = faces[MAX_FACE_LINES:]
            bad = sum(f.outcome == "matches" for f in rest)
            out_console.print(f"  ... and {len(rest)} more face(s) ({bad} still matching); per face in the manifest",
                              markup=False)
    text, style = _verdict(faces, far)
    out_console.print(Text(text, style=style), soft_wrap=True)


def _protection_json(faces: list[_FaceVerdict], far: str | None) -> dict:
    text, _ = _verdict(faces, far)
    return {"faces": len(faces), "far": far, "verdict": text,
            "protected": sum(f.outcome == "protected" for f in faces),
            "still_matching": [{"file": f.file, "face": f.face, "status": f.status, "reason": f.reason,
                                "matches": [m for m, p in f.judged.items() if not p]}
                               for f in faces if f.outcome == "matches"],
            "no_threshold": list(dict.fromkeys(m for f in faces for m, p in f.passed.items() if p is None))}


def parse_floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{what}: expected {n} comma-separated numbers, got {text!r}") from None
    if len(vals) != n:
        raise ConfigError(f"{what}: expected {n} comma-separated numbers, got {text!r}")
    return vals


def split_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


# ----------------------------------------------------------------- shared option types
Inputs = Annotated[list[Path], typer.Argument(
    help="Image files, folders (searched recursively) or text files listing paths (@list.txt).",
    show_default=False)]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Output folder; mirrors the input tree. Never the input folder itself: outputs are not written beside the originals.")]
Glob = Annotated[str | None, typer.Option("--glob", help="Only files whose name matches this pattern, e.g. '*.jpg'.")]
Resume = Annotated[bool, typer.Option("--resume", help="Skip inputs already done with the same settings (from the manifest in --out).")]
Quality = Annotated[int, typer.Option("--quality", min=1, max=100, help="JPEG/WebP quality of outputs.")]
KeepMetadata = Annotated[bool, typer.Option(
    "--keep-metadata", help="Keep EXIF (never GPS). By default all metadata is stripped.")]


def _max_pixels_value(value: int | None) -> int:
    """--max-pixels / FACEPRIV_MAX_PIXELS (click reads the variable) -> the limit in force (0 = none)."""
    try:
        return resolve_max_pixels(value)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


# envvar: the option's value comes from FACEPRIV_MAX_PIXELS when not given (a malformed value is
# a usage error naming the variable); the command's default applies only when neither is set.
MaxPixels = Annotated[int | None, typer.Option(
    "--max-pixels", envvar=MAX_PIXELS_ENV, callback=_max_pixels_value,
    help=f"Refuse images with more pixels (decompression bombs); 0 = no limit. \\[default: {DEFAULT_MAX_PIXELS}]",
    show_default=False)]
Format = Annotated[str | None, typer.Option("--format", help="Output format for all files: jpg, png, webp, tiff, bmp.")]
OnNoFace = Annotated[str, typer.Option("--on-no-face", help="When no face is found: skip (write nothing) | copy (write it unchanged, metadata stripped) | error (the file fails).")]
MaxFaces = Annotated[int | None, typer.Option("--max-faces", min=1, help="Only the N largest faces per image.")]
MinFaceSize = Annotated[float, typer.Option("--min-face-size", min=0.0, help="Ignore faces smaller than this (pixels).")]
Detector = Annotated[str, typer.Option("--detector", help="Face detector from the model registry: mtcnn, yunet, centerface.")]


def suffix_of(fmt: str | None) -> str | None:
    if fmt is None:
        return None
    fmt = fmt.lower().lstrip(".")
    table = {"jpg": ".jpg", "jpeg": ".jpg", "png": ".png", "webp": ".webp", "tif": ".tiff", "tiff": ".tiff", "bmp": ".bmp"}
    if fmt not in table:
        raise ConfigError(f"--format {fmt}: use one of jpg, png, webp, tiff, bmp")
    return table[fmt]


# ----------------------------------------------------------------- options every batch command ends with
@dataclass(frozen=True)
class BatchOptions:
    """The options shared by the batch commands (protect, deid, patch apply), as parsed."""

    detector: str = "mtcnn"
    on_no_face: str = "copy"
    max_faces: int | None = None
    min_face_size: float = 20.0
    glob: str | None = None
    resume: bool = False
    fmt: str | None = None
    quality: int = 95
    keep_metadata: bool = False
    max_pixels: int | None = None

    def policy(self):
        """The :class:`~facepriv.core.faces.FacePolicy` (which faces; what to do without one)."""
        from ..core.faces import FacePolicy

        return FacePolicy(on_no_face=self.on_no_face, max_faces=self.max_faces, min_face_size=self.min_face_size)

    def save(self):
        """The :class:`~facepriv.core.photo.SaveOptions` (quality, metadata, pixel limit)."""
        from ..core.photo import SaveOptions

        return SaveOptions(quality=self.quality, keep_metadata=self.keep_metadata, max_pixels=self.max_pixels)

    @property
    def suffix(self) -> str | None:
        """The output suffix ``--format`` asks for (None: each input's own); a usage error if unknown."""
        return suffix_of(self.fmt)

    def run_kwargs(self) -> dict[str, Any]:
        """The keyword arguments a batch runner (``run_protect``, ``run_deid``, ``run_patch_apply``)
        takes from these options and the global ones."""
        from ..core.device import resolve_device

        return {"policy": self.policy(), "save": self.save(), "device": resolve_device(state.device),
                "glob": self.glob, "resume": self.resume, "output_suffix": self.suffix,
                "progress": not (state.quiet or state.json), "verbose": state.verbose}


def batch_options(*, detector_default: str = "mtcnn", detector_help: str | None = None):
    """Decorator of a batch command that takes ``batch: BatchOptions`` (keyword-only): its
    signature, the one Typer reads, ends with the ten shared options (``--detector`` ...
    ``--max-pixels``) instead, and the command receives them as one :class:`BatchOptions`.

    ``detector_default`` / ``detector_help``: the command's own default and help of ``--detector``.
    """
    detector = Detector if detector_help is None else Annotated[str, typer.Option("--detector", help=detector_help)]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
              for name, annotation, default in (
                  ("detector", detector, detector_default), ("on_no_face", OnNoFace, "copy"),
                  ("max_faces", MaxFaces, None), ("min_face_size", MinFaceSize, 20.0), ("glob", Glob, None),
                  ("resume", Resume, False), ("fmt", Format, None), ("quality", Quality, 95),
                  ("keep_metadata", KeepMetadata, False), ("max_pixels", MaxPixels, None))]

    def decorate(fn):
        signature = inspect.signature(fn, eval_str=True)
        if "batch" not in signature.parameters:
            raise TypeError(f"{fn.__name__}: @batch_options needs a keyword-only 'batch' parameter")
        own = [p for p in signature.parameters.values() if p.name != "batch"]

        @functools.wraps(fn)
        def command(*args, **kwargs):
            batch = BatchOptions(**{p.name: kwargs.pop(p.name, p.default) for p in shared})
            return fn(*args, batch=batch, **kwargs)

        command.__signature__ = signature.replace(parameters=own + shared)
        command.__annotations__ = {p.name: p.annotation for p in own + shared}
        return command

    return decorate


# ----------------------------------------------------------------- checked numeric options
class OptionValueError(typer.BadParameter):
    """A bad option value, reported as its message alone and exit 2: ``Error: --epsilon 1.5:
    must be in (0, 64/255] ...`` (click's "Invalid value for ..." prefix would repeat the name)."""

    def format_message(self) -> str:
        return self.message


def epsilon_callback(value: str | float | None) -> float | None:
    """``--epsilon`` text -> the budget in [0, 1] units (:func:`facepriv.attacks.config.parse_epsilon`,
    the one parser of every command), or a usage error (exit 2) with its range message."""
    if value is None:
        return None
    from ..attacks.config import parse_epsilon  # lazily: the attacks package imports the models

    try:
        return parse_epsilon(value, "--epsilon")
    except ConfigError as exc:
        raise OptionValueError(str(exc)) from None


EPSILON_HELP = ("L-inf budget: the most any pixel may change. 8/255 means each pixel changes by at most 8 of "
                "255 levels (about 3 % of the range: invisible on most photos). Write 8/255, 8 (whole levels) "
                "or 0.03 (a fraction); at most 64/255.")


def epsilon_option(help: str = EPSILON_HELP, **kwargs) -> Any:
    """The ``--epsilon`` option of every command (protect, deid): parsed and range-checked at
    parse time; the command receives a float in [0, 1] units, or None when it was not given.

    Use it as ``epsilon: Annotated[str | None, common.epsilon_option(help=..., rich_help_panel=...)] = None``
    or, with the default help, ``epsilon: common.Epsilon = None``."""
    kwargs.setdefault("show_default", False)
    kwargs.setdefault("metavar", "EPS")
    return typer.Option("--epsilon", callback=epsilon_callback, help=help, **kwargs)


#: ``--epsilon`` with the default help; the value the command sees is a float (or None)
Epsilon = Annotated[str | None, epsilon_option()]


def positive(value: float | int | None, param: typer.CallbackParam) -> float | int | None:
    """Callback of numeric options that must be > 0 (typer's ``min`` cannot exclude 0)."""
    if value is not None and not value > 0:
        name = (param.opts or [f"--{param.name}"])[0]
        raise OptionValueError(f"{name} {value:g}: must be > 0")
    return value


# ----------------------------------------------------------------- help rendering
def _hide_flag_types() -> None:
    """Typer's rich help prints a type after every option, ``<bool>`` after flags too, which
    reads as if ``--utility`` took a value; flags (``--x`` or ``--x/--no-x``) get none."""
    try:
        from typer.core import TyperOption
    except ImportError:  # an older typer, which never printed it
        return
    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_facepriv_flags", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) and self.metavar is None:
            return None
        return original(self, ctx)

    display_type_rich._facepriv_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich


_hide_flag_types()


# ----------------------------------------------------------------- quiet output
def warn(text: object) -> None:
    """``warning: TEXT`` on stderr, except with ``--quiet`` (which prints errors only)."""
    if not state.quiet:
        print_warning(text)


def info(text: object) -> None:
    """A cyan note on stderr, except with ``--quiet`` or ``--json``."""
    if not (state.quiet or state.json):
        err_console.print(Text(str(text), style="cyan"), soft_wrap=True)


def finish_batch(summary, title: str) -> None:
    """The end of a batch command: the summary (:func:`print_batch_summary`), or with
    ``--quiet`` only the failed files, as errors on stderr (``--json`` still prints its JSON)."""
    if state.json or not state.quiet:
        print_batch_summary(summary, title)
        return
    for path, err in summary.failures:
        first = err.splitlines()[0] if err else "failed"
        print_error(f"{path}: {first}")
