"""The package layers: cli -> commands (protect, deid, patch, audit) -> attacks -> models -> core.

A module imports only its own layer or the ones below it; the commands never import one another
(audit, the judge, never imports what it judges). Read from the source (every ``import``,
including the ones inside functions), so a lazy import cannot hide a wrong edge."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "facepriv"
LAYER = {"core": 0, "models": 1, "attacks": 2, "protect": 3, "deid": 3, "patch": 3, "audit": 3, "cli": 4}


def _imports(path: Path) -> set[str]:
    """Absolute names of the facepriv modules ``path`` imports (relative imports resolved)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    pkg = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            out.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("facepriv.")}


def _edges() -> set[tuple[str, str]]:
    """(layer package of the importer, layer package of the imported) for every import."""
    edges = set()
    for f in PACKAGE.rglob("*.py"):
        src = f.relative_to(PACKAGE).parts[0]
        for m in _imports(f):
            dst = m.split(".")[1]
            if src in LAYER and dst in LAYER and src != dst:
                edges.add((src, dst))
    return edges


def test_the_import_graph_is_read_from_the_source():
    edges = _edges()
    # edges the code is known to have: the reader sees relative, absolute and lazy imports
    assert {("cli", "protect"), ("attacks", "models"), ("models", "core"), ("audit", "models")} <= edges


def test_every_package_imports_only_its_own_layer_or_lower():
    wrong = sorted((s, d) for s, d in _edges() if LAYER[d] > LAYER[s] or (LAYER[d] == LAYER[s] == LAYER["audit"]))
    assert wrong == [], f"imports against the layering: {wrong}"


def test_thresholds_and_secret_redaction_live_below_the_commands():
    # the threshold policy (models) and redaction (core) are shared by every command: attacks and
    # the commands reach them without importing audit
    assert (PACKAGE / "models" / "thresholds.py").is_file() and (PACKAGE / "core" / "secrets.py").is_file()
    assert not any(d == "audit" for s, d in _edges() if s != "cli")
