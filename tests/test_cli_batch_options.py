"""The options every batch command ends with (--detector ... --max-pixels) are one definition,
``common.batch_options``: the same options in the same order for protect, deid and patch apply,
and the same policy, save options and output suffix handed to each command's runner."""

from __future__ import annotations

import shutil
from typing import Annotated

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from conftest import fixture_path
from facepriv.cli import app, common
from facepriv.cli.common import hoist_global_options
from facepriv.core.batch import BatchSummary
from facepriv.core.faces import FacePolicy
from facepriv.core.io import DEFAULT_MAX_PIXELS

runner = CliRunner()
SHARED = ["--detector", "--on-no-face", "--max-faces", "--min-face-size", "--glob", "--resume", "--format",
          "--quality", "--keep-metadata", "--max-pixels"]


def _command(*path):
    cmd = get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def _shared_params(*path):
    params = [p for p in _command(*path).params if p.opts and p.opts[0].startswith("--") and p.name != "help"]
    return params[-len(SHARED):]


@pytest.mark.parametrize("path", [("protect",), ("deid",), ("patch", "apply")])
def test_batch_commands_end_with_the_shared_options_in_order(path):
    assert [p.opts[0] for p in _shared_params(*path)] == SHARED


def test_shared_options_have_one_help_and_default_except_deids_detector():
    def described(path):
        return [(p.opts[0], p.help, p.default) for p in _shared_params(*path)]

    protect, deid, apply = described(("protect",)), described(("deid",)), described(("patch", "apply"))
    assert protect == apply
    assert deid[1:] == protect[1:]
    assert protect[0][2] == "mtcnn" and deid[0][2] == "yunet"
    assert "yunet (default here" in deid[0][1] and protect[0][1] == "Face detector from the model registry: " \
                                                                   "mtcnn, yunet, centerface."


@pytest.fixture
def photo_dir(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    shutil.copy(fixture_path("obama.jpg"), d / "obama.jpg")
    return d


RUNNERS = {"protect": ("facepriv.protect", "run_protect"), "deid": ("facepriv.deid", "run_deid"),
           "apply": ("facepriv.patch", "run_patch_apply")}


@pytest.fixture
def fake_runners(monkeypatch, tmp_path):
    """protect's, deid's and patch apply's runners replaced: each records its config and keywords."""
    import importlib

    seen: dict = {}

    def fake(inputs, out, cfg, **kw):
        seen.update(cfg=cfg, kw=kw)
        return BatchSummary(1, {"ok": 1}, [], 0, 0.1, tmp_path / "missing-manifest.jsonl")

    for module, name in RUNNERS.values():
        monkeypatch.setattr(importlib.import_module(module), name, fake)
    return seen


def _args(command, photo_dir, tmp_path):
    head = {"protect": ["protect"], "deid": ["deid"], "apply": ["patch", "apply", "--generator", str(tmp_path)]}
    return ["-q", *head[command], str(photo_dir), "--out", str(tmp_path / "o")]


@pytest.mark.parametrize("command", list(RUNNERS))
def test_shared_options_reach_the_runner_as_policy_save_and_suffix(command, photo_dir, tmp_path, fake_runners):
    given = ["--detector", "centerface", "--on-no-face", "skip", "--max-faces", "2", "--min-face-size", "30",
             "--glob", "*.jpg", "--resume", "--format", "PNG", "--quality", "80", "--keep-metadata",
             "--max-pixels", "5000000"]
    r = runner.invoke(app, hoist_global_options(_args(command, photo_dir, tmp_path) + given))
    assert r.exit_code == 0, r.output
    kw = fake_runners["kw"]
    assert kw["policy"] == FacePolicy(on_no_face="skip", max_faces=2, min_face_size=30.0)
    save = kw["save"]
    assert (save.quality, save.keep_metadata, save.max_pixels) == (80, True, 5_000_000)
    assert (kw["glob"], kw["resume"], kw["output_suffix"]) == ("*.jpg", True, ".png")
    assert kw["progress"] is False  # -q
    assert fake_runners["cfg"].detector == "centerface"


@pytest.mark.parametrize("command", list(RUNNERS))
def test_without_shared_options_each_runner_gets_the_defaults(command, photo_dir, tmp_path, fake_runners):
    r = runner.invoke(app, hoist_global_options(_args(command, photo_dir, tmp_path)))
    assert r.exit_code == 0, r.output
    kw = fake_runners["kw"]
    assert kw["policy"] == FacePolicy(on_no_face="copy", max_faces=None, min_face_size=20.0)
    save = kw["save"]
    assert (save.quality, save.keep_metadata, save.max_pixels) == (95, False, DEFAULT_MAX_PIXELS)
    assert (kw["glob"], kw["resume"], kw["output_suffix"]) == (None, False, None)
    assert fake_runners["cfg"].detector == ("yunet" if command == "deid" else "mtcnn")


@pytest.mark.parametrize("command", list(RUNNERS))
def test_unknown_format_is_a_usage_error_and_nothing_runs(command, photo_dir, tmp_path, fake_runners):
    r = runner.invoke(app, hoist_global_options(_args(command, photo_dir, tmp_path) + ["--format", "gif"]))
    assert r.exit_code == 2
    assert "--format gif: use one of jpg, png, webp, tiff, bmp" in r.output
    assert "kw" not in fake_runners


def test_batch_options_decorator_hands_one_object_to_any_command():
    seen = []
    mini = typer.Typer()

    @mini.command("run")
    @common.handle_errors
    @common.batch_options(detector_default="yunet", detector_help="Which detector, here.")
    def run(name: Annotated[str, typer.Option("--name")] = "x", *, batch: common.BatchOptions):
        seen.append((name, batch, batch.suffix))

    assert runner.invoke(mini, ["--name", "y", "--max-faces", "3", "--format", "jpeg"]).exit_code == 0
    name, batch, suffix = seen[-1]
    assert name == "y" and batch.detector == "yunet" and batch.max_faces == 3 and suffix == ".jpg"
    assert batch.policy().max_faces == 3 and batch.save().quality == 95
    text = runner.invoke(mini, ["--help"], env={"COLUMNS": "200"}).output
    assert "Which detector, here." in text and text.index("--name") < text.index("--detector")
    bad = runner.invoke(mini, ["--format", "gif"])  # a ConfigError, turned into exit 2 by handle_errors
    assert bad.exit_code == 2 and "--format gif" in bad.output


def test_batch_options_decorator_needs_a_batch_parameter():
    with pytest.raises(TypeError, match="keyword-only 'batch' parameter"):
        common.batch_options()(lambda name="x": name)
