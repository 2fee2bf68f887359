"""Shared CLI plumbing: global options, option types, error handling and output.

The CLI only parses arguments, calls the library and prints. Progress bars and messages go to
stderr; stdout carries the human summary or, with ``--json``, exactly one JSON document.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import click
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


def _redactor():
    """:func:`facepriv.audit.secrets.redact_text`, imported when an error is printed (not at
    start-up: importing it loads the ``facepriv.audit`` package). Secrets are only ever
    registered in that module, so if it cannot be imported none can have been registered and
    the text is returned as it is."""
    try:
        from ..audit.secrets import redact_text
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
    and tracebacks pass through :func:`facepriv.audit.secrets.redact_text` first, so an
    exception that quotes an API key never prints it.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, click.exceptions.ClickException, click.exceptions.Abort):
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
    """Human or JSON summary of a batch run; failures are listed with their reasons."""
    if state.json:
        emit_json(summary.to_json())
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
    n = sum(summary.counts.values())
    rate = n / summary.elapsed if summary.elapsed > 0 else 0.0
    out_console.print(f"{n} processed in {summary.elapsed:.1f} s ({rate:.2f} img/s); manifest: "
                      f"{escape(str(summary.manifest))}")


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
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Output folder; mirrors the input tree.")]
Glob = Annotated[str | None, typer.Option("--glob", help="Only files whose name matches this pattern, e.g. '*.jpg'.")]
Resume = Annotated[bool, typer.Option("--resume", help="Skip inputs already done with the same settings (manifest).")]
Quality = Annotated[int, typer.Option("--quality", min=1, max=100, help="JPEG/WebP quality of outputs.")]
KeepMetadata = Annotated[bool, typer.Option(
    "--keep-metadata", help="Keep EXIF (never GPS). By default all metadata is stripped.")]


def _max_pixels_value(value: int | None) -> int:
    """--max-pixels / FACEPRIV_MAX_PIXELS (click reads the variable) -> the limit in force (0 = none)."""
    try:
        return resolve_max_pixels(value)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


def resolve_max_pixels_option(value: int | None) -> int:
    """For commands that receive ``--max-pixels`` as None: the env value or the default, or a
    usage error (exit 2) naming a malformed FACEPRIV_MAX_PIXELS."""
    return _max_pixels_value(value)


# envvar: the option's value comes from FACEPRIV_MAX_PIXELS when not given (a malformed value is
# a usage error naming the variable); the command's default applies only when neither is set.
MaxPixels = Annotated[int | None, typer.Option(
    "--max-pixels", envvar=MAX_PIXELS_ENV, callback=_max_pixels_value,
    help=f"Refuse images with more pixels (decompression bombs); 0 = no limit. [default: {DEFAULT_MAX_PIXELS}]",
    show_default=False)]
Format = Annotated[str | None, typer.Option("--format", help="Output format for all files: jpg, png, webp, tiff, bmp.")]
OnNoFace = Annotated[str, typer.Option("--on-no-face", help="No face found: skip | copy (unchanged) | error.")]
MaxFaces = Annotated[int | None, typer.Option("--max-faces", min=1, help="Only the N largest faces per image.")]
MinFaceSize = Annotated[float, typer.Option("--min-face-size", help="Ignore faces smaller than this (pixels).")]
Detector = Annotated[str, typer.Option("--detector", help="Face detector from the model registry: mtcnn, yunet, centerface.")]


def suffix_of(fmt: str | None) -> str | None:
    if fmt is None:
        return None
    fmt = fmt.lower().lstrip(".")
    table = {"jpg": ".jpg", "jpeg": ".jpg", "png": ".png", "webp": ".webp", "tif": ".tiff", "tiff": ".tiff", "bmp": ".bmp"}
    if fmt not in table:
        raise ConfigError(f"--format {fmt}: use one of jpg, png, webp, tiff, bmp")
    return table[fmt]
