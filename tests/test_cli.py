"""The CLI as a user drives it: help, global options, exit codes, deid on a real folder, models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import fixture_path
from facepriv import __version__
from facepriv.cli import app
from facepriv.cli.common import hoist_global_options
from facepriv.core.batch import Manifest

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, hoist_global_options(list(map(str, args))))


def test_version_and_help():
    r = invoke("--version")
    assert r.exit_code == 0 and __version__ in r.output
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("protect", "patch", "deid", "audit", "models"):
        assert cmd in r.output
        sub = invoke(cmd, "--help")
        assert sub.exit_code == 0 and "Usage" in sub.output


def test_global_options_anywhere():
    assert hoist_global_options(["deid", "x", "--device", "cpu", "--json", "--seed=3", "-o", "y"]) == \
        ["--device", "cpu", "--json", "--seed=3", "deid", "x", "-o", "y"]
    assert hoist_global_options(["deid", "--", "--json"]) == ["deid", "--", "--json"]


def test_usage_errors_exit_2(tmp_path):
    assert invoke("deid", tmp_path, "--method", "nonsense", "--out", tmp_path / "o").exit_code == 2
    assert invoke("deid", tmp_path / "missing", "--out", tmp_path / "o").exit_code == 2
    assert invoke("--device", "cuda:7", "models", "list").exit_code == 2
    assert invoke("deid", tmp_path, "--quality", "500").exit_code == 2


@pytest.mark.realmodels
def test_deid_folder_end_to_end_with_resume(tmp_path, edge_cases, mtcnn):
    photos = tmp_path / "photos"
    (photos / "people").mkdir(parents=True)
    for name in ("obama.jpg", "biden.jpg"):
        shutil.copy(fixture_path(name), photos / "people" / name)
    shutil.copy(fixture_path("group.jpg"), photos / "group.jpg")
    shutil.copy(edge_cases["corrupt.jpg"], photos / "corrupt.jpg")
    shutil.copy(edge_cases["text.jpg"], photos / "notes.jpg")
    shutil.copy(edge_cases["gps.jpg"], photos / "gps.jpg")
    before = {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()}
    out = tmp_path / "out"

    # PNG outputs, so that the check below sees the mosaic without JPEG ringing
    r = invoke("--json", "deid", photos, "--method", "pixelate", "--out", out, "--format", "png")
    assert r.exit_code == 1, r.output
    summary = json.loads(r.stdout)
    assert summary["counts"] == {"ok": 4, "error": 2}
    assert {f["input"].rsplit("/", 1)[-1] for f in summary["failures"]} == {"corrupt.jpg", "notes.jpg"}
    # inputs untouched, output tree mirrors the input tree
    assert {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()} == before
    for rel in ("people/obama.png", "people/biden.png", "group.png", "gps.png"):
        assert (out / rel).is_file()
    # every face is pixelated: constant blocks inside each detected face box of the input
    rows = {r_["input"].rsplit("/", 1)[-1]: r_ for r_ in Manifest.read_all(out)}
    assert rows["group.jpg"]["faces"] == 6 and rows["obama.jpg"]["faces"] == 1
    for name, rel in (("group.jpg", "group"), ("biden.jpg", "people/biden"), ("obama.jpg", "people/obama")):
        src = np.asarray(Image.open(photos / f"{rel}.jpg").convert("RGB")).astype(int)
        dst = np.asarray(Image.open(out / f"{rel}.png").convert("RGB")).astype(int)
        for box in rows[name]["boxes"]:
            x1, y1, x2, y2 = [int(v) for v in box]
            cx, cy, w = (x1 + x2) // 2, (y1 + y2) // 2, (x2 - x1) // 4
            patch_in, patch_out = src[cy - w: cy + w, cx - w: cx + w], dst[cy - w: cy + w, cx - w: cx + w]
            # a mosaic: neighbouring pixels are equal except at block edges
            flat_out = (np.abs(np.diff(patch_out, axis=1)).max(-1) == 0).mean()
            flat_in = (np.abs(np.diff(patch_in, axis=1)).max(-1) == 0).mean()
            assert flat_out > 0.7 and flat_in < 0.3, (name, box, flat_out, flat_in)
    # metadata stripped from the output of the photo that had GPS
    with Image.open(out / "gps.png") as im:
        assert len(im.getexif()) == 0
    # manifest complete: every input has a line with status, faces, timings, error
    assert len(rows) == 6 and all(set(v) >= {"status", "faces", "timings", "error", "output"} for v in rows.values())
    assert rows["corrupt.jpg"]["status"] == "error" and "not an image" in rows["corrupt.jpg"]["error"]

    # resume: nothing that succeeded is done again; outputs are not rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    r2 = invoke("--json", "deid", photos, "--method", "pixelate", "--out", out, "--format", "png", "--resume")
    assert r2.exit_code == 1
    s2 = json.loads(r2.stdout)
    assert s2["resumed"] == 4 and s2["counts"] == {"error": 2}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes


@pytest.mark.realmodels
def test_no_face_policies(tmp_path, edge_cases, mtcnn):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(edge_cases["noface.png"], src / "noface.png")
    for policy, code, status in (("copy", 0, "copied"), ("skip", 0, "skipped"), ("error", 1, "error")):
        out = tmp_path / policy
        r = invoke("--json", "deid", src, "--out", out, "--on-no-face", policy)
        assert r.exit_code == code
        assert json.loads(r.stdout)["counts"] == {status: 1}
        assert (out / "noface.png").exists() == (policy == "copy")


def test_models_list_info_and_import(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRIV_HOME", str(tmp_path / "home"))
    r = invoke("--json", "models", "list")
    assert r.exit_code == 0
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["ir152"]["status"] == "needs file" and rows["ddpm-celebahq-256"]["status"] == "download"
    r = invoke("--json", "models", "info", "irse50")
    info = json.loads(r.stdout)
    assert info["thresholds"]["1e-3"] == pytest.approx(0.312703) and info["input_size"] == [112, 112]
    assert invoke("models", "info", "no-such-model").exit_code == 2
    # import a user checkpoint (a self-made mobileface state dict) and see it become available
    import torch

    from facepriv.models.protocol_fr import build_mobileface

    ckpt = tmp_path / "mobile_face.pth"
    torch.save(build_mobileface().state_dict(), ckpt)
    r = invoke("models", "import", "mobileface", ckpt)
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(invoke("--json", "models", "list").stdout)}
    assert rows["mobileface"]["available"] is True


@pytest.mark.realmodels
def test_installed_offline_models_are_available():
    """After scripts/install.sh the PyPI-sourced models work with no network at all."""
    r = invoke("--json", "models", "list")
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    for name in ("dlib-resnet", "facenet-casia", "sface", "sface-onnx", "expr-fer7", "mtcnn", "yunet", "centerface"):
        assert rows[name]["available"], f"{name} is not available offline"
