"""Expectation over transformation (EOT) and model augmentation, for noise that transfers.

Protective noise must survive what happens to a photo after it leaves the user: another
detector finds slightly different landmarks, the platform rescales and re-encodes it as JPEG,
a scraper's recogniser is not the one the noise was made against. Each optimisation step
therefore sees several random *copies* of the protected crop (:func:`random_views`), each
through a random draw of

* **alignment jitter**: the five landmarks moved independently (another detector) and the
  face scaled, rotated and shifted (another alignment) - applied to the landmarks, so the
  image is warped once, exactly, by the alignment itself;
* **resize**: the crop resampled to a random smaller size (0.5x - 1x), as uploads are;
* **blur**: a Gaussian blur of random width (LowKey, Cherepanova et al. 2021);
* **JPEG**: kornia's differentiable JPEG codec at a random quality;

and the surrogates themselves are perturbed (:func:`feature_dropout`: random dropout on the
outputs of their convolutions, DFANet, Zhong & Deng 2020), so the noise cannot rely on one
model's exact features.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.enhance import jpeg_codec_differentiable
from kornia.filters import gaussian_blur2d
from torch import nn

from ..core.config import ConfigBase


@dataclass
class EOTConfig(ConfigBase):
    """Which transformations each view draws (probabilities per view; 0 = never)."""

    config_name = "EOT setting"

    jitter: float = 0.03  # std of each landmark's move, as a fraction of the face size
    scale: float = 0.08  # largest random rescale of the alignment (fraction)
    shift: float = 0.03  # largest random shift (fraction of the face size)
    rotate: float = 5.0  # largest random roll (degrees)
    resize_prob: float = 0.5
    resize_min: float = 0.5  # smallest resize factor
    blur_prob: float = 0.3
    blur_sigma: float = 1.2  # largest blur sigma, in pixels of a 100 px face
    jpeg_prob: float = 0.5
    jpeg_quality: tuple[int, int] = (60, 95)

    @property
    def enabled(self) -> bool:
        return any((self.jitter, self.scale, self.shift, self.rotate, self.resize_prob, self.blur_prob,
                    self.jpeg_prob))


def _u(lo: float, hi: float, g: torch.Generator | None, n: int = 1) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def jitter_landmarks(lm: torch.Tensor, sizes: torch.Tensor, cfg: EOTConfig,
                     g: torch.Generator | None) -> torch.Tensor:
    """Landmarks (N, 5, 2) moved as another detector and another alignment would move them."""
    n = lm.shape[0]
    dev, dt = lm.device, lm.dtype
    out = lm
    if cfg.jitter > 0:
        noise = torch.randn(n, 5, 2, generator=g).to(dev, dt) * cfg.jitter
        out = out + noise * sizes.to(dt)[:, None, None]
    s = (1.0 + _u(-cfg.scale, cfg.scale, g, n)).to(dev, dt)
    a = (_u(-cfg.rotate, cfg.rotate, g, n) * (math.pi / 180.0)).to(dev, dt)
    t = _u(-cfg.shift, cfg.shift, g, 2 * n).reshape(n, 2).to(dev, dt)
    c = out.mean(1, keepdim=True)
    cos, sin = torch.cos(a), torch.sin(a)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    out = ((out - c) @ rot.transpose(1, 2)) * s[:, None, None] + c
    return out + (t * sizes.to(dt)[:, None])[:, None, :]


def degrade(x: torch.Tensor, lm: torch.Tensor, sizes: torch.Tensor, cfg: EOTConfig,
            g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One random resize / blur / JPEG of a (3, h, w) crop; returns it, its landmarks and the draw."""
    draw: dict = {}
    h, w = x.shape[-2:]
    if cfg.resize_prob > 0 and float(torch.rand(1, generator=g)) < cfg.resize_prob:
        r = float(_u(cfg.resize_min, 1.0, g))
        nh, nw = max(16, round(h * r)), max(16, round(w * r))
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        f = torch.tensor([nw / w, nh / h], device=lm.device, dtype=lm.dtype)
        lm = (lm + 0.5) * f - 0.5
        sizes = sizes * r
        draw["resize"] = round(r, 3)
    if cfg.blur_prob > 0 and float(torch.rand(1, generator=g)) < cfg.blur_prob:
        sigma = float(_u(0.3, 1.0, g)) * cfg.blur_sigma * float(sizes.median()) / 100.0
        if sigma >= 0.3:
            k = 2 * math.ceil(3 * sigma) + 1
            x = gaussian_blur2d(x[None], (k, k), (sigma, sigma), border_type="reflect")[0]
            draw["blur"] = round(sigma, 2)
    if cfg.jpeg_prob > 0 and float(torch.rand(1, generator=g)) < cfg.jpeg_prob:
        q = float(torch.randint(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1, (1,), generator=g))
        x = jpeg_codec_differentiable(x[None].clamp(0, 1), torch.tensor([q], device=x.device))[0]
        draw["jpeg"] = int(q)
    return x, lm, draw


def random_views(x: torch.Tensor, lm: torch.Tensor, sizes: torch.Tensor, copies: int, cfg: EOTConfig | None,
                 g: torch.Generator | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``copies`` transformed views ``(image, landmarks)`` of the crop ``x`` (the first one
    plain when ``cfg`` is None, i.e. EOT off: then every view is the crop itself)."""
    if cfg is None or not cfg.enabled:
        return [(x, lm)] * max(1, copies)
    views = []
    for _ in range(max(1, copies)):
        xv, lv, _draw = degrade(x, lm, sizes, cfg, g)
        views.append((xv, jitter_landmarks(lv, sizes * (xv.shape[-1] / x.shape[-1]), cfg, g)))
    return views


@contextlib.contextmanager
def feature_dropout(models: list[nn.Module], p: float, generator: torch.Generator | None = None):
    """Random dropout on every convolution output of ``models`` while the block runs (DFANet).

    The masks are drawn anew at every forward pass, so each view sees a differently perturbed
    surrogate; outside the block the models are unchanged. ``p`` = 0 does nothing.
    """
    if p <= 0:
        yield
        return

    def hook(_mod, _inp, out):
        keep = (torch.rand(out.shape, generator=generator) >= p).to(out.device, out.dtype)
        return out * keep / (1.0 - p)

    handles = [m.register_forward_hook(hook) for model in models for m in model.modules()
               if isinstance(m, nn.Conv2d)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
