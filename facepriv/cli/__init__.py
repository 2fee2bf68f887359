"""The ``facepriv`` command line (Typer). Thin: parse, call the library, print."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .. import __version__
from ..core.device import resolve_device, seed_everything
from ..core.errors import ConfigError
from ..core.progress import set_quiet
from . import common
from .common import print_error, state

app = typer.Typer(
    name="facepriv",
    help=(
        "Protect face photos from face-recognition systems, and audit how well the protection holds.\n\n"
        "Global options (--device, --seed, --quiet, --verbose, --json) may be given before or after the "
        "sub-command. Exit codes: 0 all good, 1 some inputs failed, 2 usage error."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"facepriv {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:N] | mps")] = "auto",
    seed: Annotated[int | None, typer.Option("--seed", help="Seed every random generator (reproducible runs).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Errors only: no progress bars, notes, warnings or summaries (--json still prints its JSON).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More detail, tracebacks on errors.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
):
    state.device, state.seed, state.quiet, state.verbose, state.json = device, seed, quiet, verbose, json_
    set_quiet(quiet or json_)
    try:
        resolve_device(device)
    except ConfigError as exc:
        print_error(exc)
        raise typer.Exit(2) from None
    seed_everything(seed)


def _register_commands() -> None:
    from . import audit, deid, models, patch, protect

    app.command("deid", help=deid.HELP, no_args_is_help=True)(deid.deid)
    app.command("protect", help=protect.HELP, no_args_is_help=True)(protect.protect)
    app.add_typer(patch.app, name="patch")
    app.add_typer(audit.app, name="audit")
    app.add_typer(models.app, name="models")


_register_commands()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    app(args=common.hoist_global_options(argv), prog_name="facepriv")
