"""Naturalness penalties on a perturbation (TIP-IM's second term).

TIP-IM (Yang et al., ICCV 2021) adds ``gamma * MMD(x_protected, x_natural)`` to the identity
objective so that protected faces stay distributed like natural ones. Its public code computes
a multi-bandwidth Gaussian-kernel MMD between the flattened protected and original images of a
batch. Here, with one photo at a time, the two "distributions" are the sets of small patches of
the protected and of the original face region (so the term is a distribution distance, not a
per-pixel one), with bandwidths set from the original patches' median distance.

The second option, ``hf``, is a cheap LPIPS-free proxy: the mean squared Laplacian of the
perturbation inside the face region relative to ``eps^2``, i.e. its high-frequency energy,
which is what makes L-inf noise visible on smooth skin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.filters import laplacian


def hf_energy(delta: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean squared Laplacian of ``delta`` (3, h, w) weighted by ``mask`` (1, h, w), / eps^2."""
    lap = laplacian(delta[None], kernel_size=3, border_type="reflect", normalized=True)[0]
    w = mask.expand_as(lap)
    return (lap.pow(2) * w).sum() / w.sum().clamp_min(1.0) / (eps * eps)


def _patches(x: torch.Tensor, mask: torch.Tensor, size: int, max_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping patches (P, 3*size*size) of ``x`` whose mask mean is >= 0.5, and their index."""
    cols = F.unfold(x[None], size, stride=size)[0].T  # (L, 3*s*s)
    mcols = F.unfold(mask[None], size, stride=size)[0].mean(0)  # (L,)
    idx = torch.nonzero(mcols >= 0.5).flatten()
    if idx.numel() > max_patches:
        idx = idx[torch.linspace(0, idx.numel() - 1, max_patches, device=idx.device).round().long()]
    return cols[idx], idx


def mmd_patches(x_adv: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, *, patch: int = 8,
                max_patches: int = 256, scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> torch.Tensor:
    """Biased MMD^2 between patches of ``x_adv`` and ``x`` (3, h, w) inside ``mask`` (1, h, w)."""
    if min(x.shape[-2:]) < patch:
        return x_adv.sum() * 0.0
    ref, idx = _patches(x, mask, patch, max_patches)
    if ref.shape[0] < 2:
        return x_adv.sum() * 0.0
    adv = F.unfold(x_adv[None], patch, stride=patch)[0].T[idx]
    with torch.no_grad():
        d_ref = torch.cdist(ref, ref).pow(2)
        med = d_ref[d_ref > 0].median() if (d_ref > 0).any() else d_ref.new_tensor(1.0)
    bws = [float(med) * s for s in scales]

    def k(a, b):
        d = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d / bw) for bw in bws) / len(bws)

    return k(adv, adv).mean() + k(ref, ref).mean() - 2 * k(adv, ref).mean()


def naturalness_loss(kind: str, x_adv: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """The penalty named ``kind`` ("hf" or "mmd") of the protected crop ``x_adv`` vs ``x``."""
    if kind == "hf":
        return hf_energy(x_adv - x, mask, eps)
    if kind == "mmd":
        return mmd_patches(x_adv, x, mask)
    raise ValueError(f"unknown naturalness term {kind!r}")
