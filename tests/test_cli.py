"""The CLI as a user drives it: help, global options, exit codes, deid on a real folder, models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


def said(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


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
        assert json.loads(r.stdout)["no_face"] == ({status: 1} if policy != "error" else {})
        assert (out / "noface.png").exists() == (policy == "copy")
    # the human summary says plainly that a file went through unchanged for want of a face
    r = invoke("deid", src, "--out", tmp_path / "copy2")
    assert r.exit_code == 0
    assert "copied (no face found: unchanged)" in said(r) and "1 file(s) had no face" in said(r)


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


# ----------------------------------------------------------------------------- exit codes
def test_only_usage_errors_exit_2():
    import typer

    from facepriv.cli.common import handle_errors
    from facepriv.core.errors import ConfigError, FaceprivError

    def code(exc: BaseException) -> int:
        @handle_errors
        def cmd():
            raise exc

        with pytest.raises(typer.Exit) as info:
            cmd()
        return info.value.exit_code

    assert code(ConfigError("bad option")) == 2
    # internal failures: a corrupt weights file (ValueError), a missing model file, a bug
    assert code(ValueError("dlib .dat truncated")) == 1
    assert code(FileNotFoundError("weights for x not found")) == 1
    assert code(RuntimeError("boom")) == 1
    assert code(FaceprivError("a download failed")) == 1
    assert code(KeyboardInterrupt()) == 130


def test_bad_max_pixels_setting_is_a_usage_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRIV_MAX_PIXELS", "lots")
    assert invoke("--version").exit_code == 0  # never an import-time traceback
    r = invoke("deid", tmp_path, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "FACEPRIV_MAX_PIXELS" in said(r)
    monkeypatch.delenv("FACEPRIV_MAX_PIXELS")
    r = invoke("deid", tmp_path, "--out", tmp_path / "o", "--max-pixels", "-5")
    assert r.exit_code == 2 and "0 (no limit) or a positive number" in said(r)


# ----------------------------------------------------------------------------- models list
def test_models_list_reads_at_80_columns_and_sizes_hub_models(monkeypatch, tmp_path):
    import io

    from rich.console import Console

    from facepriv.cli.models import models_table

    monkeypatch.setenv("FACEPRIV_HOME", str(tmp_path / "home"))
    rows = json.loads(invoke("--json", "models", "list").stdout)
    by = {r["name"]: r for r in rows}
    for name in ("ddpm-celebahq-256", "ddpm-ema-celebahq-256", "taesd", "sd-vae-ft-mse"):
        assert by[name]["size_bytes"] and by[name]["size_approx"] is True, name
        assert by[name]["source_short"].startswith("hf:")
    assert by["dlib-resnet"]["size_approx"] is False
    buf = io.StringIO()
    Console(file=buf, width=80, color_system=None).print(models_table(rows, 80))
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    for r in rows:  # every name, source label and status whole on one line: nothing folded
        for piece in (r["name"], r["source_short"], r["status"]):
            assert any(piece in line for line in lines), piece
    assert "~434 MB" in text  # google/ddpm-celebahq-256, approximate
    wide = io.StringIO()
    Console(file=wide, width=120, color_system=None).print(models_table(rows, 120))
    assert all(len(line) <= 120 for line in wide.getvalue().splitlines())
    assert any("hf:google/ddpm-celebahq-256" in line and "ddpm-celebahq-256 " in line
               for line in wide.getvalue().splitlines())  # wide: the source has its own column


# ----------------------------------------------------------------------------- inputs and outputs
@pytest.mark.realmodels
def test_format_collisions_are_refused_before_any_work(tmp_path, edge_cases):
    d = tmp_path / "D"
    d.mkdir()
    shutil.copy(edge_cases["gps.jpg"], d / "a.jpg")
    shutil.copy(edge_cases["noface.png"], d / "a.png")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    r = invoke("deid", d / "a.jpg", d / "a.png", "--format", "png", "--out", d)
    assert r.exit_code == 2 and "would overwrite the input" in said(r)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # nothing written, no manifest

    x = tmp_path / "X"
    x.mkdir()
    shutil.copy(edge_cases["gps.jpg"], x / "x.jpg")
    shutil.copy(edge_cases["noface.png"], x / "x.png")
    r = invoke("deid", x / "x.jpg", x / "x.png", "--format", "png", "--out", tmp_path / "out")
    assert r.exit_code == 2 and "same output" in said(r)
    assert not (tmp_path / "out").exists()


@pytest.mark.realmodels
def test_out_at_the_input_folder_or_above_and_empty_globs(tmp_path, edge_cases):
    photos = tmp_path / "P" / "photos"
    photos.mkdir(parents=True)
    shutil.copy(edge_cases["gps.jpg"], photos / "p.jpg")
    before = (photos / "p.jpg").read_bytes()
    r = invoke("deid", photos, "--out", photos)  # would write every output over its input
    assert r.exit_code == 2 and "would overwrite the input" in said(r)
    assert (photos / "p.jpg").read_bytes() == before
    r = invoke("--json", "deid", photos, "--out", tmp_path / "P")  # above the input: processed
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["counts"] == {"ok": 1} and (tmp_path / "P" / "p.jpg").is_file()
    r = invoke("deid", photos, "--glob", "*.heic", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "no input files" in said(r)


@pytest.mark.realmodels
def test_deid_edge_case_folder_end_to_end(tmp_path, edge_cases):
    """Every generated edge case through `facepriv deid`: per-file statuses, alpha and 16 bit kept."""
    from facepriv.core.io import load_image

    folder = next(iter(edge_cases.values())).parent
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = tmp_path / "out"
    r = invoke("--json", "deid", folder, "--method", "pixelate", "--out", out)
    assert r.exit_code == 1, r.output
    summary = json.loads(r.stdout)
    rows = {Path(row["input"]).name: row for row in Manifest.read_all(out)}
    expected = {name: "ok" for name in ("cmyk.jpg", "deep16.png", "gps.jpg", "grey.png", "photo.bmp", "photo.tiff",
                                        "photo.webp", "rgba.png", "rotated.jpg")}
    expected.update({name: "error" for name in ("corrupt.jpg", "empty.jpg", "huge.png", "text.jpg", "truncated.jpg")})
    expected["noface.png"] = "copied"
    assert {n: row["status"] for n, row in rows.items()} == expected
    assert summary["no_face"] == {"copied": 1}
    reasons = {n: row["error"] for n, row in rows.items() if row["status"] == "error"}
    assert "over the limit" in reasons["huge.png"] and "truncated" in reasons["truncated.jpg"]
    assert "empty" in reasons["empty.jpg"] and "not an image" in reasons["text.jpg"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # inputs untouched
    assert not any((out / n).exists() for n in reasons)

    # RGBA PNG: alpha kept exactly, the face pixelated
    src, dst = load_image(folder / "rgba.png"), load_image(out / "rgba.png")
    assert dst.alpha is not None and np.array_equal(dst.alpha, src.alpha)
    x1, y1, x2, y2 = [int(v) for v in rows["rgba.png"]["boxes"][0]]
    cx, cy, w = (x1 + x2) // 2, (y1 + y2) // 2, (x2 - x1) // 4
    flat = (np.abs(np.diff(dst.rgb[cy - w: cy + w, cx - w: cx + w].astype(int), axis=1)).max(-1) == 0).mean()
    assert flat > 0.7
    # 16-bit PNG: still 16 bit, untouched pixels keep their 16-bit values, the face edited
    src, dst = load_image(folder / "deep16.png"), load_image(out / "deep16.png")
    assert dst.bit_depth == 16 and tuple(dst.high[0, 0]) == (1, 2, 3)
    x1, y1, x2, y2 = [int(v) for v in rows["deep16.png"]["boxes"][0]]
    face = (slice(y1, y2), slice(x1, x2))
    assert np.abs(dst.high[face].astype(int) - src.high[face].astype(int)).mean() > 500
    bw, bh = x2 - x1, y2 - y1  # the edited region (an ellipse around the face) stays near the box
    near = np.zeros(src.rgb.shape[:2], bool)
    near[max(0, y1 - bh // 2): y2 + bh // 2, max(0, x1 - bw // 2): x2 + bw // 2] = True
    assert near.mean() < 0.8 and np.array_equal(dst.high[~near], src.high[~near])
    # grey stays grey, EXIF rotation baked in (upright, no orientation tag), CMYK becomes RGB
    with Image.open(out / "grey.png") as im:
        assert im.mode == "L"
    with Image.open(out / "rotated.jpg") as im, Image.open(out / "gps.jpg") as ref:
        assert im.size == ref.size and len(im.getexif()) == 0
    with Image.open(out / "cmyk.jpg") as im:
        assert im.mode == "RGB"
    # the no-face image is written through unchanged (pixels), metadata stripped
    assert np.array_equal(load_image(out / "noface.png").rgb, load_image(folder / "noface.png").rgb)


@pytest.mark.realmodels
def test_max_faces_keeps_the_largest_faces(tmp_path):
    from facepriv.core.faces import FacePolicy
    from facepriv.core.io import load_image
    from facepriv.models import create_model

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(fixture_path("group.jpg"), src / "group.jpg")
    out = tmp_path / "out"
    r = invoke("--json", "deid", src, "--method", "pixelate", "--max-faces", "2", "--format", "png", "--out", out)
    assert r.exit_code == 0, r.output
    row = Manifest.read_all(out)[0]
    assert row["faces"] == 2
    rgb = load_image(src / "group.jpg").rgb
    faces = FacePolicy().select(create_model("yunet").detect(rgb))
    assert len(faces) == 6
    by_area = sorted(faces, key=lambda f: f.width * f.height, reverse=True)
    want = [[round(float(v), 2) for v in f.box] for f in by_area[:2]]
    assert sorted(row["boxes"]) == sorted(want)
    dst = load_image(out / "group.png").rgb.astype(int)
    for f, edited in [(f, True) for f in by_area[:2]] + [(f, False) for f in by_area[2:]]:
        x1, y1, x2, y2 = [int(v) for v in f.box]
        cx, cy, w = (x1 + x2) // 2, (y1 + y2) // 2, max(2, (x2 - x1) // 6)
        diff = np.abs(dst[cy - w: cy + w, cx - w: cx + w] - rgb[cy - w: cy + w, cx - w: cx + w].astype(int)).mean()
        assert (diff > 2) == edited, (f.box, diff)


def test_error_text_with_brackets_is_printed_as_written():
    """Rich markup must not eat user text: 'tpu[aws]' (and 'facepriv[aws]', '[facepp]') print whole."""
    r = runner.invoke(app, ["--device", "tpu[aws]", "models", "list"])
    assert r.exit_code == 2 and "unknown device 'tpu[aws]'" in r.output
