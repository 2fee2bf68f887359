"""dlib's binary serialisation (``*.dat`` networks written by ``dlib::serialize``) read without dlib.

Wire format (``dlib/serialize.h``):

* integers: one control byte (bit ``0x80`` = negative, low 4 bits = number of value bytes),
  then the absolute value in that many little-endian bytes;
* floats/doubles: an integer mantissa and an integer exponent, value = ``mantissa * 2**exponent``
  (exponents 32000/32001/32002 encode +inf/-inf/nan);
* strings: an integer length, then the bytes; bools: the ASCII character ``'0'`` or ``'1'``;
* DNN tensors (``resizable_tensor``, version 2): version, ``num_samples, k, nr, nc``, then that
  many raw little-endian float32 values; ``alias_tensor`` (version 1): version and 4 dims only.

A network ``add_loss_layer<LOSS, SUBNET>`` is written as: version, loss details, then the
subnetwork; every ``add_layer`` writes its version, *then its subnetwork* (recursively), then its
own layer details and bookkeeping (three bools and the ``x_grad``/``cached_output``/
``params_grad`` tensors); ``tag``/``skip`` layers write a version and their subnetwork only. So a
file is a prefix of version numbers (outermost layer first), the input layer, and then every
layer's details in input-to-output order. Tag ids are not stored: the topology comes from the
network type, here dlib's face-recognition ResNet (``anet_type`` of
``dnn_face_recognition_ex.cpp``), which :func:`dlib_resnet_state_dict` checks layer by layer.

Batch norm is already folded into ``affine_`` layers (per-channel ``gamma``/``beta``) in that
file. Every malformed, truncated or foreign input raises :class:`DlibFormatError` (a
``ValueError``) saying what was expected where.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...core.errors import FaceprivError

#: dlib's ``input_rgb_image`` mean (R, G, B), subtracted from 0..255 pixels before ``/ 256``.
DLIB_RGB_MEAN = (122.782, 117.001, 104.298)

#: Residual blocks of the face-recognition ResNet, input to output: (channels, first stride).
#: alevel4 = 3 x 32; alevel3 = 64 down + 3 x 64; alevel2 = 128 down + 2 x 128;
#: alevel1 = 256 down + 2 x 256; alevel0 = 256 down. With the 7x7 stem conv: 29 convolutions.
RESNET_BLOCKS: tuple[tuple[int, int], ...] = (
    (32, 1), (32, 1), (32, 1),
    (64, 2), (64, 1), (64, 1), (64, 1),
    (128, 2), (128, 1), (128, 1),
    (256, 2), (256, 1), (256, 1),
    (256, 2),
)
STEM_CHANNELS = 32
EMBEDDING_SIZE = 128

_FLOAT_SPECIALS = {32000: math.inf, 32001: -math.inf, 32002: math.nan}


class DlibFormatError(FaceprivError, ValueError):
    """The bytes are not (or no longer, e.g. truncated) the dlib serialisation expected."""


# --------------------------------------------------------------------------- primitives
class DlibReader:
    """Cursor over a dlib serialisation buffer; every read is bounds-checked."""

    def __init__(self, data: bytes, name: str = "dlib file"):
        self.data = memoryview(data)
        self.pos = 0
        self.name = name

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def error(self, msg: str, at: int | None = None) -> DlibFormatError:
        return DlibFormatError(f"{self.name}: {msg} (at byte {self.pos if at is None else at} "
                               f"of {len(self.data)}); not a dlib network file, or a damaged one")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining:
            raise self.error(f"truncated: {what} needs {n} bytes, {self.remaining} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def peek(self, n: int = 1) -> bytes:
        return bytes(self.data[self.pos:self.pos + n])

    def int(self, what: str = "integer") -> int:
        start = self.pos
        control = self.take(1, what)[0]
        size = control & 0x0F
        if control & 0x70 or size > 8:
            raise self.error(f"bad control byte 0x{control:02x} for {what}", start)
        value = int.from_bytes(self.take(size, what), "little")
        return -value if control & 0x80 else value

    def float(self, what: str = "float") -> float:
        mantissa = self.int(what + " mantissa")
        exponent = self.int(what + " exponent")
        if exponent in _FLOAT_SPECIALS:
            return _FLOAT_SPECIALS[exponent]
        if abs(exponent) > 2000:
            raise self.error(f"implausible exponent {exponent} for {what}")
        return math.ldexp(mantissa, exponent)

    def bool(self, what: str = "bool") -> bool:
        start = self.pos
        b = self.take(1, what)[0]
        if b not in (0x30, 0x31):
            raise self.error(f"expected '0' or '1' for {what}, found 0x{b:02x}", start)
        return b == 0x31

    def string(self, what: str = "string", max_len: int = 256) -> str:
        start = self.pos
        n = self.int(what + " length")
        if not 0 <= n <= max_len:
            raise self.error(f"implausible length {n} for {what}", start)
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not text: {raw[:32]!r}", start) from None

    def dims(self, what: str) -> tuple[int, int, int, int]:
        dims = tuple(self.int(f"{what} size") for _ in range(4))
        if any(d < 0 for d in dims):
            raise self.error(f"negative size {dims} for {what}")
        return dims  # type: ignore[return-value]

    def tensor(self, what: str = "tensor") -> np.ndarray:
        """A ``resizable_tensor``: float32 array shaped (num_samples, k, nr, nc)."""
        start = self.pos
        version = self.int(what + " version")
        if version != 2:
            raise self.error(f"unsupported tensor version {version} for {what}", start)
        dims = self.dims(what)
        count = math.prod(dims)
        raw = self.take(4 * count, f"{what} data {dims}")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)

    def alias(self, what: str = "alias tensor") -> tuple[int, int, int, int]:
        """An ``alias_tensor``: only its shape is stored (it is a view into ``params``)."""
        start = self.pos
        version = self.int(what + " version")
        if version != 1:
            raise self.error(f"unsupported alias_tensor version {version} for {what}", start)
        return self.dims(what)


# --------------------------------------------------------------------------- layers
@dataclass
class DlibLayer:
    """One layer's details: ``kind`` ("con", "affine", ...), raw version tag, values, arrays."""

    kind: str
    version: str
    values: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.arrays.items()}
        return f"DlibLayer({self.kind}, {self.values}, {shapes})"


def _split_params(r: DlibReader, params: np.ndarray, parts: list[tuple[str, tuple[int, ...]]],
                  what: str) -> dict[str, np.ndarray]:
    """Cut a layer's flat ``params`` into its alias views, checking the sizes add up."""
    flat = params.reshape(-1)
    need = sum(math.prod(shape) for _, shape in parts)
    if need != flat.size:
        raise r.error(f"{what}: parameter views need {need} values, params holds {flat.size}")
    out, offset = {}, 0
    for name, shape in parts:
        n = math.prod(shape)
        out[name] = flat[offset:offset + n].reshape(shape)
        offset += n
    return out


def _read_con(r: DlibReader, version: str) -> DlibLayer:
    params = r.tensor("con params")
    v = {k: r.int(f"con {k}") for k in ("num_filters", "nr", "nc", "stride_y", "stride_x",
                                       "padding_y", "padding_x")}
    filters, biases = r.alias("con filters"), r.alias("con biases")
    for k in ("learning_rate_mult", "weight_decay_mult", "bias_learning_rate_mult",
              "bias_weight_decay_mult"):
        v[k] = r.float(f"con {k}")
    if filters[0] != v["num_filters"] or filters[2:] != (v["nr"], v["nc"]):
        raise r.error(f"con filters {filters} disagree with {v}")
    arrays = _split_params(r, params, [("weight", filters), ("bias", (math.prod(biases),))], "con")
    return DlibLayer("con", version, v, arrays)


def _read_affine(r: DlibReader, version: str) -> DlibLayer:
    params = r.tensor("affine params")
    gamma, beta = r.alias("affine gamma"), r.alias("affine beta")
    # Newer dlib also writes the mode (0 = CONV_MODE, per channel; 1 = FC_MODE, per element);
    # older files stop here and the next byte is a bool ('0'/'1') of the enclosing add_layer.
    mode = 0 if r.peek() in (b"0", b"1") else r.int("affine mode")
    if gamma != beta:
        raise r.error(f"affine gamma {gamma} and beta {beta} differ")
    n = math.prod(gamma)
    arrays = _split_params(r, params, [("gamma", (n,)), ("beta", (n,))], "affine")
    return DlibLayer("affine", version, {"mode": mode, "shape": gamma}, arrays)


def _read_pool(kind: str) -> Callable[[DlibReader, str], DlibLayer]:
    def read(r: DlibReader, version: str) -> DlibLayer:
        v = {k: r.int(f"{kind} {k}") for k in ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")}
        return DlibLayer(kind, version, v)
    return read


def _read_fc(r: DlibReader, version: str) -> DlibLayer:
    v: dict[str, Any] = {"num_outputs": r.int("fc num_outputs"), "num_inputs": r.int("fc num_inputs")}
    params = r.tensor("fc params")
    weights, biases = r.alias("fc weights"), r.alias("fc biases")
    v["has_bias"] = r.int("fc bias_mode") == 0  # FC_HAS_BIAS = 0, FC_NO_BIAS = 1
    for k in ("learning_rate_mult", "weight_decay_mult", "bias_learning_rate_mult",
              "bias_weight_decay_mult"):
        v[k] = r.float(f"fc {k}")
    if weights[:2] != (v["num_inputs"], v["num_outputs"]):
        raise r.error(f"fc weights {weights} disagree with {v}")
    parts = [("weight", (v["num_inputs"], v["num_outputs"]))]  # y = x @ W
    if v["has_bias"]:
        parts.append(("bias", (math.prod(biases),)))
    return DlibLayer("fc", version, v, _split_params(r, params, parts, "fc"))


def _read_input_rgb(r: DlibReader, version: str) -> DlibLayer:
    v: dict[str, Any] = {"mean": tuple(r.float(f"input mean {c}") for c in "RGB")}
    if version == "input_rgb_image_sized":
        v["nr"], v["nc"] = r.int("input rows"), r.int("input columns")
    return DlibLayer("input_rgb_image", version, v)


def _read_loss_metric(r: DlibReader, version: str) -> DlibLayer:
    v = {}
    if version == "loss_metric_2":
        v = {"margin": r.float("loss margin"), "distance_threshold": r.float("loss threshold")}
    return DlibLayer("loss_metric", version, v)


def _no_details(kind: str) -> Callable[[DlibReader, str], DlibLayer]:
    return lambda r, version: DlibLayer(kind, version)


_LAYER_READERS: dict[str, Callable[[DlibReader, str], DlibLayer]] = {
    "con_4": _read_con,
    "affine_": _read_affine,
    "relu_": _no_details("relu"),
    "add_prev_": _no_details("add_prev"),
    "max_pool_2": _read_pool("max_pool"),
    "avg_pool_2": _read_pool("avg_pool"),
    "fc_2": _read_fc,
    "input_rgb_image": _read_input_rgb,
    "input_rgb_image_sized": _read_input_rgb,
    "loss_metric_": _read_loss_metric,
    "loss_metric_2": _read_loss_metric,
}


def read_layer(r: DlibReader) -> DlibLayer:
    """Read one layer's details (its version string selects the format)."""
    start = r.pos
    version = r.string("layer type")
    try:
        reader = _LAYER_READERS[version]
    except KeyError:
        raise r.error(f"unsupported dlib layer {version!r}", start) from None
    return reader(r, version)


# --------------------------------------------------------------------------- networks
@dataclass
class DlibNetwork:
    """A parsed network: loss, input layer and computational layers (input to output).

    ``wrappers`` lists, outermost first, what the file nests: ``"layer"`` for an
    ``add_layer`` and ``"tag/skip"`` for a tag or skip layer (dlib stores no tag ids).
    """

    loss: DlibLayer
    input: DlibLayer
    layers: list[DlibLayer]
    wrappers: list[str]


def _read_trailer(r: DlibReader, version: int, bottom: bool, what: str) -> None:
    """The add_layer bookkeeping after a layer's details (flags and scratch tensors)."""
    for k in ("setup_called", "gradient_input_is_stale", "output_disabled"):
        r.bool(f"{what} {k}")
    r.tensor(f"{what} x_grad")
    r.tensor(f"{what} cached_output")
    if bottom:
        r.tensor(f"{what} grad_final")
        if version >= 3:
            r.int(f"{what} sample_expansion_factor")
    else:
        r.tensor(f"{what} params_grad")


def _starts_input_layer(r: DlibReader) -> bool:
    """Does a string naming an input layer start here (vs. another nested version number)?"""
    head = r.peek(7)  # string length (0x01, n), then the text
    if len(head) < 7:
        raise r.error(f"truncated: {r.remaining} bytes left inside the layer list")
    return head[0] == 0x01 and head[2:] == b"input"


def parse_network(data: bytes, name: str = "dlib file") -> DlibNetwork:
    """Parse a serialised ``add_loss_layer<...>`` network (all of ``data``)."""
    r = DlibReader(data, name)
    if len(data) < 4:
        raise r.error(f"truncated: {len(data)} bytes is too short")
    if (v := r.int("loss layer version")) != 1:
        raise r.error(f"expected a dlib loss layer (version 1), found version {v}", 0)
    loss = read_layer(r)
    if loss.kind != "loss_metric":
        raise r.error(f"expected a metric-learning network, found loss {loss.version!r}")
    versions: list[int] = []
    while True:
        start = r.pos
        v = r.int("layer version")
        if _starts_input_layer(r):
            if v not in (2, 3):
                raise r.error(f"unsupported input add_layer version {v}", start)
            break
        if v not in (1, 2):
            raise r.error(f"unsupported nested layer version {v}", start)
        versions.append(v)
        if len(versions) > 10_000:
            raise r.error("implausibly deep network")
    bottom_version = v
    inp = read_layer(r)
    if inp.kind != "input_rgb_image":
        raise r.error(f"unsupported input layer {inp.version!r}")
    layers = [read_layer(r)]
    _read_trailer(r, bottom_version, True, f"layer {layers[0].version}")
    for v in reversed(versions):  # tag/skip layers (version 1) store nothing after their subnet
        if v == 2:
            layers.append(read_layer(r))
            _read_trailer(r, v, False, f"layer {layers[-1].version}")
    if r.remaining:
        raise r.error(f"{r.remaining} unexpected trailing bytes after the network")
    wrappers = ["layer" if v == 2 else "tag/skip" for v in versions] + ["layer"]
    return DlibNetwork(loss, inp, layers, wrappers)


def read_network(path: str | Path) -> DlibNetwork:
    """Read and parse a dlib network file."""
    path = Path(path)
    return parse_network(path.read_bytes(), name=str(path))


# --------------------------------------------------------------------------- face ResNet
def _expected_resnet_layers() -> tuple[list[tuple[str, dict[str, int]]], list[str]]:
    """The face ResNet's layers input-to-output (kind, required values) and wrapper nesting."""
    def con(n: int, k: int, s: int) -> tuple[str, dict[str, int]]:
        pad = 0 if s != 1 else k // 2  # dlib's default padding
        return "con", {"num_filters": n, "nr": k, "nc": k, "stride_y": s, "stride_x": s,
                       "padding_y": pad, "padding_x": pad}

    def pool(kind: str, k: int, s: int) -> tuple[str, dict[str, int]]:
        pad = 0 if s != 1 else k // 2
        return kind, {"nr": k, "nc": k, "stride_y": s, "stride_x": s, "padding_y": pad, "padding_x": pad}

    layers = [con(STEM_CHANNELS, 7, 2), ("affine", {}), ("relu", {}), pool("max_pool", 3, 2)]
    blocks_nest: list[list[str]] = []
    for n, s in RESNET_BLOCKS:
        body = [con(n, 3, s), ("affine", {}), ("relu", {}), con(n, 3, 1), ("affine", {})]
        if s == 1:  # ares: relu<add_prev1<block<tag1<...>>>>
            layers += body + [("add_prev", {}), ("relu", {})]
            blocks_nest.append(["layer"] * 7 + ["tag/skip"])
        else:  # ares_down: relu<add_prev2<avg_pool<skip1<tag2<block<tag1<...>>>>>>>>
            layers += body + [pool("avg_pool", 2, 2), ("add_prev", {}), ("relu", {})]
            blocks_nest.append(["layer"] * 3 + ["tag/skip"] * 2 + ["layer"] * 5 + ["tag/skip"])
    layers += [("avg_pool", {"nr": 0, "nc": 0, "stride_y": 1, "stride_x": 1, "padding_y": 0,
                             "padding_x": 0}), ("fc", {"num_outputs": EMBEDDING_SIZE})]
    # Nesting, outermost first, as the file lists it.
    nest = ["layer", "layer"]  # fc_no_bias, avg_pool_everything
    for b in reversed(blocks_nest):
        nest += b
    nest += ["layer", "layer", "layer", "layer"]  # max_pool, relu, affine, con (bottom)
    return layers, nest


def dlib_resnet_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Convert ``dlib_face_recognition_resnet_model_v1.dat`` into the state dict of
    :class:`facepriv.models.dlib_resnet.DlibResNet`.

    Checks that the file is exactly the ResNet that module implements (layer kinds, nesting,
    filter counts, kernel sizes, strides, paddings, input mean and size).
    """
    net = read_network(path)
    return resnet_state_dict_from_network(net, name=str(path))


def resnet_state_dict_from_network(net: DlibNetwork, name: str = "dlib file") -> dict[str, torch.Tensor]:
    """Map a parsed face ResNet onto :class:`~facepriv.models.dlib_resnet.DlibResNet` keys."""
    def fail(msg: str) -> DlibFormatError:
        return DlibFormatError(f"{name}: not dlib's face-recognition ResNet: {msg}")

    expected, nest = _expected_resnet_layers()
    if net.wrappers != nest:
        raise fail(f"the layer nesting differs (found {len(net.wrappers)} nested layers, "
                   f"expected {len(nest)})")
    if len(net.layers) != len(expected):
        raise fail(f"{len(net.layers)} layers, expected {len(expected)}")
    for i, (layer, (kind, want)) in enumerate(zip(net.layers, expected)):
        if layer.kind != kind:
            raise fail(f"layer {i} is {layer.version!r}, expected {kind}")
        got = {k: layer.values.get(k) for k in want}
        if got != want:
            raise fail(f"layer {i} ({kind}) has {got}, expected {want}")
        if kind == "affine" and layer.values["mode"] != 0:
            raise fail(f"layer {i}: affine is not per-channel (CONV_MODE)")
        if kind == "fc" and layer.values["has_bias"]:
            raise fail(f"layer {i}: fc has a bias, expected fc_no_bias")
    mean = net.input.values["mean"]
    if any(abs(a - b) > 1e-3 for a, b in zip(mean, DLIB_RGB_MEAN)):
        raise fail(f"input mean {mean}, expected {DLIB_RGB_MEAN}")
    if (net.input.values.get("nr"), net.input.values.get("nc")) not in ((150, 150), (None, None)):
        raise fail(f"input size {net.input.values.get('nr')}x{net.input.values.get('nc')}, expected 150x150")

    convs = iter(layer for layer in net.layers if layer.kind == "con")
    affines = iter(layer for layer in net.layers if layer.kind == "affine")
    names = ["stem"] + [f"blocks.{i}.{j}" for i in range(len(RESNET_BLOCKS)) for j in ("1", "2")]
    state: dict[str, torch.Tensor] = {}
    for prefix in names:
        conv, aff = next(convs), next(affines)
        weight = conv.arrays["weight"]
        conv_name, aff_name = (("stem.conv", "stem.affine") if prefix == "stem"
                               else (prefix[:-2] + ".conv" + prefix[-1], prefix[:-2] + ".affine" + prefix[-1]))
        state[f"{conv_name}.weight"] = torch.from_numpy(weight.copy())
        state[f"{conv_name}.bias"] = torch.from_numpy(conv.arrays["bias"].copy())
        if aff.arrays["gamma"].size != weight.shape[0]:
            raise fail(f"{aff_name} has {aff.arrays['gamma'].size} channels, conv has {weight.shape[0]}")
        state[f"{aff_name}.weight"] = torch.from_numpy(aff.arrays["gamma"].copy())
        state[f"{aff_name}.bias"] = torch.from_numpy(aff.arrays["beta"].copy())
    fc = net.layers[-1]
    state["fc.weight"] = torch.from_numpy(np.ascontiguousarray(fc.arrays["weight"].T))
    _check_channels(state, fail)
    return state


def _check_channels(state: dict[str, torch.Tensor], fail: Callable[[str], DlibFormatError]) -> None:
    """Every conv's input channels must be the previous layer's output channels."""
    channels = STEM_CHANNELS
    if tuple(state["stem.conv.weight"].shape) != (STEM_CHANNELS, 3, 7, 7):
        raise fail(f"stem conv {tuple(state['stem.conv.weight'].shape)}")
    for i, (n, _) in enumerate(RESNET_BLOCKS):
        for j, cin in (("1", channels), ("2", n)):
            shape = tuple(state[f"blocks.{i}.conv{j}.weight"].shape)
            if shape != (n, cin, 3, 3):
                raise fail(f"blocks.{i}.conv{j} has shape {shape}, expected {(n, cin, 3, 3)}")
        channels = n
    if tuple(state["fc.weight"].shape) != (EMBEDDING_SIZE, channels):
        raise fail(f"fc weight {tuple(state['fc.weight'].shape)}, expected {(EMBEDDING_SIZE, channels)}")
