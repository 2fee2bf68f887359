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
from facepriv.deid import METHODS

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
    for opt in ("--ensemble", "--k-pool", "--k-model", "--k-threshold", "--score-model", "--inpaint-steps", "--guard-model",
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


def _laplacian_energy(x: np.ndarray) -> float:
    g = x.astype(float).mean(-1)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float((lap**2).mean())


#: every registered method but inpaint (tested with its own tiny model in test_deid_generative.py)
CLI_METHODS = sorted(m for m in METHODS if m != "inpaint")
#: cheap settings: the group photo is its own k-Same pool (6 people, k = 3); 1 attack step
CHEAP = {"adversarial": ["--steps", "1", "--surrogates", "dlib-resnet"], "k-same-average": ["--k", "3"],
         "k-same-select": ["--k", "3"], "k-same-pixelate": ["--k", "3"]}


@pytest.mark.realmodels
@pytest.mark.parametrize("method", CLI_METHODS)
def test_every_method_runs_from_the_cli_on_the_group_photo(tmp_path, method):
    src = tmp_path / "group.jpg"
    shutil.copy(fixture_path("group.jpg"), src)
    out = tmp_path / "out"
    r = invoke("--json", "--seed", "3", "deid", src, "--method", method, *CHEAP.get(method, []), "--out", out,
               "--format", "png")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["counts"] == {"ok": 1}
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == ["group.png"]
    (row,) = Manifest.read_all(out)
    boxes = np.asarray(row["boxes"])
    assert row["faces"] == len(boxes) >= 5  # the group photo has 6 faces
    assert [m["method"] for m in row["methods"]] == [method]
    a = np.asarray(Image.open(src).convert("RGB")).astype(int)
    b = np.asarray(Image.open(out / "group.png").convert("RGB")).astype(int)
    assert a.shape == b.shape
    # far from every face (beyond 1.4 face sizes from its centre) the photo is bit-identical
    far = np.ones(a.shape[:2], bool)
    for x1, y1, x2, y2 in boxes:
        cx, cy, s = (x1 + x2) / 2, (y1 + y2) / 2, 1.4 * max(x2 - x1, y2 - y1)
        far[max(0, int(cy - s)): int(cy + s) + 1, max(0, int(cx - s)): int(cx + s) + 1] = False
    assert far.mean() > 0.2 and np.array_equal(a[far], b[far])
    for x1, y1, x2, y2 in boxes:
        cx, cy, w, h = int((x1 + x2) / 2), int((y1 + y2) / 2), x2 - x1, y2 - y1
        r_ = int(w / 4)
        pa, pb = a[cy - r_: cy + r_, cx - r_: cx + r_], b[cy - r_: cy + r_, cx - r_: cx + r_]
        diff = np.abs(pb - pa)
        if method == "adversarial":  # invisible: within the 8/255 budget, yet changed
            assert 0 < diff.max() <= 8
            continue
        if method != "eyebar":
            assert diff.mean() > 8, (method, (x1, y1))
        if method == "blur":
            assert _laplacian_energy(pb) < 0.2 * _laplacian_energy(pa)
        elif method == "pixelate":  # blocks: most neighbouring pixels are equal
            assert (pb[:, 1:] == pb[:, :-1]).all(-1).mean() > 0.7 > (pa[:, 1:] == pa[:, :-1]).all(-1).mean()
        elif method == "mask":
            assert (pb == 0).all()
        elif method == "noise":  # coarse grains of noise, strong
            assert (pb - pa).std() > 25
        elif method == "eyebar":  # a black bar at eye level, the chin left alone
            eye = b[int(y1 + 0.4 * h) - 2: int(y1 + 0.4 * h) + 3, cx - int(w / 6): cx + int(w / 6)]
            assert (eye == 0).all(), (x1, y1)
            chin = np.abs(b - a)[int(y2 - 0.08 * h): int(y2), cx - 3: cx + 3]
            assert (chin == 0).any()
    if method.startswith("k-same"):  # the photo was its own pool; the manifest says who was averaged
        faces = row["deid"][method]["faces"]
        assert len(faces) == len(boxes) and all(len(set(f["identities"])) == 3 for f in faces)
    if method == "adversarial":
        assert np.abs(b - a).max() <= 8


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


# ----------------------------------------------------------------------------- --region, k-same options
def test_region_the_eyebar_cannot_apply_is_refused_or_recorded(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(fixture_path("biden.jpg"), src / "biden.jpg")
    r = invoke("deid", src, "--method", "eyebar", "--region", "head", "--out", tmp_path / "o1")
    assert r.exit_code == 2 and "eyebar" in r.output and not (tmp_path / "o1").exists()
    r = invoke("--json", "deid", src, "--method", "blur,eyebar", "--region", "head", "--out", tmp_path / "o2")
    assert r.exit_code == 0, r.output
    (row,) = Manifest.read_all(tmp_path / "o2")
    assert [(m["method"], m["region"]) for m in row["methods"]] == [("blur", "head"), ("eyebar", None)]
    assert len(row["warnings"]) == 1 and "eyebar" in row["warnings"][0]
    assert "eyebar" in r.stderr  # and said on the terminal


def test_strength_a_method_cannot_apply_is_refused_or_recorded(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(fixture_path("biden.jpg"), src / "biden.jpg")
    r = invoke("deid", src, "--method", "mask", "--strength", "2", "--out", tmp_path / "o1")
    assert r.exit_code == 2 and "--strength" in r.output and "mask" in r.output and not (tmp_path / "o1").exists()
    r = invoke("--json", "deid", src, "--method", "blur,mask", "--strength", "2", "--out", tmp_path / "o2")
    assert r.exit_code == 0, r.output
    (row,) = Manifest.read_all(tmp_path / "o2")
    assert [(m["method"], m["strength"]) for m in row["methods"]] == [("blur", 2.0), ("mask", None)]
    assert row["methods"][1]["strength_ignored"] == 2.0
    assert len(row["warnings"]) == 1 and "mask" in row["warnings"][0] and "blur" in row["warnings"][0]
    assert "--strength 2" in r.stderr
    # the default strength is silent, and the manifest does not invent an ignored value
    r = invoke("--json", "deid", src, "--method", "mask", "--out", tmp_path / "o3")
    assert r.exit_code == 0, r.output
    (row,) = Manifest.read_all(tmp_path / "o3")
    assert row["methods"][0]["strength"] is None and "strength_ignored" not in row["methods"][0]
    assert not row.get("warnings")


def test_k_same_on_a_video_without_a_pool_says_what_to_do(tmp_path):
    import av

    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as out:  # a real (tiny) video: the error must come from the pool rule
        v = out.add_stream("libx264", rate=5)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
        for p in list(v.encode(frame)) + list(v.encode()):
            out.mux(p)
    r = invoke("deid", clip, "--method", "k-same-average", "--k-model", "none", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--k-pool" in r.output and "video" in r.output


def test_k_threshold_and_k_model_none_reach_the_method(tmp_path, photos):
    r = invoke("deid", photos / "group.jpg", "--method", "k-same-average", "--k-model", "none", "--k-threshold", "0.5",
               "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--k-threshold" in r.output
    r = invoke("--json", "deid", photos / "group.jpg", "--method", "k-same-pixelate", "--k", "3", "--k-model", "none",
               "--out", tmp_path / "o2", "--format", "png")
    assert r.exit_code == 0, r.output
    (row,) = Manifest.read_all(tmp_path / "o2")
    assert row["methods"][0]["model"] is None and row["methods"][0]["threshold"] is None


@pytest.mark.realmodels
def test_k_threshold_sets_the_identity_match_threshold(tmp_path, photos):
    r = invoke("--json", "deid", photos / "biden.jpg", "--method", "k-same-average", "--k", "2", "--k-pool", photos,
               "--k-threshold", "-0.45", "--out", tmp_path / "o", "--format", "png")
    assert r.exit_code == 0, r.output
    (row,) = Manifest.read_all(tmp_path / "o")
    assert row["methods"][0]["threshold"] == -0.45 and row["methods"][0]["model"] == "dlib-resnet"
    used = row["deid"]["k-same-average"]["faces"][0]["pool"]
    assert not any("biden" in u for u in used)  # biden's own photo is excluded
    # a threshold every pair of faces passes makes the whole pool one person: too few for k = 2
    r = invoke("deid", photos / "biden.jpg", "--method", "k-same-average", "--k", "2", "--k-pool", photos,
               "--k-threshold", "-10", "--out", tmp_path / "o3")
    assert r.exit_code == 2 and "holds 1 identity" in " ".join(r.output.split())
