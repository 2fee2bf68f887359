"""Identity objectives against an ensemble of surrogate face-recognition models.

Every optimisation in facepriv (PGD-style noise, MAP fine-tuning, patch generators) measures
identity the same way: the images it changes are aligned to each surrogate's own template
by a differentiable warp (:func:`facepriv.core.align.align_faces`), embedded, and compared by
cosine similarity with reference embeddings (the source face, or the target identity).

* **dodging** (no target): minimise ``cos(f(x), f(source))``
* **impersonation** (target): minimise ``1 - cos(f(x), f(target))``
* both (``push`` and ``pull`` weights): the patch generator's dual objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.align import align_faces
from ..core.errors import ConfigError


@dataclass
class IdentityReference:
    """Reference embeddings per surrogate: ``source`` (dodging / push) and ``target`` (pull)."""

    source: dict[str, torch.Tensor] | None = None
    target: dict[str, torch.Tensor] | None = None


class SurrogateEnsemble(nn.Module):
    """Differentiable FR models loaded from the registry, used as optimisation surrogates."""

    def __init__(self, names: Sequence[str], device: str | torch.device = "cpu", models: Sequence[nn.Module] | None = None):
        super().__init__()
        if models is None:
            from ..models import create_model, get_spec

            models = []
            for n in names:
                spec = get_spec(n)
                if spec.task != "recognition":
                    raise ConfigError(f"surrogate {n!r} is a {spec.task} model, not a face-recognition model")
                if not spec.differentiable:
                    raise ConfigError(
                        f"surrogate {n!r} runs in {spec.runtime} and has no gradients; choose a torch model "
                        "(e.g. dlib-resnet, facenet-casia, sface)"
                    )
                models.append(create_model(n, device=device))
        if not models:
            raise ConfigError("at least one surrogate model is needed")
        self.names = [m.spec.name for m in models]
        self.members = nn.ModuleList(models)

    def embed(self, images: torch.Tensor, landmarks: torch.Tensor,
              image_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Embeddings per surrogate of faces given by ``landmarks`` in ``images``.

        images: (3, H, W) or (B, 3, H, W) in [0, 1]; landmarks (N, 5, 2) in image pixels.
        """
        out = {}
        for name, m in zip(self.names, self.members):
            al = align_faces(images, landmarks, m.spec.template, size=tuple(m.spec.input_size),
                             image_index=image_index)
            out[name] = m(al.crops)
        return out

    def embed_aligned(self, crops: torch.Tensor, template: str) -> dict[str, torch.Tensor]:
        """Embeddings of faces already aligned to ``template`` (re-aligned per surrogate)."""
        from ..core.align import get_template

        tpl = get_template(template)
        pts = tpl.tensor(crops.device).expand(crops.shape[0], 5, 2)
        idx = torch.arange(crops.shape[0], device=crops.device)
        return self.embed(crops, pts, image_index=idx)

    @torch.no_grad()
    def reference(self, images: torch.Tensor, landmarks: torch.Tensor,
                  image_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.embed(images, landmarks, image_index).items()}


def identity_loss(emb: dict[str, torch.Tensor], ref: IdentityReference, *, pull: float = 1.0,
                  push: float = 1.0, weights: dict[str, float] | None = None) -> torch.Tensor:
    """Per-face loss averaged over the ensemble: ``pull*(1 - cos(x, target)) + push*cos(x, source)``.

    Returns a (N,) tensor (lower = better protection). A missing reference drops its term.
    """
    if ref.target is None and ref.source is None:
        raise ConfigError("identity_loss needs a source (dodging) or a target (impersonation) reference")
    total = 0.0
    wsum = 0.0
    for name, e in emb.items():
        w = 1.0 if weights is None else weights.get(name, 1.0)
        term = torch.zeros(e.shape[0], device=e.device)
        if ref.target is not None and pull:
            term = term + pull * (1 - F.cosine_similarity(e, ref.target[name].expand_as(e), dim=-1))
        if ref.source is not None and push:
            term = term + push * F.cosine_similarity(e, ref.source[name].expand_as(e), dim=-1)
        total = total + w * term
        wsum += w
    return total / wsum


def cosine_report(emb: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Cosine similarity per surrogate (for logs and progress displays)."""
    return {k: F.cosine_similarity(v, ref[k].expand_as(v), dim=-1).detach().cpu().tolist() for k, v in emb.items()}
