"""Classical de-identification: blur, pixelate, solid mask.

Defaults are sized relative to each face (so a 40 px face and a 400 px face are equally
unrecognisable) and were chosen with ``facepriv audit`` (see docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d

from ..core.faces import Face
from .base import RegionEffect, register_method


@register_method
class Blur(RegionEffect):
    """Gaussian blur with sigma = 0.12 x face size x strength."""

    name = "blur"
    default_feather = 0.15
    context = 0.3

    def sigma(self, face: Face) -> float:
        return max(1.0, 0.12 * face.size * self.strength)

    def effect(self, crop: torch.Tensor, face: Face) -> torch.Tensor:
        sigma = self.sigma(face)
        # Blur a downscaled copy when sigma is large: same result, far cheaper.
        factor = max(1, int(sigma // 4))
        x = crop[None]
        if factor > 1:
            small = F.interpolate(x, scale_factor=1 / factor, mode="area")
            s = sigma / factor
            k = 2 * int(3 * s) + 1
            small = gaussian_blur2d(small, (k, k), (s, s), border_type="replicate")
            return F.interpolate(small, size=crop.shape[-2:], mode="bilinear", align_corners=False)[0]
        k = 2 * int(3 * sigma) + 1
        return gaussian_blur2d(x, (k, k), (sigma, sigma), border_type="replicate")[0]


@register_method
class Pixelate(RegionEffect):
    """Mosaic of square blocks of side = face size / (8 / strength); each block is its mean."""

    name = "pixelate"
    default_feather = 0.0

    def block(self, face: Face) -> int:
        return max(2, int(round(face.size * self.strength / 8.0)))

    def effect(self, crop: torch.Tensor, face: Face) -> torch.Tensor:
        b = self.block(face)
        h, w = crop.shape[-2:]
        ph, pw = (-h) % b, (-w) % b
        x = F.pad(crop[None], (0, pw, 0, ph), mode="replicate")
        means = F.avg_pool2d(x, b, b)
        up = means.repeat_interleave(b, dim=2).repeat_interleave(b, dim=3)
        return up[0, :, :h, :w]


@register_method
class Mask(RegionEffect):
    """A solid colour over the region (default black)."""

    name = "mask"
    default_feather = 0.0

    def __init__(self, *, color: tuple[float, float, float] = (0.0, 0.0, 0.0), **kw):
        super().__init__(**kw)
        self.color = tuple(float(c) for c in color)

    def effect(self, crop: torch.Tensor, face: Face) -> torch.Tensor:
        return torch.tensor(self.color, dtype=crop.dtype, device=crop.device)[:, None, None].expand_as(crop)
