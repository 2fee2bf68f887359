"""``facepriv protect`` as a user runs it: MAP with a tiny score network, save/reuse, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import fixture_path
from facepriv.cli import app
from facepriv.cli.common import hoist_global_options
from test_protect_map import tiny_unet_dir

runner = CliRunner()
FAST = ["--lr", "1e-3", "--t0", "100", "--n-inv", "8", "--n-gen", "2", "--w-smooth", "1", "--w-sm", "0.1"]


def invoke(*args):
    return runner.invoke(app, hoist_global_options(list(map(str, args))))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_protect_help_lists_the_options():
    r = runner.invoke(app, ["protect", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert r.exit_code == 0
    for opt in ("--method", "--target", "--expression", "--expression-ref", "--score-model", "--model",
                "--save-model", "--steps", "--lr", "--t0", "--n-inv", "--n-gen", "--w-id", "--w-exp",
                "--w-smooth", "--w-sm", "--projection", "--ema", "--surrogates", "--expression-model",
                "--epsilon", "--attack-steps", "--batch-faces", "--resume", "--on-no-face"):
        assert opt in r.output, opt


def test_protect_usage_errors_exit_2(tmp_path):
    img = tmp_path / "a.jpg"
    shutil.copy(fixture_path("obama.jpg"), img)
    out = tmp_path / "o"
    assert invoke("protect", img, "--out", out, "--method", "nonsense").exit_code == 2
    assert invoke("protect", img, "--out", out, "--projection", "diagonal").exit_code == 2
    assert invoke("protect", img, "--out", out, "--model", tmp_path, "--save-model", tmp_path / "m").exit_code == 2
    assert invoke("protect", img, "--out", out, "--target", tmp_path / "missing.jpg").exit_code == 2
    assert invoke("protect", img, "--out", out, "--model", tmp_path).exit_code == 2  # not a saved MAP model
    assert invoke("protect", img, "--out", out, "--method", "pgd", "--save-model", tmp_path / "m").exit_code == 2
    assert not out.exists() or not any(out.glob("*.jpg"))


@pytest.mark.realmodels
@pytest.mark.slow
def test_protect_map_cli_save_reuse_and_json(tmp_path):
    tiny = tiny_unet_dir(tmp_path / "tiny")
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(fixture_path("obama.jpg"), photos / "obama.jpg")
    shutil.copy(fixture_path("biden.jpg"), photos / "biden.jpg")
    out, saved = tmp_path / "out", tmp_path / "my-map"
    r = invoke("protect", photos, "--out", out, "--score-model", tiny, "--steps", 2, "--expression", "sad",
               "--projection", "layerwise", "--ema", "0.5", "--save-model", saved, "--json", "--seed", 1, *FAST)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["counts"] == {"ok": 2} and doc["details"]["method"] == "map"
    g = doc["details"]["groups"][0]
    assert g["faces"] == 2 and g["steps"] == 2 and g["saved"] == str(saved)
    assert doc["details"]["map"]["projection"] == "layerwise" and doc["details"]["map"]["seed"] == 1
    assert (out / "obama.jpg").exists() and (out / "biden.jpg").exists()
    # unknown expression label: a usage error before anything is written
    bad = invoke("protect", photos, "--out", tmp_path / "bad", "--score-model", tiny, "--expression", "smug", *FAST)
    assert bad.exit_code == 2 and "smug" in bad.output
    # reuse the saved network on a new photo: no fine-tuning, human summary
    more = tmp_path / "more"
    more.mkdir()
    shutil.copy(fixture_path("obama2.jpg"), more / "obama2.jpg")
    r2 = invoke("protect", more, "--out", tmp_path / "out2", "--model", saved)
    assert r2.exit_code == 0, r2.output
    assert (tmp_path / "out2" / "obama2.jpg").exists() and "MAP group" not in r2.output


@pytest.mark.realmodels
def test_protect_baseline_method_runs_through_the_same_command(tmp_path):
    pytest.importorskip("facepriv.protect.baselines")
    img = tmp_path / "obama.jpg"
    shutil.copy(fixture_path("obama.jpg"), img)
    r = invoke("protect", img, "--out", tmp_path / "o", "--method", "pgd", "--attack-steps", 2,
               "--surrogates", "dlib-resnet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["counts"] == {"ok": 1}
    assert (tmp_path / "o" / "obama.jpg").exists()
