"""``facepriv protect`` as a user runs it: MAP with a tiny score network, save/reuse, errors."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from conftest import fixture_path
from facepriv.cli import app
from facepriv.cli.common import hoist_global_options
from test_protect_map import tiny_unet_dir

runner = CliRunner()
FAST = ["--lr", "1e-3", "--t0", "100", "--n-inv", "8", "--n-gen", "2", "--w-smooth", "1", "--w-sm", "0.1"]


def invoke(*args):
    return runner.invoke(app, hoist_global_options(list(map(str, args))))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def test_protect_help_lists_the_options():
    r = runner.invoke(app, ["protect", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert r.exit_code == 0
    for opt in ("--method", "--target", "--expression", "--expression-ref", "--score-model", "--model",
                "--save-model", "--steps", "--lr", "--t0", "--n-inv", "--n-gen", "--w-id", "--w-exp",
                "--w-smooth", "--w-sm", "--projection", "--ema", "--surrogates", "--expression-model",
                "--epsilon", "--attack-steps", "--batch-faces", "--resume", "--on-no-face", "--region",
                "--random-start", "--momentum", "--diversity-prob", "--diversity-scale", "--diversity-shift",
                "--diversity-rotate", "--ti-kernel", "--early-stop", "--early-stop-margin", "--early-stop-far",
                "--thresholds", "--push-weight", "--naturalness", "--naturalness-weight", "--feather"):
        assert opt in r.output, opt
    assert "(default: 30)" in r.output  # defaults written in the help text are shown, not eaten as markup


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


@pytest.mark.realmodels
def test_baseline_attack_options_reach_the_attack(tmp_path):
    """Every knob of the Baselines panel lands in the attack configuration that runs (reported
    in --json), and changes what the attack does to the pixels."""
    import numpy as np
    from PIL import Image

    from facepriv.core.io import load_image
    from facepriv.core.regions import region_mask
    from facepriv.models import create_model

    img = tmp_path / "obama.jpg"
    shutil.copy(fixture_path("obama.jpg"), img)
    out = tmp_path / "o"
    # 0 steps: only the random start moves the pixels, so what changed is exactly the region
    r = invoke("protect", img, "--out", out, "--method", "pgd", "--attack-steps", 0, "--epsilon", 4,
               "--random-start", "--region", "box", "--feather", 0, "--diversity-prob", 0.7,
               "--diversity-scale", 0.2, "--diversity-shift", 0.05, "--diversity-rotate", 3, "--momentum", 0.3,
               "--ti-kernel", 5, "--early-stop-margin", 0.1, "--early-stop-far", "1e-3",
               "--thresholds", "dlib-resnet=-0.55", "--naturalness", "mmd", "--naturalness-weight", 0.2,
               "--push-weight", 0.4, "--surrogates", "dlib-resnet", "--format", "png", "--json", "--seed", 3)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    attack = doc["details"]["attack"]
    expected = {"method": "pgd", "steps": 0, "random_start": True, "region": "box", "feather": 0.0,
                "diversity_prob": 0.7, "diversity_scale": 0.2, "diversity_shift": 0.05, "diversity_rotate": 3.0,
                "momentum": 0.3, "ti_kernel": 5, "early_stop": False, "early_stop_margin": 0.1, "far": "1e-3",
                "thresholds": {"dlib-resnet": -0.55}, "naturalness": "mmd", "naturalness_weight": 0.2,
                "push_weight": 0.4, "seed": 3}
    assert {k: attack[k] for k in expected} == expected
    assert attack["epsilon"] == pytest.approx(4 / 255)
    (row,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert row["attack"][0]["steps"] == 0 and row["attack"][0]["status"] == "attacked"
    before = load_image(img).rgb.astype(int)
    after = np.asarray(Image.open(out / "obama.png").convert("RGB")).astype(int)
    diff = np.abs(after - before).max(-1)
    assert 0 < diff.max() <= 4
    face = create_model("mtcnn").detect(load_image(img).rgb)[0]
    box = region_mask(face, before.shape[:2], region="box", feather=0.0)
    ellipse = region_mask(face, before.shape[:2], region="face", feather=0.0)
    inside = np.zeros(diff.shape, bool)
    inside[box.y0:box.y1, box.x0:box.x1] = box.mask[0].numpy() > 0
    assert not diff[~inside].any()  # nothing outside the box
    in_face = np.zeros(diff.shape, bool)
    in_face[ellipse.y0:ellipse.y1, ellipse.x0:ellipse.x1] = ellipse.mask[0].numpy() > 0
    corners = inside & ~in_face  # the box minus the face ellipse: only --region box reaches it
    assert corners.sum() > 100 and (diff[corners] > 0).mean() > 0.9

    # early stopping with a given threshold: the face leaves the attack long before --attack-steps
    out2 = tmp_path / "o2"
    r = invoke("protect", img, "--out", out2, "--method", "pgd", "--attack-steps", 30, "--epsilon", 16,
               "--early-stop", "--early-stop-margin", 0, "--thresholds", "dlib-resnet=-0.6",
               "--surrogates", "dlib-resnet", "--format", "png", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["details"]["attack"]["early_stop"] is True
    (row,) = [json.loads(line) for line in (out2 / "manifest.jsonl").read_text().splitlines()]
    face_row = row["attack"][0]
    assert face_row["early_stopped"] and 1 <= face_row["steps"] < 30 and face_row["passed"] == {"dlib-resnet": True}


def test_baseline_attack_options_are_checked_before_any_work(tmp_path):
    img = tmp_path / "a.jpg"
    shutil.copy(fixture_path("obama.jpg"), img)
    out = tmp_path / "o"
    for args in (("--method", "pgd", "--region", "oval"), ("--method", "pgd", "--naturalness", "tv"),
                 ("--method", "pgd", "--thresholds", "dlib-resnet"), ("--method", "pgd", "--diversity-prob", 2),
                 ("--region", "box"),  # a baseline option with --method map
                 ("--method", "tipim",)):  # targeted: needs --target
        r = invoke("protect", img, "--out", out, *args)
        assert r.exit_code == 2, (args, r.output)
    assert not out.exists()


@pytest.mark.realmodels
def test_relative_score_model_is_recorded_absolute(tmp_path, monkeypatch):
    """A saved model made with a relative --score-model is reusable from any directory."""
    work = tmp_path / "work"
    work.mkdir()
    tiny_unet_dir(work / "tiny")
    shutil.copy(fixture_path("obama.jpg"), work / "obama.jpg")
    monkeypatch.chdir(work)
    r = invoke("protect", "obama.jpg", "--out", "out", "--score-model", "tiny", "--steps", 1, "--w-exp", 0,
               "--surrogates", "dlib-resnet", "--save-model", "my-map", "--quiet", *FAST)
    assert r.exit_code == 0, r.output
    meta = json.loads((work / "my-map" / "facepriv.json").read_text())
    assert meta["base"] == str((work / "tiny").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r2 = invoke("protect", work / "obama.jpg", "--out", "out2", "--model", work / "my-map", "--json")
    assert r2.exit_code == 0, r2.output
    assert json.loads(r2.stdout)["counts"] == {"ok": 1} and (elsewhere / "out2" / "obama.jpg").is_file()
