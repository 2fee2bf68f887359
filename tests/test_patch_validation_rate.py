"""facepriv patch: the generator measures its own evasion rate on held-out faces at the end of
training, stores it in config.json, and `patch apply` warns before patching when it is low or
missing. Tiny models only (a tiny recogniser, landmarks from a fixed placement)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from conftest import fixture_path
from facepriv.patch import (
    APPLY_WARN_RATE,
    PatchApplier,
    PatchApplyConfig,
    PatchGenerator,
    generator_warning,
    read_validation,
    run_patch_apply,
    validation_lines,
)
from facepriv.patch.generator import write_validation
from facepriv.patch.train import PatchTrainer, held_out_photos, validate_generator
from test_patch import _fake_detector, _noisy_generator, _tiny_ensemble, _train_cfg


@pytest.fixture
def six_photos(tmp_path):
    """Six data photos (copies of the fixtures under distinct names) and one target."""
    root = tmp_path / "photos"
    (root / "data").mkdir(parents=True)
    (root / "targets").mkdir()
    for i in range(6):
        name = ("obama.jpg", "obama2.jpg", "biden.jpg")[i % 3]
        shutil.copy(fixture_path(name), root / "data" / f"p{i}.jpg")
    shutil.copy(fixture_path("biden.jpg"), root / "targets" / "biden.jpg")
    return root


def _ensemble_with_thresholds(thresholds: dict):
    ens = _tiny_ensemble()
    m = ens.members[0]
    m.spec = dataclasses.replace(m.spec, thresholds=thresholds)
    return ens


def _trainer(tmp_path, photos, *, thresholds=None, **kw):
    kw.setdefault("val_fraction", 0.5)
    kw.setdefault("epochs", 1)
    cfg = _train_cfg(tmp_path, photos, out=str(tmp_path / "gen"), **kw)
    ens = _tiny_ensemble() if thresholds is None else _ensemble_with_thresholds(thresholds)
    torch.manual_seed(0)
    return PatchTrainer(cfg, device="cpu", progress=False, surrogates=ens, detector=_fake_detector())


@pytest.fixture(autouse=True)
def _no_calibrations(tmp_path, monkeypatch):
    """No stored `facepriv audit calibrate` result may leak into the thresholds."""
    monkeypatch.setenv("FACEPRIV_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FACEPRIV_THRESHOLDS_DIR", str(tmp_path / "thresholds"))


# ============================================================================ training
def test_training_holds_out_photos_and_saves_the_validation_rate_in_config_json(tmp_path, six_photos):
    tr = _trainer(tmp_path, six_photos, thresholds={"default": 0.363})
    train_files, val_files = set(tr.faces.files), set(tr.val_faces.files)
    assert len(val_files) == 3 and len(train_files) == 3 and not train_files & val_files
    res = tr.fit()
    v = res.validation
    assert v["held_out"] is True and v["faces"] == 3 and v["far"] == "1e-2"
    assert 0.0 <= v["evasion_rate"] <= 1.0 and 0.0 <= v["grey_patch_rate"] <= 1.0
    # a recogniser with no FAR 1e-2 threshold, only a default operating one - said so
    row = v["surrogates"]["tiny-fr"]
    assert row["threshold"] == pytest.approx(0.363) and "default operating threshold" in row["threshold_source"]
    assert any("tiny-fr" in n and "default operating threshold" in n for n in v["notes"])
    assert v["at"].startswith("the surrogates' default thresholds") and v["at"] in validation_lines(v)[0]
    # stored in the generator's config.json, tied to its weights, and back through from_pretrained
    meta = json.loads((tmp_path / "gen" / "config.json").read_text())
    assert meta["validation"]["evasion_rate"] == v["evasion_rate"] and meta["validation"]["weights_sha256"]
    assert read_validation(tmp_path / "gen")["evasion_rate"] == v["evasion_rate"]
    assert PatchGenerator.from_pretrained(tmp_path / "gen").validation["faces"] == 3
    assert res.to_json()["validation"]["evasion_rate"] == v["evasion_rate"]
    # with a target set, the impersonation rate of the training targets is measured too, with
    # the share of unpatched faces that already pass for the target beside it
    assert 0.0 <= v["impersonation_rate"] <= 1.0 and 0.0 <= v["impersonation_rate_clean"] <= 1.0
    assert "unpatched:" in validation_lines(v)[1]


def test_held_out_photos_are_stable_and_never_all(tmp_path):
    files = [str(tmp_path / f"p{i}.jpg") for i in range(40)]
    a = held_out_photos(files, fraction=0.1, max_photos=200, seed=0)
    assert len(a) == 4 and a == held_out_photos(list(reversed(files)) + files[:3], fraction=0.1, max_photos=200, seed=0)
    assert a != held_out_photos(files, fraction=0.1, max_photos=200, seed=1)
    assert len(held_out_photos(files, fraction=0.5, max_photos=5, seed=0)) == 5
    assert held_out_photos(files[:5], fraction=0.1, max_photos=200, seed=0) == set()  # 10 % of 5 rounds to none
    assert len(held_out_photos(files[:2], fraction=0.9, max_photos=200, seed=0)) == 1  # one is left to train on


def test_too_few_photos_validate_on_the_training_faces_and_say_so(tmp_path, six_photos):
    tr = _trainer(tmp_path, six_photos, val_fraction=0.1)  # 10 % of 6 photos: none held out
    assert tr.val_faces is None and len(tr.faces) == 6
    v = tr.fit().validation
    assert v["held_out"] is False and v["faces"] == 6
    assert any("too few training photos" in n for n in v["notes"])
    assert "6 training face(s)" in validation_lines(v)[0]


@pytest.mark.parametrize("threshold, rate", [(1.01, 1.0), (-1.01, 0.0)])
def test_the_rate_counts_faces_below_the_far_threshold(tmp_path, six_photos, threshold, rate):
    """A FAR 1e-2 threshold above every possible cosine: all faces evade; below every one: none."""
    tr = _trainer(tmp_path, six_photos, thresholds={"1e-2": threshold, "default": 0.0})
    v = tr.validate()
    assert v["evasion_rate"] == rate and v["grey_patch_rate"] == rate
    row = v["surrogates"]["tiny-fr"]
    assert row["threshold"] == threshold and row["threshold_source"].startswith("FAR 1e-2") and v["at"] == "FAR 1e-2"
    assert not any("default operating threshold" in n for n in v["notes"])


def test_a_grey_generator_scores_exactly_the_grey_patch_baseline(tmp_path, six_photos):
    """The patch is pasted where apply pastes it: a generator that outputs mid-grey evades
    exactly as often as the grey baseline, whatever the threshold."""
    tr = _trainer(tmp_path, six_photos, targets=None)
    with torch.no_grad():
        for p in tr.generator.parameters():
            p.zero_()  # tanh(0) -> 0.5 everywhere
    ens = tr.surrogates
    for t in (0.9, 0.99, 0.999, 0.9999):
        ens.members[0].spec = dataclasses.replace(ens.members[0].spec, thresholds={"1e-2": t})
        v = validate_generator(tr.generator.eval(), ens, tr.val_faces, far="1e-2")
        assert v["evasion_rate"] == v["grey_patch_rate"]
        assert v["surrogates"]["tiny-fr"]["mean_similarity"] == v["surrogates"]["tiny-fr"]["mean_similarity_grey"]
    assert "impersonation_rate" not in v


def test_a_surrogate_without_any_threshold_gives_no_rate_and_says_so(tmp_path, six_photos):
    tr = _trainer(tmp_path, six_photos, thresholds={})
    v = tr.validate()
    assert v["evasion_rate"] is None and v["judged_by"] == []
    assert any("no threshold is known for tiny-fr" in n for n in v["notes"])
    assert "no surrogate has a known threshold" in validation_lines(v)[0]
    assert "unknown" in generator_warning(v)


def test_train_summary_says_what_a_good_rate_is():
    v = {"far": "1e-2", "faces": 40, "held_out": True, "evasion_rate": 0.74, "grey_patch_rate": 0.05,
         "judged_by": ["a", "b"], "surrogates": {"a": {"evasion_rate": 0.8}, "b": {"evasion_rate": 0.9}},
         "notes": ["only a note"]}
    lines = validation_lines(v)
    assert lines[0].startswith("validation evasion 74 % at FAR 1e-2 on 40 held-out face(s) (good: > 80 %")
    assert "train longer" in lines[0] and "a plain grey patch: 5 %" in lines[0]
    assert lines[1] == "  per surrogate: a 80 %, b 90 %" and lines[-1] == "  note: only a note"
    assert "train longer" not in validation_lines({**v, "evasion_rate": 0.85})[0]


def test_resuming_a_run_started_before_validation_keeps_training_on_every_face(tmp_path, six_photos):
    for i in range(6, 10):  # ten photos: the default 10 % holds one out
        shutil.copy(fixture_path("obama.jpg"), six_photos / "data" / f"p{i}.jpg")
    tr = _trainer(tmp_path, six_photos, val_fraction=0.1)
    assert len(tr.faces) == 9 and len(tr.val_faces) == 1
    tr.fit()
    state = tmp_path / "gen" / "train_state.json"
    meta = json.loads(state.read_text())
    for k in ("val_fraction", "val_max_photos", "val_far"):
        meta["config"].pop(k)  # what a run started before validation existed wrote
    state.write_text(json.dumps(meta))
    tr = _trainer(tmp_path, six_photos, val_fraction=0.1, epochs=2)
    res = tr.fit(resume=True)  # same fingerprint at the default split: resumable
    assert res.resumed_from == 1 and res.faces == 10 and tr.val_faces is None
    assert res.validation["held_out"] is False


def test_another_validation_split_is_another_run(tmp_path, six_photos):
    a = _train_cfg(tmp_path, six_photos)
    b = _train_cfg(tmp_path, six_photos, val_fraction=0.3)
    c = _train_cfg(tmp_path, six_photos, val_far="1e-3")
    assert a.fingerprint() != b.fingerprint() and a.fingerprint() == c.fingerprint()


# ============================================================================ apply
def _apply(tmp_path, gen_dir, capsys, monkeypatch, target=None):
    events = []
    real = PatchApplier.apply_many

    def recording(self, images, landmarks):
        events.append(("patch", capsys.readouterr().err))
        return real(self, images, landmarks)

    monkeypatch.setattr(PatchApplier, "apply_many", recording)
    src = tmp_path / "in"
    if not src.exists():
        src.mkdir()
        for n in ("obama.jpg", "obama2.jpg"):
            shutil.copy(fixture_path(n), src / n)
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    summary = run_patch_apply([src], out, PatchApplyConfig(generator=str(gen_dir), photo_batch=1, target=target,
                                                          verify=False),  # the verdict has its own tests
                              output_suffix=".png", progress=False, detector=_fake_detector())
    assert summary.counts == {"ok": 2}
    err_before = events[0][1]  # stderr printed before the first photo was patched
    err_after = "".join(e for _, e in events[1:]) + capsys.readouterr().err
    return err_before, err_after


def _validated(tmp_path, **fields):
    gen_dir = _noisy_generator(tmp_path)
    v = {"far": "1e-2", "faces": 25, "held_out": True, "judged_by": ["dlib-resnet", "facenet-casia"],
         "grey_patch_rate": 0.04, **fields}
    write_validation(gen_dir, v)
    return gen_dir


def test_apply_warns_once_before_the_batch_when_the_saved_rate_is_low(tmp_path, capsys, monkeypatch):
    gen_dir = _validated(tmp_path, evasion_rate=0.12)
    before, after = _apply(tmp_path, gen_dir, capsys, monkeypatch)
    assert before.count("warning:") == 1 and "warning:" not in after
    assert "defeats its surrogates (dlib-resnet, facenet-casia) on only 12 % of 25 held-out" in before
    assert "train longer" in before and "--epochs" in before


def test_apply_warns_when_the_generator_has_no_rate(tmp_path, capsys, monkeypatch):
    gen_dir = _noisy_generator(tmp_path)  # saved without training: no validation record
    assert read_validation(gen_dir) is None
    before, after = _apply(tmp_path, gen_dir, capsys, monkeypatch)
    assert before.count("warning:") == 1 and "no validation evasion rate" in before and "warning:" not in after


def test_apply_is_quiet_for_a_generator_above_the_floor(tmp_path, capsys, monkeypatch):
    gen_dir = _validated(tmp_path, evasion_rate=APPLY_WARN_RATE + 0.3)
    before, after = _apply(tmp_path, gen_dir, capsys, monkeypatch)
    assert "warning" not in before + after


def test_impersonation_is_judged_by_its_own_rate():
    v = {"far": "1e-2", "faces": 25, "held_out": True, "judged_by": ["x"], "evasion_rate": 0.9,
         "impersonation_rate": 0.1}
    assert generator_warning(v, mode="evasion") is None
    assert "on only 10 %" in generator_warning(v, mode="impersonation")
    assert generator_warning({**v, "impersonation_rate": 0.7}, mode="impersonation") is None
    assert generator_warning({k: x for k, x in v.items() if k != "impersonation_rate"}, mode="impersonation") is None


def test_a_rate_measured_on_other_weights_is_not_trusted(tmp_path):
    from safetensors.torch import load_file, save_file

    gen_dir = _validated(tmp_path, evasion_rate=0.9)
    assert read_validation(gen_dir)["evasion_rate"] == 0.9
    w = gen_dir / "generator.safetensors"
    state = load_file(str(w))
    k = next(iter(state))
    state[k] = state[k] + 1
    save_file(state, str(w))  # e.g. a checkpoint written after the validation
    assert read_validation(gen_dir) is None
    assert "no validation evasion rate" in generator_warning(read_validation(gen_dir))
