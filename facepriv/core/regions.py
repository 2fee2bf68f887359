"""Face regions in image space (for de-identification, patches and masks).

A region is derived from a detected face's box and landmarks: ``face`` (an ellipse covering
forehead to chin, rotated with the eye line), ``head`` (a larger ellipse including hair and
ears) or ``box`` (the detector box, slightly enlarged). :func:`region_mask` returns the
bounding slice and a soft mask, so effects are computed only where needed in large photos.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError
from .faces import Face

REGIONS = ("face", "head", "box")


@dataclass
class Region:
    y0: int
    y1: int
    x0: int
    x1: int
    mask: torch.Tensor  # (1, y1 - y0, x1 - x0) in [0, 1]

    @property
    def slices(self):
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def _geometry(face: Face, region: str) -> tuple[float, float, float, float, float, str]:
    """Centre x, y, semi-axes a (across), b (along the face), roll angle, shape."""
    x1, y1, x2, y2 = [float(v) for v in face.box]
    w, h = x2 - x1, y2 - y1
    lm = np.asarray(face.landmarks, dtype=np.float64)
    dx, dy = lm[1] - lm[0]
    roll = math.atan2(dy, dx) if np.isfinite([dx, dy]).all() and (dx or dy) else 0.0
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    up = np.array([math.sin(roll), -math.cos(roll)])  # towards the top of the head
    if region == "face":
        c = np.array([cx, cy]) + up * 0.06 * h
        return c[0], c[1], 0.62 * w, 0.66 * h, roll, "ellipse"
    if region == "head":
        c = np.array([cx, cy]) + up * 0.15 * h
        return c[0], c[1], 0.85 * w, 0.92 * h, roll, "ellipse"
    if region == "box":
        return cx, cy, 0.55 * w, 0.55 * h, 0.0, "box"
    raise ConfigError(f"unknown region {region!r}; use one of {', '.join(REGIONS)}")


def rotated_window(cx: float, cy: float, ext: float, angle: float, image_hw: tuple[int, int], device=None):
    """The pixels within ``ext`` of ``(cx, cy)``, clipped to the image, as ``((y0, y1, x0, x1), u,
    v)``: each pixel's offset from the centre along ``angle`` (``u``) and across it (``v``), as
    ``(y1 - y0, x1 - x0)`` tensors; None when the window is off the image."""
    H, W = image_hw
    x0, x1 = int(max(0, math.floor(cx - ext))), int(min(W, math.ceil(cx + ext) + 1))
    y0, y1 = int(max(0, math.floor(cy - ext))), int(min(H, math.ceil(cy + ext) + 1))
    if x1 <= x0 or y1 <= y0:
        return None
    ys = torch.arange(y0, y1, device=device, dtype=torch.float32)[:, None] - cy
    xs = torch.arange(x0, x1, device=device, dtype=torch.float32)[None, :] - cx
    c, s = math.cos(angle), math.sin(angle)
    return (y0, y1, x0, x1), xs * c + ys * s, -xs * s + ys * c


def region_mask(face: Face, image_hw: tuple[int, int], *, region: str = "face", feather: float = 0.1,
                device=None) -> Region | None:
    """Bounding slice + soft mask of ``region`` around ``face``; None if it is off-image.

    ``feather`` is the width of the soft edge as a fraction of the region's size (0 = hard).
    """
    cx, cy, a, b, roll, shape = _geometry(face, region)
    window = rotated_window(cx, cy, max(a, b) * (1 + feather) + 2, roll, image_hw, device=device)
    if window is None:
        return None
    (y0, y1, x0, x1), u, v = window
    u, v = u / a, v / b  # across the face, along the face
    r = torch.sqrt(u**2 + v**2) if shape == "ellipse" else torch.maximum(u.abs(), v.abs())
    if feather > 0:
        m = ((1 + feather - r) / (2 * feather)).clamp(0, 1)
        m = m * m * (3 - 2 * m)
    else:
        m = (r <= 1).float()
    return Region(y0, y1, x0, x1, m[None])
