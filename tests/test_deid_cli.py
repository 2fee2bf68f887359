"""``facepriv deid`` options: ensembles, every method from the command line, k-same pools."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import fixture_path
from facepriv.cli import app
from facepriv.cli.common import hoist_global_options
from facepriv.core.batch import Manifest

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, hoist_global_options(list(map(str, args))))


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    for name in ("obama.jpg", "obama2.jpg", "biden.jpg", "group.jpg"):
        shutil.copy(fixture_path(name), d / name)
    return d


def test_option_errors_exit_2(tmp_path, photos):
    out = tmp_path / "o"
    assert invoke("deid", photos, "--method", "blur", "--ensemble", "pixelate", "--out", out).exit_code == 2
    assert invoke("deid", photos, "--ensemble", "blur,nonsense", "--out", out).exit_code == 2
    assert invoke("deid", photos, "--region", "elbow", "--out", out).exit_code == 2
    assert invoke("deid", photos, "--method", "k-same-average", "--k", "1", "--out", out).exit_code == 2
    assert invoke("deid", photos, "--method", "k-same-average", "--k-pool", tmp_path / "none", "--out", out).exit_code == 2
    assert not out.exists() or not any(out.glob("*.jpg"))
    r = invoke("deid", "--help")
    for opt in ("--ensemble", "--k-pool", "--k-model", "--score-model", "--inpaint-steps", "--guard-model",
                "--guard-tries", "--noise-sigma", "--eyebar-height", "--keep-audio", "--track-hold", "--epsilon",
                "--surrogates", "--target"):
        assert opt in r.output, opt


@pytest.mark.realmodels
def test_ensemble_equals_the_comma_list(tmp_path, photos, mtcnn):
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke("--json", "deid", photos / "biden.jpg", "--ensemble", "pixelate,noise", "--out", a, "--format", "png").exit_code == 0
    assert invoke("--json", "deid", photos / "biden.jpg", "--method", "pixelate,noise", "--out", b, "--format", "png").exit_code == 0
    assert np.array_equal(np.asarray(Image.open(a / "biden.png")), np.asarray(Image.open(b / "biden.png")))
    src = np.asarray(Image.open(photos / "biden.jpg").convert("RGB")).astype(int)
    assert np.abs(np.asarray(Image.open(a / "biden.png")).astype(int) - src).max() > 50


@pytest.mark.realmodels
@pytest.mark.parametrize("method", ["eyebar", "noise", "k-same-average", "k-same-pixelate"])
def test_each_method_runs_from_the_cli_on_the_group_photo(tmp_path, photos, method, mtcnn):
    out = tmp_path / "out"
    r = invoke("--json", "--seed", "3", "deid", photos, "--method", method, "--k", "3", "--out", out, "--format", "png")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["counts"] == {"ok": 4}
    rows = {x["input"].rsplit("/", 1)[-1]: x for x in Manifest.read_all(out)}
    assert rows["group.jpg"]["faces"] == 6
    src = np.asarray(Image.open(photos / "group.jpg").convert("RGB")).astype(int)
    dst = np.asarray(Image.open(out / "group.png").convert("RGB")).astype(int)
    for box in rows["group.jpg"]["boxes"]:  # every face changed around its centre
        x1, y1, x2, y2 = [int(v) for v in box]
        cx, cy, w = (x1 + x2) // 2, (y1 + y2) // 2, (x2 - x1) // 6
        assert np.abs(dst[cy - w: cy + w, cx - w: cx + w] - src[cy - w: cy + w, cx - w: cx + w]).mean() > 8, box
    if method.startswith("k-same"):  # the batch was its own pool; the manifest says who was averaged
        faces = rows["group.jpg"]["deid"][method]["faces"]
        assert len(faces) == 6 and all(len(set(f["identities"])) == 3 for f in faces)


@pytest.mark.realmodels
def test_k_same_without_enough_people_is_a_usage_error(tmp_path, photos, mtcnn):
    r = invoke("deid", photos / "obama.jpg", "--method", "k-same-average", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "k-same" in r.output


def test_collect_media_finds_photos_and_videos_but_not_other_files(tmp_path):
    from facepriv.deid.pipeline import collect_media

    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.png", "sub/c.mp4", "d.webm", "notes.txt", "sub/manifest.jsonl", ".hidden.mp4"):
        (d / name).write_bytes(b"x")
    explicit = tmp_path / "odd.heic"
    explicit.write_bytes(b"x")
    items = collect_media([d, explicit])
    rels = sorted(str(it.rel) for it in items)
    assert rels == ["in/a.jpg", "in/d.webm", "in/sub/b.png", "in/sub/c.mp4", "odd.heic"]
    assert [str(it.rel) for it in collect_media([d], glob="*.mp4")] == ["sub/c.mp4"]


def test_cached_detector_detects_each_photo_once():
    from facepriv.core.faces import FaceDetector
    from facepriv.deid.pipeline import CachedDetector

    class Counting(FaceDetector):
        calls = 0

        def detect(self, image):
            Counting.calls += 1
            return []

    det = CachedDetector(Counting())
    a, b = np.zeros((8, 8, 3), np.uint8), np.ones((8, 8, 3), np.uint8)
    for im in (a, b, a, a, b):
        det.detect(im)
    assert Counting.calls == 2
