"""The face-recognition models of the face-privacy evaluation protocol, plus ArcFace ONNX.

TIP-IM, AMT-GAN, DiffAM, CLIP2Protect and their successors report protection success rates
against four FR models whose weights exist only as files in those projects' asset archives
(``assets/models/{ir152,irse50,mobile_face,facenet}.pth``). There is no public hub or PyPI
download, so these specs use a :class:`~facepriv.models.sources.UserFile` source: pass the file
with ``facepriv models import NAME PATH`` or ``create_model(NAME, weights=PATH)``.

The modules below reproduce the research code's module trees, so the checkpoints load with
their original state-dict keys and shapes:

* ``ir152`` - face.evoLVe ``IR_152((112, 112))``: ``input_layer.{0,1,2}``,
  ``body.{0..49}.{shortcut_layer,res_layer}.*``, ``output_layer.{0,3,4}`` (BN2d, Dropout,
  Flatten, Linear 25088->512, BN1d). Returns the raw (not L2-normalised) embedding, as upstream.
* ``irse50`` - TreB1eN InsightFace_Pytorch ``Backbone(50, 0.6, 'ir_se')``: the same layout with
  24 units whose ``res_layer.5`` is a squeeze-excitation block (``fc1``, ``fc2``); returns the
  L2-normalised embedding, as upstream.
* ``mobileface`` - TreB1eN ``MobileFaceNet(512)``: ``conv1``, ``conv2_dw``, ``conv_23``,
  ``conv_3.model.{0..3}``, ``conv_34``, ``conv_4.model.{0..5}``, ``conv_45``,
  ``conv_5.model.{0,1}``, ``conv_6_sep``, ``conv_6_dw``, ``linear``, ``bn``; L2-normalised.

The protocol feeds these models RGB faces scaled to [-1, 1] (``(x - 0.5) / 0.5``), resized
bilinearly to 112x112, and compares embeddings by cosine similarity; the thresholds are the
protocol's values at FAR 1e-1 / 1e-2 / 1e-3.

``arcface-r100`` wraps an insightface-layout ArcFace ONNX export (``glintr100.onnx``,
``ms1mv3_arcface_r100.onnx``, ``w600k_r50.onnx``, ...) run by onnxruntime.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import FaceprivError
from .recognition import FaceRecognizer, OnnxFaceRecognizer, resize_to
from .registry import LoadContext, ModelSpec, register
from .sources import UserFile

__all__ = [
    "IRBackbone",
    "MobileFaceNet",
    "build_ir152",
    "build_irse50",
    "build_mobileface",
    "insightface_preprocess",
    "load_research_state_dict",
    "protocol_preprocess",
]


# --------------------------------------------------------------------------- building blocks
class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Divide rows by their L2 norm (exactly what the research code does, no epsilon)."""
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


class _SqueezeExcite(nn.Module):
    """Channel gating: global average pool -> 1x1 conv down -> ReLU -> 1x1 conv up -> sigmoid."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


class _IRUnit(nn.Module):
    """Improved-residual unit: BN-Conv3x3-PReLU-Conv3x3(stride)-BN[-SE] plus a shortcut.

    The shortcut is a strided identity (1x1 max-pool) when the width is kept, else a strided
    1x1 conv + BN.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, se: bool):
        super().__init__()
        if in_ch == out_ch:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        layers: list[nn.Module] = [
            nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False),
            nn.PReLU(out_ch),
            nn.Conv2d(out_ch, out_ch, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if se:
            layers.append(_SqueezeExcite(out_ch, 16))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


# Units per stage (widths 64, 128, 256, 512; the first unit of each stage has stride 2).
IR_STAGES: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    152: (3, 8, 36, 3),
}


class IRBackbone(nn.Module):
    """IR / IR-SE ResNet for 112x112 faces (face.evoLVe and InsightFace_Pytorch layout).

    ``normalize`` L2-normalises the 512-D output (InsightFace_Pytorch's ``Backbone`` does,
    face.evoLVe's ``IR_152`` does not).
    """

    def __init__(self, num_layers: int = 50, *, se: bool = False, drop_ratio: float = 0.4,
                 normalize: bool = False, embedding_size: int = 512):
        super().__init__()
        if num_layers not in IR_STAGES:
            raise ValueError(f"num_layers must be one of {sorted(IR_STAGES)}")
        self.normalize = normalize
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        # registered in upstream order (input, output, body) so state_dict() lists keys alike
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(drop_ratio),
            _Flatten(),
            nn.Linear(512 * 7 * 7, embedding_size),
            nn.BatchNorm1d(embedding_size),
        )
        units: list[nn.Module] = []
        in_ch = 64
        for width, count in zip((64, 128, 256, 512), IR_STAGES[num_layers]):
            for i in range(count):
                units.append(_IRUnit(in_ch, width, 2 if i == 0 else 1, se))
                in_ch = width
        self.body = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.output_layer(self.body(self.input_layer(x)))
        return _l2_normalize(x) if self.normalize else x


class _ConvBN(nn.Module):
    """Conv (no bias) + BN, optionally followed by a per-channel PReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1, prelu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        if prelu:
            self.prelu = nn.PReLU(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.prelu(x) if hasattr(self, "prelu") else x


class _DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear projection."""

    def __init__(self, in_ch: int, out_ch: int, hidden: int, stride: int, residual: bool):
        super().__init__()
        self.conv = _ConvBN(in_ch, hidden)
        self.conv_dw = _ConvBN(hidden, hidden, 3, stride, 1, groups=hidden)
        self.project = _ConvBN(hidden, out_ch, prelu=False)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.conv_dw(self.conv(x)))
        return x + y if self.residual else y


class _Residual(nn.Module):
    def __init__(self, channels: int, num_block: int, hidden: int):
        super().__init__()
        self.model = nn.Sequential(
            *[_DepthWise(channels, channels, hidden, 1, residual=True) for _ in range(num_block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet for 112x112 faces in the InsightFace_Pytorch layout (L2-normalised output)."""

    def __init__(self, embedding_size: int = 512):
        super().__init__()
        self.conv1 = _ConvBN(3, 64, 3, 2, 1)
        self.conv2_dw = _ConvBN(64, 64, 3, 1, 1, groups=64)
        self.conv_23 = _DepthWise(64, 64, 128, 2, residual=False)
        self.conv_3 = _Residual(64, 4, 128)
        self.conv_34 = _DepthWise(64, 128, 256, 2, residual=False)
        self.conv_4 = _Residual(128, 6, 256)
        self.conv_45 = _DepthWise(128, 128, 512, 2, residual=False)
        self.conv_5 = _Residual(128, 2, 256)
        self.conv_6_sep = _ConvBN(128, 512)
        self.conv_6_dw = _ConvBN(512, 512, 7, 1, 0, groups=512, prelu=False)
        self.conv_6_flatten = _Flatten()
        self.linear = nn.Linear(512, embedding_size, bias=False)
        self.bn = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in (self.conv1, self.conv2_dw, self.conv_23, self.conv_3, self.conv_34,
                      self.conv_4, self.conv_45, self.conv_5, self.conv_6_sep, self.conv_6_dw,
                      self.conv_6_flatten, self.linear, self.bn):
            x = stage(x)
        return _l2_normalize(x)


def build_ir152() -> IRBackbone:
    """face.evoLVe ``IR_152((112, 112))`` (Dropout 0.4, raw embedding)."""
    return IRBackbone(152, se=False, drop_ratio=0.4, normalize=False)


def build_irse50() -> IRBackbone:
    """InsightFace_Pytorch ``Backbone(50, 0.6, 'ir_se')`` (L2-normalised embedding)."""
    return IRBackbone(50, se=True, drop_ratio=0.6, normalize=True)


def build_mobileface() -> MobileFaceNet:
    """InsightFace_Pytorch ``MobileFaceNet(512)``."""
    return MobileFaceNet(512)


# --------------------------------------------------------------------------- checkpoint loading
def _first(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _read_checkpoint(path: Path, name: str) -> dict[str, torch.Tensor]:
    """torch.load with ``weights_only=True``; unwrap ``{"state_dict": ...}`` and ``module.``."""
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:
            raise FaceprivError(f"{path} is not a readable PyTorch checkpoint for {name}") from None
        raise FaceprivError(
            f"{path} holds pickled Python objects ({found.group(1)}), not a plain state dict of "
            f"{name} weights, so it is not loaded (unpickling it could run code). If it comes from "
            "trusted code, re-save it with torch.save(model.state_dict(), 'file.pth')."
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise FaceprivError(f"{path} is not a readable PyTorch checkpoint for {name}: {exc}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FaceprivError(f"{path} does not hold a state dict of tensors (expected {name} weights)")
    keys = list(obj)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_research_state_dict(model: nn.Module, path: str | Path, name: str) -> nn.Module:
    """Load a research checkpoint into ``model`` strictly, with a clear error on a mismatch.

    Old checkpoints without BatchNorm ``num_batches_tracked`` counters are accepted (those
    buffers do not affect inference).
    """
    state = _read_checkpoint(Path(path), name)
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"{path} does not hold {name} weights:"]
        if missing:
            parts.append(f"{len(missing)} missing keys ({_first(missing)});")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)});")
        parts.append(f"expected the {name} layout ({type(model).__name__}, {len(expected)} entries).")
        raise FaceprivError(" ".join(parts))
    wrong = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
             for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise FaceprivError(f"{path} does not hold {name} weights: shape mismatch for {_first(wrong, 3)}")
    full = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    for k in optional - set(state):
        full[k] = expected[k]
    model.load_state_dict(full, strict=True)
    return model


def protocol_preprocess(x: torch.Tensor) -> torch.Tensor:
    """RGB [0, 1] -> [-1, 1], as the TIP-IM / AMT-GAN / DiffAM / CLIP2Protect code feeds it."""
    return (x - 0.5) / 0.5


def _torch_loader(build: Callable[[], nn.Module]) -> Callable[[LoadContext], FaceRecognizer]:
    def load(ctx: LoadContext) -> FaceRecognizer:
        if ctx.path is None:  # pragma: no cover - resolve_weights raises first
            raise FaceprivError(f"{ctx.spec.name}: no weights file")
        net = load_research_state_dict(build(), ctx.path, ctx.spec.name)
        return FaceRecognizer(ctx.spec, net.eval(), protocol_preprocess)

    return load


# --------------------------------------------------------------------------- ArcFace ONNX
def _insightface_input_scaling(path: Path) -> tuple[float, float]:
    """(mean, std) on the 0..255 scale, decided the way insightface's ``ArcFaceONNX`` does it.

    Exports that start with their own ``Sub`` and ``Mul`` nodes (among the first 8) normalise
    inside the graph and take raw 0..255 pixels; all others take ``(p - 127.5) / 127.5``.
    """
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001
        raise FaceprivError(f"{path} is not a readable ONNX model: {exc}") from None
    names = [n.name for n in graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


def insightface_preprocess(mean: float = 127.5, std: float = 127.5, *, nhwc: bool = False,
                           size: tuple[int, int] | None = None
                           ) -> Callable[[torch.Tensor], torch.Tensor]:
    """RGB [0, 1] NCHW -> ``(x*255 - mean) / std`` (RGB kept), optionally resized / NHWC.

    insightface feeds ``cv2.dnn.blobFromImages(bgr, 1/std, size, mean, swapRB=True)``, i.e. RGB
    planes; facepriv's faces already are RGB, so no channel swap is needed.
    """
    def pre(x: torch.Tensor) -> torch.Tensor:
        if size is not None:
            x = resize_to(x, size)
        y = (x * 255.0 - mean) / std
        return y.permute(0, 2, 3, 1) if nhwc else y

    return pre


def _onnx_providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _load_arcface_onnx(ctx: LoadContext) -> OnnxFaceRecognizer:
    """ArcFace ONNX through onnxruntime; input layout and size are read from the graph.

    Assumptions (also in the spec's description): the network was trained on RGB faces aligned
    to the ArcFace 112x112 template, as every insightface model-zoo recognition export is; a
    BGR-trained export would need its own spec. The input is NCHW unless its last dimension is 3
    (then NHWC is fed). A static input size other than 112x112 is honoured by resizing the
    aligned face, as insightface's ``blobFromImages`` does.
    """
    if ctx.path is None:  # pragma: no cover - resolve_weights raises first
        raise FaceprivError(f"{ctx.spec.name}: no ONNX file")
    path = Path(ctx.path)
    if path.is_dir():
        found = sorted(path.glob("*.onnx"))
        if len(found) != 1:
            raise FaceprivError(f"{path}: expected exactly one .onnx file, found {len(found)}")
        path = found[0]
    mean, std = _insightface_input_scaling(path)
    try:
        model = OnnxFaceRecognizer(ctx.spec, path, insightface_preprocess(mean, std),
                                   providers=_onnx_providers(ctx.device))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise FaceprivError(f"onnxruntime could not load {path}: {exc}") from None
    shape = list(model.session.get_inputs()[0].shape)
    if len(shape) != 4:
        raise FaceprivError(f"{path}: expected a 4-D image input, got shape {shape}")
    nhwc = shape[3] == 3 and shape[1] != 3
    h, w = (shape[1], shape[2]) if nhwc else (shape[2], shape[3])
    size = (h, w) if isinstance(h, int) and isinstance(w, int) and (h, w) != ctx.spec.input_size \
        else None
    model._preprocess = insightface_preprocess(mean, std, nhwc=nhwc, size=size)
    model.input_mean, model.input_std, model.nhwc = mean, std, nhwc
    return model


# --------------------------------------------------------------------------- registry
_PROTOCOL_SOURCE = "TIP-IM/AMT-GAN/DiffAM protocol"
_PROTOCOL_LICENSE = "research checkpoint shipped with AMT-GAN/DiffAM assets; no licence stated (research use)"
_NORM = "RGB, (x - 0.5) / 0.5 -> [-1, 1], bilinear resize to 112x112"


def _hint(file: str, arch: str) -> str:
    return (f"{file} ({arch}), found as assets/models/{file} in the AMT-GAN "
            "(github.com/CGCL-codes/AMT-GAN) and DiffAM (github.com/HansSunY/DiffAM) assets "
            "archives linked from their READMEs; Adv-Makeup (Pretrained_FR_Models/) and "
            "CLIP2Protect (models/) ship the same file")


def _register_protocol(name: str, architecture: str, build: Callable[[], nn.Module], *, hint: str,
                       thresholds: tuple[float, float, float], size_bytes: int, reference: str,
                       aliases: tuple[str, ...]) -> None:
    """One recogniser of the evaluation protocol: a research state dict the user supplies, RGB in
    [-1, 1] at 112x112, 512-D cosine embeddings; ``thresholds`` at FAR 1e-1, 1e-2, 1e-3."""
    register(ModelSpec(
        name=name,
        task="recognition",
        architecture=architecture,
        description=f"{architecture.split(' (')[0]} face recogniser of the TIP-IM / AMT-GAN / DiffAM / CLIP2Protect "
                    "evaluation protocol.",
        license=_PROTOCOL_LICENSE,
        sources=(UserFile(hint=hint),),
        loader=_torch_loader(build),
        input_size=(112, 112),
        template="arcface-112",
        normalization=_NORM,
        embedding_size=512,
        metric="cosine",
        thresholds=dict(zip(("1e-1", "1e-2", "1e-3"), thresholds, strict=True)),
        threshold_source=_PROTOCOL_SOURCE,
        size_bytes=size_bytes,
        reference=reference,
        aliases=aliases,
    ))


_register_protocol(
    "ir152", "IR-152 (face.evoLVe IR_152, 112x112, 512-D, not L2-normalised)", build_ir152,
    hint=_hint("ir152.pth", "face.evoLVe IR_152 state dict"), thresholds=(0.094632, 0.166788, 0.227922),
    size_bytes=283_155_024,  # tensor payload of the state dict; the .pth adds ~0.1 MB
    reference="https://github.com/ZhaoJ9014/face.evoLVe ; TIP-IM (Yang et al., ICCV 2021)", aliases=("ir-152",))
_register_protocol(
    "irse50", "IR-SE-50 (InsightFace_Pytorch Backbone(50, 0.6, 'ir_se'), 112x112, 512-D)", build_irse50,
    hint=_hint("irse50.pth", "InsightFace_Pytorch Backbone(50, 0.6, 'ir_se') state dict"),
    thresholds=(0.144840, 0.241045, 0.312703), size_bytes=175_296_688, aliases=("ir-se-50", "ir_se50"),
    reference="https://github.com/TreB1eN/InsightFace_Pytorch ; TIP-IM (Yang et al., ICCV 2021)")
_register_protocol(
    "mobileface", "MobileFaceNet (InsightFace_Pytorch MobileFaceNet(512), 112x112, 512-D)", build_mobileface,
    hint=_hint("mobile_face.pth", "InsightFace_Pytorch MobileFaceNet(512) state dict"),
    thresholds=(0.183635, 0.301611, 0.380878), size_bytes=4_883_856, aliases=("mobile_face", "mobilefacenet"),
    reference="https://github.com/TreB1eN/InsightFace_Pytorch ; MobileFaceNets (Chen et al., 2018)")

register(ModelSpec(
    name="arcface-r100",
    task="recognition",
    architecture="ArcFace ResNet-100 (insightface ONNX export), 112x112, 512-D",
    description=("insightface-layout ArcFace ONNX (e.g. glintr100.onnx, ms1mv3_arcface_r100.onnx; other "
                 "insightface recognition exports such as w600k_r50.onnx work too) run by onnxruntime. "
                 "Assumes RGB faces aligned to the ArcFace template; input layout/size read from the graph."),
    license="as distributed by insightface (model zoo: non-commercial research use)",
    sources=(UserFile(hint="an insightface ArcFace recognition .onnx, e.g. glintr100.onnx from the "
                           "antelopev2 pack or ms1mv3_arcface_r100.onnx from the insightface model zoo"),),
    loader=_load_arcface_onnx,
    input_size=(112, 112),
    template="arcface-112",
    normalization="RGB, (x*255 - 127.5) / 127.5 (raw x*255 if the graph starts with its own Sub+Mul, as insightface decides)",
    embedding_size=512,
    metric="cosine",
    differentiable=False,
    runtime="onnxruntime",
    reference="https://github.com/deepinsight/insightface ; ArcFace (Deng et al., CVPR 2019)",
    aliases=("arcface-onnx",),
))
