"""A perceptual budget for protective noise: where it may go and how much of it there may be.

Uniform ``±epsilon`` sign noise spends the same change on a smooth cheek as on hair or an
eyebrow, which is what makes it visible. Here the budget has two parts:

* a per-pixel **L-inf cap** shaped by local texture (:func:`texture_weights`): textured pixels may
  change up to the cap, flat ones a fraction of it, so the noise hides where the face has detail;
* a **quality floor** on each face region: the face-region PSNR of the protected photo against
  the original never falls below ``min_psnr`` dB (:func:`project_psnr` scales a face's change
  down when it would).

Pure functions over (3, h, w) tensors in [0, 1], kornia style; :func:`masked_psnr` is the one
face-region PSNR the attack, the command's verdict and the benchmark all use.
"""

from __future__ import annotations

import math

import torch
from kornia.color import rgb_to_grayscale
from kornia.filters import box_blur


def texture_weights(x: torch.Tensor, mask: torch.Tensor, *, strength: float = 0.7, window: int = 5,
                    floor: float = 0.25) -> torch.Tensor:
    """Per-pixel budget weights in [floor, 1] from local texture (1 = the most textured pixels).

    x: (3, h, w) image; mask: (1, h, w) region mask. Local standard deviation of the grey
    image in a ``window`` box, divided by its 90th percentile inside the mask, mixed with a
    uniform budget: ``w = (1 - strength) + strength * clamp(t, floor, 1)``; 0 = uniform.
    """
    if strength <= 0:
        return torch.ones_like(mask)
    g = rgb_to_grayscale(x[None])
    k = (window, window)
    mean = box_blur(g, k, border_type="reflect")
    var = (box_blur(g * g, k, border_type="reflect") - mean * mean).clamp_min(0.0)
    t = var.sqrt()[0]
    inside = t[mask > 0.5]
    ref = torch.quantile(inside, 0.9) if inside.numel() > 16 else t.max()
    t = (t / ref.clamp_min(1e-4)).clamp(floor, 1.0)
    return (1.0 - strength) + strength * t


def allowed_mse(psnr_db: float) -> float:
    """The mean squared change (pixel range [0, 1]) that a PSNR of ``psnr_db`` allows."""
    return 10.0 ** (-psnr_db / 10.0)


def masked_psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB (range [0, 1]) of ``a`` vs ``b`` over the pixels where ``mask`` > 0.5 (all if None)."""
    d = (a.double() - b.double()) ** 2
    if mask is not None:
        sel = (mask > 0.5).expand_as(d)
        if not bool(sel.any()):
            return math.inf
        d = d[sel]
    mse = float(d.mean())
    return math.inf if mse <= 0 else 10.0 * math.log10(1.0 / mse)


def project_psnr(delta: torch.Tensor, masks: torch.Tensor, owner: torch.Tensor, psnr_db: float) -> torch.Tensor:
    """Scale each face's part of ``delta`` so its face-region PSNR is at least ``psnr_db``.

    delta: (3, h, w); masks: (N, 1, h, w) region masks; owner: (h, w) index of the face each
    pixel belongs to (-1: none). A face's region is its mask > 0.5; the change on the pixels it
    owns is scaled by ``sqrt(allowed / mse)`` when its MSE is over the allowed one.
    """
    limit = allowed_mse(psnr_db)
    scale = torch.ones(delta.shape[-2:], device=delta.device, dtype=delta.dtype)
    for k in range(masks.shape[0]):
        sel = (masks[k, 0] > 0.5)
        if not bool(sel.any()):
            continue
        mse = float((delta[:, sel] ** 2).mean())
        if mse > limit:
            scale = torch.where(owner == k, torch.full_like(scale, math.sqrt(limit / mse) * 0.999), scale)
    return delta * scale
