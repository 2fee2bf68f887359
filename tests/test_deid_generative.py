"""Generative de-identification (RePaint) with a tiny self-made diffusion model: the guards and the
classical fallback for faces that still match their owner."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import fixture_path
from facepriv.core.align import align_faces, landmarks_tensor, paste_back
from facepriv.core.errors import ConfigError
from facepriv.deid import create_method
from facepriv.deid.generative import ellipse_masks, inner_face_ellipse
from test_deid_classical import make_face, textured


def tiny_score_model(path):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    unet.save_pretrained(path / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(path / "scheduler")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_score_model(tmp_path_factory.mktemp("tiny-ddpm"))


FAST = dict(steps=6, jump_length=1, jump_n_sample=1)


def inpaint(tiny, **kw):
    opts = {"score_model": str(tiny), "guard_model": None, "expression_guard": False, **FAST, **kw}
    return create_method("inpaint", **opts).setup("cpu")


def support(m, x, faces):
    """Where the paste-back mask of ``m`` is non-zero, in image space."""
    r = m.resolution
    al = align_faces(x, landmarks_tensor(faces), m.template, size=(r, r))
    _, paste = m.masks()
    ones = torch.ones(len(faces), 3, r, r)
    return paste_back(torch.zeros_like(x), ones, al.matrices, mask=paste.expand(len(faces), 1, r, r))[0] > 0


def test_masks_cover_the_inner_face_only():
    from facepriv.core.align import get_template

    tpl = get_template("celebahq-256")
    known, paste = ellipse_masks(tpl, 256, feather=0.1)
    p = torch.tensor(tpl.points)
    for x, y in p:  # eyes, nose, mouth corners are regenerated
        assert known[0, 0, int(y), int(x)] == 0 and paste[0, 0, int(y), int(x)] == 1
    assert known[0, 0, 250, 128] == 1 and known[0, 0, 128, 5] == 1  # chin edge, cheek outline kept
    cx, cy, a, b = inner_face_ellipse(tpl, 256)
    assert abs(cx - 128) < 3 and 0.4 * 256 < 2 * b < 0.6 * 256
    assert bool(((paste > 0) >= (known == 0)).all())  # the paste mask covers the regenerated area


def test_only_the_inner_face_changes(tiny):
    x = textured(256, 256)
    faces = [make_face(90, 110, 100), make_face(190, 150, 80, roll=0.2)]
    m = inpaint(tiny)
    assert m.resolution == 32 and m.template.name == "celebahq-256"
    y = m.apply(x, faces)
    assert y.shape == x.shape and not torch.equal(x, y)
    sup = support(m, x, faces)
    assert torch.equal(y[:, ~sup], x[:, ~sup])
    changed = (y != x).any(0)
    for f in faces:  # each face's centre changed
        cx, cy = f.landmarks[2]
        assert bool(changed[int(cy), int(cx)])
    assert [i["tries"] for i in m.last_info["faces"]] == [1, 1]
    # reproducible with the same seed, different with another
    assert torch.equal(y, inpaint(tiny).apply(x, faces))
    assert not torch.equal(y, inpaint(tiny, seed=1).apply(x, faces))


def test_identity_guard_regenerates_until_the_face_no_longer_matches(tiny, monkeypatch):
    x = textured(256, 256)
    faces = [make_face(128, 128, 120)]
    m = inpaint(tiny, guard_tries=5)
    m.guard, m.guard_threshold = object(), 0.5  # a guard whose scores we script
    sims = iter([0.9, 0.8, 0.2, 0.1])
    seen_seeds = []
    real_generate = m.generate

    def generate(crops, known, seed):
        seen_seeds.append(seed)
        return real_generate(crops, known, seed)

    monkeypatch.setattr(m, "generate", generate)
    monkeypatch.setattr(m, "identity_similarity", lambda a, b, lm: torch.tensor([next(sims)]))
    m.apply(x, faces)
    info = m.last_info["faces"][0]
    assert info["tries"] == 3 and info["identity_ok"] is True and info["similarity"] == pytest.approx(0.2)
    assert len(set(seen_seeds)) == 3  # the seed advances each try


def scripted_guard(m, monkeypatch, sims, threshold=0.5):
    """Give ``m`` an identity guard whose similarities are ``sims`` (one tensor per call), and
    record every generated batch in the returned list."""
    m.guard, m.guard_name, m.guard_threshold = object(), "scripted", threshold
    it = iter(sims)
    outputs = []
    real_generate = m.generate

    def generate(crops, known, seed):
        out = real_generate(crops, known, seed)
        outputs.append(out)
        return out

    monkeypatch.setattr(m, "generate", generate)
    monkeypatch.setattr(m, "identity_similarity", lambda a, b, lm: torch.tensor(next(it), dtype=torch.float32))
    return outputs


def test_a_face_that_still_matches_is_blurred_not_published(tiny, monkeypatch):
    x = textured(256, 256)
    faces = [make_face(128, 128, 120)]
    m = inpaint(tiny, guard_tries=3)
    # three tries all at or above the threshold, then the guard's check of the blurred face
    outputs = scripted_guard(m, monkeypatch, [[0.9], [0.7], [0.8], [0.1]])
    y = m.apply(x, faces)
    assert len(outputs) == 3
    info = m.last_info["faces"][0]
    assert info["tries"] == 3 and info["identity_ok"] is False and info["similarity"] == pytest.approx(0.7)
    assert info["fallback"] == ["blur"] and "0.7" in info["fallback_reason"] and "0.5" in info["fallback_reason"]
    assert info["fallback_similarity"] == pytest.approx(0.1) and info["fallback_identity_ok"] is True
    assert m.last_info["guard_fallback"] == "blur"
    # exactly the classical blur (at twice its default strength) of the input: no generated pixel left
    assert torch.equal(y, create_method("blur", strength=2.0).apply(x, faces))
    r = m.resolution
    al = align_faces(x, landmarks_tensor(faces), m.template, size=(r, r))
    _, paste = m.masks()
    published = paste_back(x, outputs[1], al.matrices, mask=paste)  # what the old code published
    assert not torch.allclose(y, published, atol=1e-3)


@pytest.mark.parametrize("fallback, expected", [("pixelate", ["pixelate", "mask"]), ("blur", ["blur", "mask"]),
                                                ("mask", ["mask"])])
def test_fallback_that_still_matches_is_masked(tiny, monkeypatch, fallback, expected):
    x = textured(256, 256)
    faces = [make_face(128, 128, 120)]
    m = inpaint(tiny, guard_tries=1, guard_fallback=fallback)
    scripted_guard(m, monkeypatch, [[0.9], [0.8], [0.6]])  # generated, then fallback(s) still match
    y = m.apply(x, faces)
    info = m.last_info["faces"][0]
    assert info["fallback"] == expected and info["fallback_identity_ok"] is False
    want = x
    for name in expected:
        want = create_method(name, **({"strength": 2.0} if name != "mask" else {})).apply(want, faces)
    assert torch.equal(y, want)
    assert bool((y[:, 128, 128] == 0).all())  # the mask's black at the face centre


def test_only_the_failing_face_falls_back(tiny, monkeypatch):
    x = textured(256, 256)
    faces = [make_face(70, 128, 90), make_face(190, 128, 90)]
    m = inpaint(tiny, guard_tries=2)
    # face 0 fails both tries; face 1 passes at once; the blurred face 0 no longer matches
    outputs = scripted_guard(m, monkeypatch, [[0.9, 0.2], [0.8, 0.2], [0.1, 0.2]])
    y = m.apply(x, faces)
    f0, f1 = m.last_info["faces"]
    assert f0["fallback"] == ["blur"] and f1["fallback"] is None and f1["identity_ok"] is True and f1["tries"] == 1
    r = m.resolution
    al = align_faces(x, landmarks_tensor(faces), m.template, size=(r, r))
    _, paste = m.masks()
    paste = paste.expand(2, 1, r, r).clone()
    paste[0] = 0
    kept = paste_back(x, outputs[0], al.matrices, mask=paste)  # face 1's first try, face 0 untouched
    want = create_method("blur", strength=2.0).apply(kept, [faces[0]])
    assert torch.allclose(y, want, atol=1e-6)


def test_guard_fallback_error_fails_the_file(tiny, tmp_path, monkeypatch):
    from facepriv.core.faces import FaceDetector
    from PIL import Image

    from facepriv.deid import DeidConfig, run_deid
    from facepriv.deid.generative import DiffusionInpaint, IdentityGuardError

    x = textured(256, 256)
    faces = [make_face(128, 128, 120)]
    m = inpaint(tiny, guard_tries=2, guard_fallback="error")
    scripted_guard(m, monkeypatch, [[0.9], [0.9]])
    with pytest.raises(IdentityGuardError, match="still match"):
        m.apply(x, faces)
    with pytest.raises(ConfigError):
        create_method("inpaint", guard_fallback="nothing")

    class Fixed(FaceDetector):
        def detect(self, image):
            return list(faces)

    real_setup = DiffusionInpaint.setup

    def setup(self, device="cpu"):  # a scripted guard that always matches
        real_setup(self, device)
        self.guard, self.guard_name, self.guard_threshold = object(), "scripted", 0.5
        return self

    monkeypatch.setattr(DiffusionInpaint, "setup", setup)
    monkeypatch.setattr(DiffusionInpaint, "identity_similarity", lambda self, a, b, lm: torch.full((len(lm),), 0.9))
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy()).save(src / "a.png")
    base = {"score_model": str(tiny), "guard_model": None, "expression_guard": False, "guard_tries": 2, **FAST}
    for fallback, status, code in (("error", "error", 1), ("mask", "ok", 0)):
        out = tmp_path / fallback
        cfg = DeidConfig(methods=["inpaint"], options={"inpaint": {**base, "guard_fallback": fallback}})
        summary = run_deid([src], out, cfg, detector=Fixed(), progress=False)
        row = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
        assert row["status"] == status and summary.exit_code == code
        if fallback == "error":
            assert "still match" in row["error"] and not (out / "a.png").exists()
        else:
            assert row["deid"]["inpaint"]["faces"][0]["fallback"] == ["mask"] and (out / "a.png").is_file()


def test_loads_by_registry_name_from_the_hub_cache(tmp_path, monkeypatch):
    repo = tmp_path / "hf" / "models--google--ddpm-celebahq-256"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    tiny_score_model(snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("ddpm-celebahq-256", "google/ddpm-celebahq-256"):
        m = create_method("inpaint", score_model=spec, guard_model=None, expression_guard=False, **FAST).setup("cpu")
        assert m.resolution == 32
    with pytest.raises(ConfigError):
        create_method("inpaint", score_model="dlib-resnet", guard_model=None, expression_guard=False).setup("cpu")
    with pytest.raises(ConfigError):
        create_method("inpaint", guard_tries=0)


@pytest.mark.realmodels
def test_cli_inpaint_on_a_real_photo_with_both_guards(tmp_path, tiny, mtcnn):
    from typer.testing import CliRunner

    from facepriv.cli import app
    from facepriv.cli.common import hoist_global_options

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(fixture_path("obama.jpg"), src / "obama.jpg")
    out = tmp_path / "out"
    args = ["--json", "deid", str(src), "--method", "inpaint", "--score-model", str(tiny), "--inpaint-steps", "5",
            "--jump-length", "1", "--jump-samples", "1", "--guard-tries", "2", "--out", str(out), "--format", "png"]
    r = CliRunner().invoke(app, hoist_global_options(args))
    assert r.exit_code == 0, r.output
    row = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    info = row["deid"]["inpaint"]
    assert info["guard"] == "dlib-resnet" and info["threshold"] == -0.6
    face = info["faces"][0]
    assert 1 <= face["tries"] <= 2 and face["expression_ok"] is not None
    # an untrained model paints noise: certainly no longer the same person
    assert face["identity_ok"] is True and face["similarity"] < -0.6
    assert (out / "obama.png").is_file()


@pytest.mark.realmodels
def test_cli_guard_fallback_error_fails_the_file(tmp_path, tiny, mtcnn):
    """--guard-fallback error through the CLI: a face no generation can get past the guard
    (threshold unreachable) fails its file, nothing is written and the exit code says so."""
    from typer.testing import CliRunner

    from facepriv.cli import app
    from facepriv.cli.common import hoist_global_options

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(fixture_path("obama.jpg"), src / "obama.jpg")
    out = tmp_path / "out"
    args = ["deid", str(src), "--method", "inpaint", "--score-model", str(tiny), "--inpaint-steps", "2",
            "--jump-length", "1", "--jump-samples", "1", "--guard-tries", "1", "--guard-threshold", "-100",
            "--no-expression-guard", "--guard-fallback", "error", "--out", str(out), "--format", "png"]
    r = CliRunner().invoke(app, hoist_global_options(args))
    assert r.exit_code == 1, r.output
    row = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert row["status"] == "error" and "guard" in row["error"].lower()
    assert not (out / "obama.png").exists()
