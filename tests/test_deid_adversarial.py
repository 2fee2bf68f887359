"""deid's "adversarial" method: registration, options, region/budget, and a real run via
deid.create_method and run_deid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fixture_path, load_rgb
from PIL import Image
from torch import nn

import facepriv.deid.adversarial  # noqa: F401 - registers the method
from facepriv.attacks import SurrogateEnsemble
from facepriv.core.errors import ConfigError
from facepriv.core.regions import region_mask
from facepriv.deid import METHODS, DeidConfig, create_method, deidentify, run_deid
from facepriv.models import ModelSpec
from facepriv.models.recognition import FaceRecognizer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def _tiny_ensemble() -> SurrogateEnsemble:
    torch.manual_seed(0)
    spec = ModelSpec(name="tiny", task="recognition", architecture="tiny cnn", description="test", license="MIT",
                     sources=(), loader=lambda ctx: None, input_size=(56, 56), template="arcface-112",
                     metric="cosine")
    net = nn.Sequential(nn.Conv2d(3, 8, 5, 2, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 16))
    return SurrogateEnsemble([], models=[FaceRecognizer(spec, net, lambda x: x).eval().requires_grad_(False)])


@pytest.fixture(scope="module")
def obama(mtcnn):
    rgb = load_rgb("obama.jpg")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest.one_thread
    try:
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255, mtcnn.detect(rgb)
    finally:
        torch.set_num_threads(n)


def test_registered_and_options_checked():
    assert "adversarial" in METHODS
    m = create_method("adversarial", attack="mifgsm", epsilon="4/255", strength=2.0, steps=3, ensemble=_tiny_ensemble())
    assert m.epsilon == pytest.approx(8 / 255) and m.describe()["attack"] == "mifgsm"
    assert create_method("adversarial", surrogates="dlib-resnet, facenet-casia").surrogates == ["dlib-resnet", "facenet-casia"]
    with pytest.raises(ConfigError, match="unknown attack"):
        create_method("adversarial", attack="blur")
    with pytest.raises(ConfigError, match="target"):
        create_method("adversarial", attack="tipim")
    with pytest.raises(ConfigError):
        create_method("adversarial", region="torso")


@pytest.mark.parametrize("attack", ["pgd", "mifgsm", "tidim"])
def test_changes_only_the_face_within_the_budget(attack, obama):
    x, faces = obama
    m = create_method("adversarial", attack=attack, steps=2, ensemble=_tiny_ensemble())
    y = deidentify(x, faces, [m])
    d = (y - x).abs()
    assert 0 < float(d.max()) <= 8 / 255 + 1e-6
    r = region_mask(faces[0], x.shape[-2:], feather=m.feather)
    outside = torch.ones(x.shape[-2:], dtype=torch.bool)
    outside[r.y0:r.y1, r.x0:r.x1] = r.mask[0] <= 0
    assert float(d[:, outside].max()) == 0.0
    assert m.last_result.per_face[0]["steps"] == 2
    assert m.last_info["attack"] == attack and m.last_info["faces"][0]["steps"] == 2
    assert m.setup("cpu") is m  # the ensemble given is kept; setup only loads what is missing
    assert torch.equal(create_method("adversarial", ensemble=_tiny_ensemble()).apply(x, []), x)


@pytest.mark.realmodels
def test_real_dodging_and_impersonation_via_create_method(obama):
    x, faces = obama
    m = create_method("adversarial", steps=2)  # default surrogates: dlib-resnet + facenet-casia, dodging
    y = m.apply(x, faces)
    row = m.last_result.per_face[0]
    assert row["mode"] == "dodging" and row["source_cosine"]["facenet-casia"] < 0.9
    assert float((y - x).abs().max()) <= 8 / 255 + 1e-6
    t = create_method("adversarial", attack="mifgsm", steps=1, target=fixture_path("biden.jpg"),
                      ensemble=m.editor.ensemble)
    t.apply(x, faces)
    for c in t.last_result.per_face[0]["target_cosine"].values():
        assert c["after"] > c["before"]


@pytest.mark.realmodels
def test_real_run_through_run_deid(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.open(fixture_path("obama.jpg")).save(src / "obama.png")
    out = tmp_path / "out"
    opts = {"adversarial": {"steps": 1, "surrogates": ["dlib-resnet"]}}
    summary = run_deid([src], out, DeidConfig(methods=["adversarial"], options=opts), progress=False)
    assert summary.exit_code == 0
    got = np.asarray(Image.open(out / "obama.png").convert("RGB")).astype(int)
    ref = np.asarray(Image.open(src / "obama.png").convert("RGB")).astype(int)
    assert 0 < np.abs(got - ref).max() <= 8
