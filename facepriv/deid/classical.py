"""Classical de-identification: blur, pixelate, solid mask, eye bar, additive noise.

Defaults are sized relative to each face (so a 40 px face and a 400 px face are equally
unrecognisable) and were chosen with ``facepriv audit`` (see docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d

from ..core.errors import ConfigError
from ..core.faces import Face
from ..core.regions import rotated_window
from .base import DeidMethod, RegionEffect, register_method


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
    uses_strength = False  # a solid fill: nothing to scale (the region's size is --region)

    def __init__(self, *, color: tuple[float, float, float] = (0.0, 0.0, 0.0), **kw):
        super().__init__(**kw)
        self.color = tuple(float(c) for c in color)

    def effect(self, crop: torch.Tensor, face: Face) -> torch.Tensor:
        return torch.tensor(self.color, dtype=crop.dtype, device=crop.device)[:, None, None].expand_as(crop)


def _rotated_box_mask(cx: float, cy: float, half_u: float, half_v: float, angle: float, image_hw: tuple[int, int],
                      feather: float, device=None):
    """Soft mask of a rotated rectangle (half-sizes ``half_u`` along ``angle``, ``half_v``
    across) as (y0, y1, x0, x1, mask (1, h, w)); None when it is off the image."""
    import math

    window = rotated_window(cx, cy, math.hypot(half_u, half_v) * (1 + feather) + 2, angle, image_hw, device=device)
    if window is None:
        return None
    (y0, y1, x0, x1), u, v = window
    u, v = u.abs(), v.abs()
    if feather > 0:
        # the ramp has the same width (a fraction of the bar height) on all four sides
        ramp = feather * half_v
        du = ((half_u + ramp - u) / (2 * ramp)).clamp(0, 1)
        dv = ((half_v + ramp - v) / (2 * ramp)).clamp(0, 1)
        m = torch.minimum(du, dv)
        m = m * m * (3 - 2 * m)
    else:
        m = ((u <= half_u) & (v <= half_v)).float()
    return y0, y1, x0, x1, m[None]


@register_method(aliases=("eye-bar", "eye_bar"))
class EyeBar(DeidMethod):
    """A solid bar over both eyes, along the eye line (the censor bar of old magazines).

    The bar is ``length`` x eye distance long and ``height`` x eye distance x ``strength``
    tall, centred between the eyes and shifted up by ``raise_`` x eye distance. A thin bar
    over the eyes alone does *not* defeat face recognition (a 0.9 x eye-distance bar leaves
    dlib-resnet re-identifying every face of our benchmark); the default is a band from the
    brows down to the nose tip, measured to defeat dlib-resnet and FaceNet (see
    docs/benchmarks.md). ``region`` does not apply (the bar has its own shape): ``regions`` is
    empty, the manifest records ``"region": null``, and ``facepriv deid`` refuses ``--region``
    for an eye bar alone and warns when it is in an ensemble.
    """

    name = "eyebar"
    default_feather = 0.0
    regions = ()

    def __init__(self, *, color: tuple[float, float, float] = (0.0, 0.0, 0.0), length: float = 2.6,
                 height: float = 2.2, raise_: float = 0.05, **kw):
        super().__init__(**kw)
        if length <= 0 or height <= 0:
            raise ConfigError("eyebar: length and height must be > 0")
        self.color = tuple(float(c) for c in color)
        self.length, self.height, self.raise_ = float(length), float(height), float(raise_)

    def bar(self, face: Face) -> tuple[float, float, float, float, float]:
        """Centre x, y, half-length, half-height and angle of the bar for ``face``."""
        import math

        import numpy as np

        lm = np.asarray(face.landmarks, dtype=np.float64)
        d = lm[1] - lm[0]
        dist = float(np.hypot(*d))
        if not np.isfinite(dist) or dist < 1.0:  # degenerate landmarks: use the box
            dist = 0.4 * face.width
            angle = 0.0
            c = np.array([(face.box[0] + face.box[2]) / 2, face.box[1] + 0.38 * face.height])
        else:
            angle = math.atan2(d[1], d[0])
            c = (lm[0] + lm[1]) / 2
        up = np.array([math.sin(angle), -math.cos(angle)])
        c = c + up * self.raise_ * dist
        return float(c[0]), float(c[1]), 0.5 * self.length * dist, 0.5 * self.height * dist * self.strength, angle

    def apply(self, image: torch.Tensor, faces: list[Face]) -> torch.Tensor:
        out = image.clone()
        color = torch.tensor(self.color, dtype=image.dtype, device=image.device)[:, None, None]
        for face in faces:
            cx, cy, hu, hv, angle = self.bar(face)
            got = _rotated_box_mask(cx, cy, hu, hv, angle, image.shape[-2:], self.feather, device=image.device)
            if got is None:
                continue
            y0, y1, x0, x1, m = got
            out[:, y0:y1, x0:x1] = out[:, y0:y1, x0:x1] * (1 - m) + color * m
        return out

    def describe(self) -> dict:
        return {**super().describe(), "length": self.length, "height": self.height, "color": self.color}


@register_method
class Noise(RegionEffect):
    """Additive Gaussian noise of standard deviation ``sigma`` x ``strength`` (image in [0, 1]).

    ``grain`` sets the noise's spatial scale as a fraction of the face size (0 = per pixel):
    coarse noise disturbs recognition far more than pixel noise of the same amplitude, which
    face models average away. Reproducible: each face's noise is drawn from ``seed`` and the
    face's position.
    """

    name = "noise"
    default_feather = 0.1

    def __init__(self, *, sigma: float = 0.35, grain: float = 0.04, seed: int = 0, **kw):
        super().__init__(**kw)
        if sigma <= 0 or grain < 0:
            raise ConfigError("noise: sigma must be > 0 and grain >= 0")
        self.sigma, self.grain, self.seed = float(sigma), float(grain), int(seed)

    def effect(self, crop: torch.Tensor, face: Face) -> torch.Tensor:
        h, w = crop.shape[-2:]
        cell = max(1, int(round(self.grain * face.size)))
        gh, gw = -(-h // cell), -(-w // cell)
        gen = torch.Generator(device="cpu").manual_seed(
            (self.seed * 1_000_003 + int(face.box[0]) * 7919 + int(face.box[1])) % (2**63))
        noise = torch.randn((1, crop.shape[0], gh, gw), generator=gen).to(crop.device, crop.dtype)
        if cell > 1:
            noise = noise.repeat_interleave(cell, 2).repeat_interleave(cell, 3)[..., :h, :w]
        return (crop + noise[0] * self.sigma * self.strength).clamp(0, 1)

    def describe(self) -> dict:
        return {**super().describe(), "sigma": self.sigma, "grain": self.grain, "seed": self.seed}
