"""The audit's structure: it never imports the protection packages it judges, no function in
facepriv/audit is longer than 100 lines, and ``run_audit`` reads as the sequence of its steps
(at most 120 lines).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

AUDIT = Path(__file__).resolve().parents[2] / "facepriv" / "audit"


def test_audit_modules_never_import_protection_packages():
    code = r"""
import importlib, json, pkgutil, sys
import facepriv.audit as audit
names = [m.name for m in pkgutil.walk_packages(audit.__path__, "facepriv.audit.")]
for n in names:
    importlib.import_module(n)
import facepriv.cli.audit
bad = sorted(m for m in sys.modules
             if m.split(".")[:2] in (["facepriv", "protect"], ["facepriv", "patch"], ["facepriv", "deid"],
                                     ["facepriv", "attacks"]))
print(json.dumps({"imported": names, "forbidden": bad}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=AUDIT.parents[1])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    imported = set(out["imported"])
    assert {"facepriv.audit.runner", "facepriv.audit.report", "facepriv.audit.metrics", "facepriv.audit.apis.facepp",
            "facepriv.audit.apis.azure", "facepriv.audit.apis.rekognition", "facepriv.audit.calibrate"} <= imported
    assert out["forbidden"] == []


def _functions() -> dict[str, int]:
    """``path:qualified name`` -> length in lines of every function (methods and nested ones too)."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str, path: Path) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out[f"{path.relative_to(AUDIT)}:{name}"] = child.end_lineno - child.lineno + 1
                visit(child, name + ".", path)
            else:
                visit(child, prefix, path)

    for f in sorted(AUDIT.rglob("*.py")):
        visit(ast.parse(f.read_text()), "", f)
    return out


def test_the_audit_package_is_read_from_the_source():
    funcs = _functions()
    # module functions, methods (subpackages too) and nested functions are all measured
    assert {"runner.py:run_audit", "apis/base.py:FaceAPI.compare_many", "quality.py:_quality.feed"} <= set(funcs)


def test_no_function_in_the_audit_is_longer_than_100_lines():
    long = {k: n for k, n in _functions().items() if n > 100}
    assert long == {}, f"functions over 100 lines: {long}"


def test_run_audit_is_a_short_orchestrator():
    assert _functions()["runner.py:run_audit"] <= 120
