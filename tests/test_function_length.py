"""No function in facepriv/ is over 100 lines (module functions, methods and nested functions).

A function's length runs from its ``def`` line to its last line (decorators not counted).
Typer command functions in facepriv/cli/ are the exception: their option signature is long by
nature, so only their body (first statement to last line) is held to the limit. A command
function is one decorated with ``<typer app>.command(...)`` / ``.callback(...)`` or registered
with ``<typer app>.command(...)(<module>.<function>)`` somewhere in facepriv/cli/.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "facepriv"
MAX_LINES = 100


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function under ``tree``, nested ones and methods included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{node.name}"
            yield name, node
            yield from _functions(node, f"{name}.<locals>.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def _is_command_call(node: ast.AST) -> bool:
    """``<x>.command(...)`` or ``<x>.callback(...)``: a Typer registration (or decorator) call."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("command", "callback"))


def _registered_commands(trees: dict[str, ast.AST]) -> set[str]:
    """Functions in facepriv/cli/ that Typer runs as commands, as ``cli/<file>.py:<name>``."""
    modules = {Path(rel).stem: rel for rel in trees}
    out: set[str] = set()
    for rel, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                    _is_command_call(d) for d in node.decorator_list):
                out.add(f"{rel}:{node.name}")
            # app.command("name", ...)(module.function) or app.command(...)(function)
            if isinstance(node, ast.Call) and _is_command_call(node.func) and node.args:
                target = node.args[0]
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                    if target.value.id in modules:
                        out.add(f"{modules[target.value.id]}:{target.attr}")
                elif isinstance(target, ast.Name):
                    out.add(f"{rel}:{target.id}")
    return out


def _read_package() -> tuple[dict[str, int], set[str]]:
    """Length of every function in facepriv/ as {``<path>:<qualified name>``: lines}, and the
    Typer command functions with their length measured from the body (the signature excepted)."""
    trees = {p.relative_to(PACKAGE).as_posix(): ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
             for p in sorted(PACKAGE.rglob("*.py"))}
    commands = _registered_commands({rel: t for rel, t in trees.items() if rel.startswith("cli/")})
    lengths: dict[str, int] = {}
    for rel, tree in trees.items():
        for name, node in _functions(tree):
            key = f"{rel}:{name}"
            start = node.body[0].lineno if key in commands else node.lineno
            lengths[key] = node.end_lineno - start + 1
    return lengths, commands


def test_no_function_is_over_100_lines():
    lengths, _ = _read_package()
    long = {k: n for k, n in sorted(lengths.items()) if n > MAX_LINES}
    assert not long, (f"functions over {MAX_LINES} lines (split them into named steps): "
                      + ", ".join(f"{k} ({n})" for k, n in long.items()))


def test_the_reader_sees_functions_methods_nested_functions_and_commands():
    lengths, commands = _read_package()
    assert len(lengths) > 500, len(lengths)
    # module functions, whatever their length
    for key in ("attacks/linf.py:attack_faces", "models/facenet.py:graph_to_state_dict",
                "deid/video.py:deid_video", "patch/train.py:validate_generator"):
        assert key in lengths, key
    # methods and nested functions
    assert "deid/video.py:IoUTracker.update" in lengths
    assert "patch/train.py:PatchTrainer.fit" in lengths
    assert "patch/train.py:detect_video" not in lengths  # names are tied to their file
    assert "deid/video.py:detect_video.<locals>.flush" in lengths
    # Typer commands: decorated ones and those registered in cli/__init__.py
    assert {"cli/patch.py:train", "cli/audit.py:audit", "cli/protect.py:protect", "cli/deid.py:deid"} <= commands
    assert "cli/common.py:handle_errors" not in commands
    # a command's signature is excepted, not its body
    src = (PACKAGE / "cli" / "protect.py").read_text(encoding="utf-8")
    node = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "protect")
    assert lengths["cli/protect.py:protect"] == node.end_lineno - node.body[0].lineno + 1


def test_the_limit_catches_a_long_function():
    body = "\n".join(f"            x{i} = {i}" for i in range(MAX_LINES))
    tree = ast.parse(f"class C:\n    def m(self):\n        def inner():\n{body}\n        return inner\n")
    found = {name: n.end_lineno - n.lineno + 1 for name, n in _functions(tree)}
    assert found["C.m.<locals>.inner"] == MAX_LINES + 1
    assert found["C.m"] > MAX_LINES
