"""protect's noise baselines: one AttackConfig (from ProtectConfig.attack), the AttackEditor protect
and deid share, run through core.photo.process_photo end to end (dodging, impersonation, 16-bit
output)."""

from __future__ import annotations

import shutil
import types

import numpy as np
import pytest
import torch
from conftest import fixture_path
from PIL import Image

from facepriv.core.batch import InputItem
from facepriv.core.errors import ConfigError
from facepriv.core.faces import FacePolicy
from facepriv.core.io import load_image
from facepriv.core.photo import SaveOptions, process_photo
from facepriv.core.regions import region_mask
from facepriv.attacks import AttackConfig, AttackEditor
from facepriv.protect import ProtectConfig
from facepriv.protect.baselines import attack_config


def build_editor(cfg: AttackConfig, surrogates=("dlib-resnet", "facenet-casia"), *, target=None, detector=None):
    return AttackEditor(cfg, list(surrogates), target=target, detector=detector).setup("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def test_attack_config_validation(tmp_path):
    c = AttackConfig(epsilon="8/255").resolved()
    assert c.epsilon == pytest.approx(8 / 255)
    assert AttackEditor(AttackConfig()).surrogates == ["dlib-resnet", "facenet-casia"]
    assert AttackConfig(epsilon="16").resolved().epsilon == pytest.approx(16 / 255)  # text: whole levels
    with pytest.raises(ConfigError, match="unknown attack method"):
        AttackConfig(method="blur").resolved()
    with pytest.raises(ConfigError, match="target"):
        AttackEditor(AttackConfig(method="tipim"))
    with pytest.raises(ConfigError):
        AttackEditor(AttackConfig(), [])
    with pytest.raises(ConfigError, match=r"unknown attack option\(s\) stpes"):
        AttackConfig.from_dict({"stpes": 3})
    editor = AttackEditor(AttackConfig(method="mifgsm", steps=10), target=tmp_path / "t.jpg")
    a = editor.config_for(types.SimpleNamespace(bit_depth=16))
    assert a.method == "mifgsm" and a.momentum == 1.0 and a.quantize == 65535 and a.steps == 10
    assert editor.config_for(None).quantize == 255


def test_protect_builds_one_attack_config_from_the_options_given():
    a = attack_config(ProtectConfig(method="tidim", attack={"epsilon": "4/255", "momentum": 0.5}))
    assert (a.method, a.steps, a.momentum, a.ti_kernel) == ("tidim", 50, 0.5, 9)  # protect's 50 steps
    assert a.epsilon == pytest.approx(4 / 255)
    assert attack_config(ProtectConfig(method="pgd", map={"seed": 7})).seed == 7  # --seed
    given = AttackConfig(method="pgd", steps=3)
    assert attack_config(ProtectConfig(method="pgd", attack=given)).steps == 3
    assert ProtectConfig(method="pgd", attack=given).to_json()["attack"]["steps"] == 3
    with pytest.raises(ConfigError, match=r"unknown attack option\(s\) stpes"):
        ProtectConfig(method="pgd", attack={"stpes": 3})  # before any work
    with pytest.raises(ConfigError, match="for mifgsm, not for --method pgd"):
        ProtectConfig(method="pgd", attack=AttackConfig(method="mifgsm"))
    with pytest.raises(ConfigError, match=r"baseline attack options \(momentum\) apply to --method "):
        ProtectConfig(method="transfer", attack={"momentum": 1.0})
    with pytest.raises(ConfigError, match="tipim is a targeted method: give --target"):
        ProtectConfig(method="tipim")


def test_deid_adversarial_runs_the_same_editor_and_config():
    from facepriv.deid import create_method

    m = create_method("adversarial", attack="mifgsm", steps=4, epsilon="4/255", strength=2.0, region="head")
    assert isinstance(m.editor, AttackEditor)
    cfg = m.config(types.SimpleNamespace(bit_depth=16))
    assert isinstance(cfg, AttackConfig)
    assert (cfg.method, cfg.steps, cfg.region, cfg.quantize) == ("mifgsm", 4, "head", 65535)
    assert cfg.epsilon == pytest.approx(8 / 255)  # strength scales the budget
    whole = create_method("adversarial", config=AttackConfig(method="tidim", steps=2, ti_kernel=5))
    assert (whole.config().method, whole.config().ti_kernel) == ("tidim", 5)


def test_sface_onnx_is_refused_as_a_surrogate(mtcnn):
    with pytest.raises(ConfigError, match="no gradients"):
        build_editor(AttackConfig(), ["sface-onnx"], detector=mtcnn)


def _item(path):
    return InputItem(path=path, rel=path.relative_to(path.parent))


@pytest.mark.realmodels
def test_editor_through_process_photo_writes_a_protected_image(tmp_path, mtcnn):
    src = fixture_path("obama.jpg")
    edit = build_editor(AttackConfig(method="pgd", steps=3), detector=mtcnn)
    dst = tmp_path / "out" / "obama.png"  # PNG: the saved pixels are exactly the attack's output
    res = process_photo(_item(src), dst, detector=mtcnn, policy=FacePolicy(), edit=edit, save=SaveOptions())
    assert res.status == "ok" and res.faces == 1 and dst.is_file()
    before = load_image(src).rgb.astype(np.int16)
    after = np.asarray(Image.open(dst).convert("RGB")).astype(np.int16)
    diff = np.abs(after - before)
    assert diff.max() == 8  # the budget is used and never exceeded in the file
    face = mtcnn.detect(load_image(src).rgb)[0]
    r = region_mask(face, before.shape[:2])
    outside = np.ones(before.shape[:2], bool)
    outside[r.y0:r.y1, r.x0:r.x1] = r.mask[0].numpy() <= 0
    assert diff[outside].max() == 0
    row = edit.last_result.per_face[0]
    assert row["mode"] == "dodging" and row["source_cosine"]["facenet-casia"] < 0.9
    # a JPEG output works the same way (compression is the user's choice)
    res = process_photo(_item(src), tmp_path / "out" / "obama.jpg", detector=mtcnn, policy=FacePolicy(),
                        edit=edit, save=SaveOptions(quality=95))
    assert res.status == "ok" and (tmp_path / "out" / "obama.jpg").is_file()


@pytest.mark.realmodels
def test_impersonation_and_tipim_with_a_target_folder(tmp_path, mtcnn):
    tdir = tmp_path / "targets"
    tdir.mkdir()
    shutil.copy(fixture_path("biden.jpg"), tdir / "biden.jpg")
    shutil.copy(fixture_path("obama2.jpg"), tdir / "other.jpg")
    src = fixture_path("obama.jpg")
    one = build_editor(AttackConfig(method="mifgsm", steps=2), target=tdir / "biden.jpg", detector=mtcnn)
    assert one.target_ref["dlib-resnet"].shape == (1, 128)
    x = load_image(src).to_tensor()
    faces = mtcnn.detect(load_image(src).rgb)
    y = one(x, faces, load_image(src))
    assert float((y - x).abs().max()) <= 8 / 255 + 1e-6
    for c in one.last_result.per_face[0]["target_cosine"].values():
        assert c["after"] > c["before"]
    tip = build_editor(AttackConfig(method="tipim", steps=1), target=tdir, detector=mtcnn)
    assert tip.target_ref["facenet-casia"].shape == (2, 512)
    res = process_photo(_item(src), tmp_path / "o" / "a.png", detector=mtcnn, policy=FacePolicy(), edit=tip,
                        save=SaveOptions())
    assert res.status == "ok"
    assert tip.last_result.per_face[0]["target_index"] in (0, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        build_editor(AttackConfig(method="pgd"), target=tmp_path / "empty", detector=mtcnn)
    with pytest.raises(ConfigError, match="does not exist"):
        build_editor(AttackConfig(method="pgd"), target=tmp_path / "missing.jpg", detector=mtcnn)


@pytest.mark.realmodels
def test_sixteen_bit_input_keeps_the_budget_at_16_bit(tmp_path, mtcnn):
    import cv2

    face = np.asarray(Image.open(fixture_path("obama.jpg")).convert("RGB"))
    arr16 = face.astype(np.uint16) * 257 + 100  # off the 8-bit grid
    src = tmp_path / "deep16.png"
    cv2.imwrite(str(src), arr16[..., ::-1])
    edit = build_editor(AttackConfig(method="pgd", steps=2), ["dlib-resnet"], detector=mtcnn)
    dst = tmp_path / "out" / "deep16.png"
    res = process_photo(_item(src), dst, detector=mtcnn, policy=FacePolicy(), edit=edit, save=SaveOptions())
    assert res.status == "ok"
    out = cv2.imread(str(dst), cv2.IMREAD_UNCHANGED)[..., ::-1]
    assert out.dtype == np.uint16
    diff = np.abs(out.astype(np.int64) - arr16.astype(np.int64))
    assert 0 < diff.max() <= round(8 / 255 * 65535)
    assert torch.is_tensor(edit.last_result.image)
