"""Objectives for training patch generators (and for optimising one patch directly).

* identity: :func:`facepriv.attacks.identity.identity_loss` over the surrogate ensemble -
  ``pull * (1 - cos(x, target)) + push * cos(x, source)``; rows without a target (evasion)
  use the push term only (``push * cos(x, source)``);
* :func:`total_variation` - smoothness of the patch (printable, less noisy);
* :func:`non_printability` - distance of every patch pixel to the nearest colour of a small
  printable palette (the min-distance form of Sharif et al.'s NPS used by Thys et al. 2019);
* :class:`LatentScorePrior` (natural mode, optional) - score distillation (Poole et al.
  2022) with a diffusers UNet trained on the autoencoder's latent space - an unconditional
  ``UNet2DModel``, or a text-conditional ``UNet2DConditionModel`` (Stable Diffusion's) run
  with a fixed null conditioning: pushes the patch latent towards what the latent diffusion
  model finds likely.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.identity import IdentityReference, identity_loss
from ..core.errors import ConfigError


def total_variation(patch: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels, per patch (N,); inside ``mask`` if given."""
    dx = (patch[..., :, 1:] - patch[..., :, :-1]).abs()
    dy = (patch[..., 1:, :] - patch[..., :-1, :]).abs()
    if mask is None:
        return dx.mean((1, 2, 3)) + dy.mean((1, 2, 3))
    mask = mask.to(patch)
    mx = torch.minimum(mask[..., :, 1:], mask[..., :, :-1])
    my = torch.minimum(mask[..., 1:, :], mask[..., :-1, :])
    nx = (mx.sum((1, 2, 3)) * patch.shape[1]).clamp_min(1.0)
    ny = (my.sum((1, 2, 3)) * patch.shape[1]).clamp_min(1.0)
    return (dx * mx).sum((1, 2, 3)) / nx + (dy * my).sum((1, 2, 3)) / ny


def default_palette() -> torch.Tensor:
    """A small printable palette: the 3x3x3 RGB grid at 0.1 / 0.5 / 0.9 (no out-of-gamut extremes)."""
    levels = torch.tensor([0.1, 0.5, 0.9])
    return torch.cartesian_prod(levels, levels, levels)


def load_palette(path: str | Path) -> torch.Tensor:
    """Printable colours: a text/CSV file of ``R,G,B`` lines (0-255), or an image of colour swatches."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"palette {p} not found")
    if p.suffix.lower() in (".txt", ".csv"):
        rows = []
        for line in p.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            vals = [v for v in line.replace(",", " ").split() if v]
            if len(vals) != 3:
                raise ConfigError(f"{p}: expected R,G,B per line, got {line!r}")
            rows.append([float(v) for v in vals])
        if not rows:
            raise ConfigError(f"{p}: no colours")
        return torch.tensor(rows, dtype=torch.float32) / 255.0
    from PIL import Image

    try:
        arr = np.asarray(Image.open(p).convert("RGB")).reshape(-1, 3)
    except OSError as exc:
        raise ConfigError(f"cannot read palette image {p}: {exc}") from None
    colours = np.unique(arr, axis=0)
    if len(colours) > 1024:
        raise ConfigError(f"{p} has {len(colours)} colours; a palette image should hold a few swatches")
    return torch.from_numpy(colours.astype(np.float32) / 255.0)


def non_printability(patch: torch.Tensor, palette: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per patch (N,): mean over pixels of the distance to the nearest printable colour."""
    n, c, h, w = patch.shape
    px = patch.permute(0, 2, 3, 1).reshape(n, h * w, c)
    d = torch.cdist(px, palette.to(patch).expand(n, -1, -1)).min(-1).values  # (n, h*w)
    if mask is None:
        return d.mean(1)
    m = mask.to(patch).expand(n, 1, h, w).reshape(n, h * w)
    return (d * m).sum(1) / m.sum(1).clamp_min(1.0)


class LatentScorePrior(nn.Module):
    """Score-distillation prior from a latent diffusion UNet.

    ``score``: a :class:`facepriv.models.diffusion.ScoreModel` (``UNet2DModel``) or
    :class:`~facepriv.models.diffusion.ConditionalScoreModel` (``UNet2DConditionModel`` with a
    fixed null conditioning) whose UNet takes the autoencoder's (normalised) latents. ``forward(z)`` returns a per-sample loss whose gradient
    w.r.t. ``z`` is ``w(t) * (eps_hat(z_t, t) - eps)`` (the UNet itself gets no gradient).
    """

    def __init__(self, score, *, t_range: tuple[float, float] = (0.02, 0.5)):
        super().__init__()
        self.score = score
        for p in self.score.parameters():
            p.requires_grad_(False)
        self.t_range = t_range

    @property
    def in_channels(self) -> int:
        return int(self.score.unet.config.in_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[1] != self.in_channels:
            raise ConfigError(f"the prior UNet takes {self.in_channels} latent channels, the autoencoder gives {z.shape[1]}")
        ac = self.score.alphas_cumprod.to(z.device, torch.float32)
        T = ac.shape[0]
        lo, hi = int(self.t_range[0] * T), max(int(self.t_range[0] * T) + 1, int(self.t_range[1] * T))
        t = torch.randint(lo, hi, (z.shape[0],), device=z.device)
        a = ac[t].view(-1, 1, 1, 1)
        eps = torch.randn_like(z)
        with torch.no_grad():
            zt = a.sqrt() * z.detach() + (1 - a).sqrt() * eps
            eps_hat = self.score(zt, t)
        grad = (1 - a) * (eps_hat - eps)  # w(t) = 1 - alpha_bar (DreamFusion)
        grad = torch.nan_to_num(grad)
        target = (z - grad).detach()
        return 0.5 * F.mse_loss(z, target, reduction="none").flatten(1).sum(1) / z[0].numel()


def load_latent_prior(spec: str, device="cpu", t_range: tuple[float, float] = (0.02, 0.5)) -> LatentScorePrior:
    """A latent UNet prior from a diffusers folder (``unet/`` + ``scheduler/``) or a hub id.

    ``UNet2DModel`` or ``UNet2DConditionModel``; the latter gets the null conditioning of
    :func:`facepriv.models.diffusion.load_latent_score_model` (``null_embedding.safetensors``
    in the folder, else zeros of the UNet's ``cross_attention_dim``).
    """
    from ..models import resolve_pretrained
    from ..models.diffusion import load_latent_score_model

    p = resolve_pretrained(spec, what="prior UNet").local_path()
    return LatentScorePrior(load_latent_score_model(p, device=device), t_range=t_range)


@dataclass
class PatchLossWeights:
    pull: float = 1.0
    push: float = 1.0
    tv: float = 0.05
    nps: float = 0.0
    prior: float = 0.0


def patch_objective(emb: dict[str, torch.Tensor], source_ref: dict[str, torch.Tensor],
                    target_ref: dict[str, torch.Tensor] | None, has_target: torch.Tensor | None,
                    patch: torch.Tensor, weights: PatchLossWeights, *, mask: torch.Tensor | None = None,
                    palette: torch.Tensor | None = None, latent: torch.Tensor | None = None,
                    prior: LatentScorePrior | None = None) -> dict[str, torch.Tensor]:
    """All terms per sample (N,) plus ``total`` (scalar mean). Lower = better protection.

    Rows with a target: ``pull * (1 - cos(x, target)) + push * cos(x, source)``; rows without
    (evasion): ``push * cos(x, source)``.
    """
    n = patch.shape[0]
    dodge = identity_loss(emb, IdentityReference(source=source_ref), pull=0.0, push=weights.push)
    ident = dodge
    if target_ref is not None and weights.pull > 0:
        imp = identity_loss(emb, IdentityReference(source=source_ref, target=target_ref),
                            pull=weights.pull, push=weights.push)
        ht = torch.ones(n, dtype=torch.bool, device=patch.device) if has_target is None else has_target.to(patch.device)
        ident = torch.where(ht, imp, dodge)
    terms = {"identity": ident}
    total = ident
    if weights.tv:
        terms["tv"] = total_variation(patch, mask)
        total = total + weights.tv * terms["tv"]
    if weights.nps:
        terms["nps"] = non_printability(patch, palette if palette is not None else default_palette(), mask)
        total = total + weights.nps * terms["nps"]
    if weights.prior and prior is not None and latent is not None:
        terms["prior"] = prior(latent)
        total = total + weights.prior * terms["prior"]
    terms["total"] = total.mean()
    return terms
