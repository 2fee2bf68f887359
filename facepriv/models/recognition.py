"""Face-recognition model wrappers with one calling convention.

Every recognition model in the registry is returned as a :class:`FaceRecognizer`: an
``nn.Module`` whose ``forward`` takes **aligned RGB faces in [0, 1]**, shape ``(B, 3, H, W)``,
aligned to ``spec.template`` at ``spec.input_size``, and returns embeddings ``(B, D)``.
The model-specific normalisation (``(x*255-127.5)/128``, mean/std, BGR order, ...) happens
inside, so attacks and audits never need to know it. Inputs of another size are resized
(bilinear, antialiased) first.

Black-box runtimes (onnxruntime) are wrapped by :class:`OnnxFaceRecognizer`, with the same
``forward`` but no gradients (``differentiable = False``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .registry import ModelSpec


def similarity(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Row-wise similarity, higher = more alike. Euclidean models use the negative L2 distance."""
    if metric == "cosine":
        return F.cosine_similarity(a, b, dim=-1)
    if metric == "euclidean":
        return -torch.linalg.vector_norm(a - b, dim=-1)
    raise ValueError(f"unknown metric {metric!r}")


def similarity_matrix(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """All-pairs similarity ``(len(a), len(b))`` in the same convention as :func:`similarity`."""
    if metric == "cosine":
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    if metric == "euclidean":
        return -torch.cdist(a, b)
    raise ValueError(f"unknown metric {metric!r}")


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


class FaceRecognizer(nn.Module):
    """A differentiable FR model: aligned RGB [0, 1] in, embedding out."""

    differentiable = True

    def __init__(self, spec: ModelSpec, backbone: nn.Module,
                 preprocess: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self._preprocess = preprocess

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.spec.input_size)  # type: ignore[arg-type]

    @property
    def template(self) -> str:
        return self.spec.template  # type: ignore[return-value]

    @property
    def metric(self) -> str:
        return self.spec.metric  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_to(x, self.input_size)
        return self.backbone(self._preprocess(x))

    embed = forward

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return similarity(a, b, self.metric)


class OnnxFaceRecognizer(nn.Module):
    """Black-box recognition through onnxruntime (no gradients), same calling convention."""

    differentiable = False

    def __init__(self, spec: ModelSpec, onnx_path: str | Path | bytes,
                 preprocess: Callable[[torch.Tensor], torch.Tensor], providers: list[str] | None = None):
        super().__init__()
        import onnxruntime as ort

        self.spec = spec
        self._preprocess = preprocess
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        model = onnx_path if isinstance(onnx_path, bytes) else str(onnx_path)
        self.session = ort.InferenceSession(model, opts, providers=providers or ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self._dummy = nn.Parameter(torch.zeros(()), requires_grad=False)  # follows .to(device)

    name = FaceRecognizer.name
    input_size = FaceRecognizer.input_size
    template = FaceRecognizer.template
    metric = FaceRecognizer.metric
    score = FaceRecognizer.score

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_to(x, self.input_size)
        arr = self._preprocess(x).detach().float().cpu().numpy()
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(arr)})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).reshape(len(arr), -1).to(x.device)

    embed = forward


def embed_faces(model: nn.Module, image: torch.Tensor, landmarks: torch.Tensor, *,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
    """Align faces to ``model``'s template and embed them (differentiable for torch models).

    image: (3, H, W) or (B, 3, H, W) in [0, 1]; landmarks: (N, 5, 2) in image pixels.
    """
    from ..core.align import align_faces

    aligned = align_faces(image, landmarks, model.spec.template, size=tuple(model.spec.input_size),
                          image_index=image_index)
    return model(aligned.crops)
