"""Transfer tricks: input diversity (DI) and translation-invariant gradients (TI).

Input diversity (Xie et al., CVPR 2019) resizes and pads the input at random before the
model sees it. Here the models see faces *aligned* from the photo, so the same two effects are
produced before alignment:

* **resize**: the photo crop is resampled at a random smaller scale (bilinear, antialiased)
  and its landmarks rescaled with it - the models see the face through another resampling;
* **small affine**: each face gets a random similarity (scale, rotation, shift relative to the
  face size). Warping the image by ``T`` and aligning with the original landmarks is the same
  mapping as aligning the unwarped image with landmarks moved by ``T^-1``, so the affine is
  applied to the alignment landmarks (one warp, exact, per face - faces in one crop get
  independent transforms, as if each were the centre of its own DI input).

TI (Dong et al., CVPR 2019) convolves the gradient with a Gaussian kernel (kornia).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (hi - lo) + lo


def diversify(x: torch.Tensor, landmarks: torch.Tensor, face_sizes: torch.Tensor, *, scale: float = 0.1,
              shift: float = 0.04, rotate: float = 6.0,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One random input-diversity draw.

    x: (3, h, w) crop in [0, 1]; landmarks (N, 5, 2) in crop pixels; face_sizes (N,) pixels.
    Returns the resampled crop and the landmarks to align it with.
    """
    r = float(_uniform(1, 1.0 - scale, 1.0, generator))
    h, w = x.shape[-2:]
    nh, nw = max(8, round(h * r)), max(8, round(w * r))
    if (nh, nw) != (h, w):
        fy, fx = nh / h, nw / w
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        # pixel centre j maps to (j + 0.5) * f - 0.5 in the resized crop
        f = torch.tensor([fx, fy], device=landmarks.device, dtype=landmarks.dtype)
        landmarks = (landmarks + 0.5) * f - 0.5
        face_sizes = face_sizes * r
    n = landmarks.shape[0]
    s = 1.0 + _uniform(n, -scale, scale, generator)
    a = _uniform(n, -rotate, rotate, generator) * (math.pi / 180.0)
    t = _uniform(2 * n, -shift, shift, generator).reshape(n, 2)
    s, a, t = (v.to(landmarks.device, landmarks.dtype) for v in (s, a, t))
    c = landmarks.mean(1, keepdim=True)  # (N, 1, 2)
    cos, sin = torch.cos(a), torch.sin(a)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (N, 2, 2)
    moved = ((landmarks - c) @ rot.transpose(1, 2)) * s[:, None, None] + c
    moved = moved + (t * face_sizes.to(moved)[:, None])[:, None, :]
    return x, moved


def ti_smooth(grad: torch.Tensor, kernel: int) -> torch.Tensor:
    """Gaussian smoothing of a (3, h, w) gradient; ``kernel`` odd length, sigma = (k - 1) / 6."""
    if kernel < 3:
        return grad
    k = kernel if kernel % 2 == 1 else kernel + 1
    sigma = (k - 1) / 6.0
    return gaussian_blur2d(grad[None], (k, k), (sigma, sigma), border_type="reflect")[0]


def scaled_kernel(kernel: int, face_size: float) -> int:
    """A kernel length given for a 100 px face, scaled to ``face_size`` px (odd, 0 = off)."""
    if kernel <= 0:
        return 0
    k = int(round(kernel * face_size / 100.0))
    if k < 3:
        return 0
    return k if k % 2 == 1 else k + 1
