"""MAP end to end with real surrogates (dlib-resnet, facenet-casia), the real expression model
and a tiny self-made score network: the losses fall, faces are pasted back, models are saved
and reused, batches are sharded like accelerate does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fixture_path
from facepriv.core.batch import Manifest
from facepriv.core.faces import FacePolicy
from facepriv.protect import ProtectConfig, run_protect
from facepriv.protect.map import MAPConfig, MAPTuner, align_for_score_model
from test_protect_map import tiny_unet_dir

pytestmark = [pytest.mark.realmodels, pytest.mark.usefixtures("one_thread")]

FAST = {"lr": 1e-3, "t0": 100, "n_inv": 10, "n_gen": 3, "batch_size": 2, "w_smooth": 1.0, "w_sm": 0.1}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_unet_dir(tmp_path_factory.mktemp("tiny-ddpm"))


@pytest.fixture(scope="module")
def ensemble():
    from facepriv.attacks.identity import SurrogateEnsemble

    return SurrogateEnsemble(["dlib-resnet", "facenet-casia"])


def _png(src, dst):
    Image.open(src).convert("RGB").save(dst)
    return dst


@pytest.mark.slow
def test_fine_tuning_lowers_identity_and_expression_losses(tiny_dir, ensemble, mtcnn):
    from facepriv.core.align import landmarks_tensor
    from facepriv.core.io import load_image
    from facepriv.models import create_model

    score = create_model("ddpm-celebahq-256", weights=tiny_dir)
    expr = create_model("expr-fer7")
    img = load_image(fixture_path("obama.jpg"))
    faces = mtcnn.detect(img.rgb)[:1]
    crops = align_for_score_model(score, img.to_tensor(), landmarks_tensor(faces)).crops
    cfg = MAPConfig(steps=10, expression="surprise", w_exp=1.0, **{**FAST, "batch_size": 1})
    tuner = MAPTuner(score, ensemble=ensemble, expression_model=expr, config=cfg, progress=False)
    before = tuner.protect(crops)
    hist = tuner.fit(crops)
    assert len(hist) == 10 and all(np.isfinite(h["L_id"]) and np.isfinite(h["L_exp"]) for h in hist)
    first = {k: np.mean([h[k] for h in hist[:3]]) for k in ("L_id", "L_exp")}
    last = {k: np.mean([h[k] for h in hist[-3:]]) for k in ("L_id", "L_exp")}
    assert last["L_id"] < first["L_id"] - 0.1, (first, last)  # dodging: cos to the source falls
    assert last["L_exp"] < 0.5 * first["L_exp"], (first, last)  # CE toward "surprise" falls
    s = tuner.summary()
    assert s["conflicts"]["steps"] == 10 and 0 <= s["conflicts"]["conflict_rate"] <= 1
    # the base network is untouched; the tuned one now regenerates a different face
    after = tuner.protect(crops)
    assert float((after - before).abs().mean()) > 0.01
    assert all(not p.requires_grad for p in tuner.base.parameters())
    with torch.no_grad():
        probs = expr.probs(torch.nn.functional.interpolate(after, size=(64, 64), mode="bilinear"))
    assert probs.shape == (1, 7)


@pytest.mark.slow
def test_protect_folder_pastes_back_saves_and_reuses(tiny_dir, tmp_path, edge_cases):
    photos = tmp_path / "photos"
    photos.mkdir()
    _png(fixture_path("obama.jpg"), photos / "obama.png")
    _png(fixture_path("group.jpg"), photos / "group.png")
    shutil.copy(edge_cases["noface.png"], photos / "noface.png")
    shutil.copy(edge_cases["corrupt.jpg"], photos / "corrupt.jpg")
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    out, saved = tmp_path / "out", tmp_path / "my-map"
    cfg = ProtectConfig(score_model=str(tiny_dir), save_model=str(saved),
                        map={**FAST, "steps": 3, "expression": "surprise"})
    summary = run_protect([photos], out, cfg, policy=FacePolicy(on_no_face="copy"), progress=False)
    assert summary.counts == {"ok": 2, "copied": 1, "error": 1}, summary.failures
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before  # inputs untouched
    group = summary.details["groups"]
    assert len(group) == 1 and group[0]["faces"] == 7 and group[0]["photos"] == 2 and group[0]["steps"] == 3
    log = json.loads((out / "map_log.json").read_text())
    assert len(log[0]["history"]) == 3 and {"L_id", "L_exp", "L_smooth", "L_sm", "conflict"} <= set(log[0]["history"][0])
    rows = {r["input"].split("/")[-1]: r for r in Manifest.read_all(out)}
    assert rows["group.png"]["faces"] == 6 and rows["corrupt.jpg"]["status"] == "error"
    assert "map_tune_s" in rows["group.png"] or "map_tune_s" in rows["obama.png"]

    # pasted back: the faces changed, everything far from them is bit-identical
    for name in ("obama.png", "group.png"):
        a = np.asarray(Image.open(photos / name).convert("RGB")).astype(int)
        b = np.asarray(Image.open(out / name).convert("RGB")).astype(int)
        assert a.shape == b.shape
        changed = np.abs(a - b).max(-1) > 0
        boxes = rows[name]["boxes"]
        near = np.zeros(changed.shape, bool)
        for x1, y1, x2, y2 in boxes:
            w, h = x2 - x1, y2 - y1
            near[max(0, int(y1 - h)): int(y2 + h), max(0, int(x1 - w)): int(x2 + w)] = True
        assert not changed[~near].any()
        for x1, y1, x2, y2 in boxes:
            face = np.abs(a - b)[int(y1): int(y2), int(x1): int(x2)]
            assert face.mean() > 1.0  # each face really got a new rendering
    assert np.array_equal(np.asarray(Image.open(out / "noface.png")), np.asarray(Image.open(photos / "noface.png")))

    # the saved network: diffusers layout + settings; reused without fine-tuning it gives the same faces
    assert any((saved / "unet").glob("*.safetensors"))
    meta = json.loads((saved / "facepriv.json").read_text())
    assert meta["method"] == "map" and meta["base"] == str(tiny_dir) and meta["map"]["t0"] == 100
    assert meta["surrogates"] == ["dlib-resnet", "facenet-casia"] and meta["faces"] == 7
    out2 = tmp_path / "out2"
    reuse = ProtectConfig(model=str(saved))
    s2 = run_protect([photos / "obama.png"], out2, reuse, progress=False)
    assert s2.counts == {"ok": 1} and s2.details["t0"] == 100 and not (out2 / "map_log.json").exists()
    a = np.asarray(Image.open(out / "obama.png")).astype(int)
    b = np.asarray(Image.open(out2 / "obama.png")).astype(int)
    assert np.abs(a - b).max() <= 2


@pytest.mark.slow
def test_sharding_groups_and_resume(tiny_dir, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("biden.jpg", "obama.jpg", "obama2.jpg"):
        shutil.copy(fixture_path(name), photos / name)
    out, saved = tmp_path / "out", tmp_path / "saved"
    cfg = ProtectConfig(score_model=str(tiny_dir), save_model=str(saved), batch_faces=1,
                        map={**FAST, "steps": 1, "w_exp": 0.0})
    runs = [run_protect([photos], out, cfg, progress=False, rank=r, world_size=2) for r in (0, 1)]
    assert [sum(s.counts.values()) for s in runs] == [2, 1]  # biden+obama2 / obama
    assert sorted(p.name for p in out.glob("manifest*.jsonl")) == ["manifest.rank0.jsonl", "manifest.rank1.jsonl"]
    rows = Manifest.read_all(out)
    assert sorted(r["input"].split("/")[-1] for r in rows) == ["biden.jpg", "obama.jpg", "obama2.jpg"]
    # rank 0 had two photos of one face each and --batch-faces 1: two separate fine-tunings
    assert len(runs[0].details["groups"]) == 2 and len(runs[1].details["groups"]) == 1
    assert sorted(str(p.relative_to(saved)) for p in saved.glob("rank*/**/facepriv.json")) == \
        ["rank0/chunk000/facepriv.json", "rank0/chunk001/facepriv.json", "rank1/facepriv.json"]
    assert (out / "map_log.rank0.json").exists() and (out / "map_log.rank1.json").exists()
    # resume: nothing left to do, no fine-tuning at all
    again = run_protect([photos], out, cfg, progress=False, rank=0, world_size=2, resume=True)
    assert again.resumed == 2 and sum(again.counts.values()) == 0 and again.details["groups"] == []


def _history(out):
    (log,) = json.loads((out / "map_log.json").read_text())
    return log["history"]


def _face_landmarks(path, mtcnn):
    from facepriv.core.align import landmarks_tensor
    from facepriv.core.io import load_image

    img = load_image(path)
    face = max(mtcnn.detect(img.rgb), key=lambda f: f.width * f.height)
    return img, landmarks_tensor([face])


def test_impersonation_moves_the_face_towards_the_target(tiny_dir, ensemble, tmp_path, mtcnn):
    """``target=``: L_id = 1 - cos to the target's embedding falls while fine-tuning, and the
    written photo's face is closer to the target for both surrogates."""
    import torch.nn.functional as F

    from facepriv.core.io import load_image
    from facepriv.protect.pipeline import target_reference

    src = _png(fixture_path("obama.jpg"), tmp_path / "obama.png")
    target = fixture_path("biden.jpg")
    out, saved = tmp_path / "out", tmp_path / "saved"
    cfg = ProtectConfig(score_model=str(tiny_dir), target=str(target), save_model=str(saved),
                        map={**FAST, "steps": 8, "batch_size": 1, "w_exp": 0.0})
    summary = run_protect([src], out, cfg, progress=False)
    assert summary.counts == {"ok": 1}, summary.failures
    l_id = [h["L_id"] for h in _history(out)]
    assert len(l_id) == 8 and all(0.0 <= v <= 2.0 for v in l_id)  # 1 - cos lies in [0, 2]
    assert np.mean(l_id[-3:]) < 0.6 * np.mean(l_id[:3]), l_id
    assert json.loads((saved / "facepriv.json").read_text())["target"] == str(target)

    # independently of the tuner's bookkeeping: the surrogates see the written photo's face
    # closer to the target (mean target embedding, as the tuner uses) than the original's
    tgt = target_reference(target, ensemble, mtcnn)
    img, lm = _face_landmarks(src, mtcnn)
    with torch.no_grad():
        before = ensemble.embed(img.to_tensor(), lm)
        after = ensemble.embed(load_image(out / "obama.png").to_tensor(), lm)
    cos = {k: (float(F.cosine_similarity(before[k], tgt[k])), float(F.cosine_similarity(after[k], tgt[k])))
           for k in tgt}
    assert all(a > b for b, a in cos.values()), cos
    assert np.mean([a - b for b, a in cos.values()]) > 0.05, cos


def test_expression_reference_pulls_the_expression_features(tiny_dir, tmp_path, mtcnn):
    """``expression_ref=``: L_exp = 1 - cos to the reference's expression features falls, i.e.
    the cosine to the reference rises, also on the written photo."""
    import torch.nn.functional as F

    from facepriv.core.align import align_faces
    from facepriv.models import create_model

    src = _png(fixture_path("obama.jpg"), tmp_path / "obama.png")
    ref = fixture_path("biden.jpg")
    out = tmp_path / "out"
    cfg = ProtectConfig(score_model=str(tiny_dir), expression_ref=str(ref),
                        map={**FAST, "steps": 8, "batch_size": 1, "w_exp": 1.0})
    summary = run_protect([src], out, cfg, progress=False)
    assert summary.counts == {"ok": 1}, summary.failures
    hist = _history(out)
    l_exp = [h["L_exp"] for h in hist]
    assert all(v is not None and 0.0 <= v <= 2.0 for v in l_exp), l_exp
    cos_ref = [1 - v for v in l_exp]
    assert np.mean(cos_ref[-3:]) > np.mean(cos_ref[:3]) + 0.1, cos_ref
    group = summary.details["groups"][0]
    assert group["last"]["L_exp"] < group["first"]["L_exp"]

    expr = create_model("expr-fer7")

    def features(path):
        img, lm = _face_landmarks(path, mtcnn)
        crops = align_faces(img.to_tensor(), lm, expr.template, size=tuple(expr.input_size)).crops
        with torch.no_grad():
            return expr.features(crops)

    r = features(ref)
    before = float(F.cosine_similarity(features(src), r))
    after = float(F.cosine_similarity(features(out / "obama.png"), r))
    assert after > before + 0.02, (before, after)
