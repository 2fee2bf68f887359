"""Deterministic DDIM inversion and generation (eta = 0), differentiable end to end.

These are pure functions over a noise-prediction network ``eps_theta(x_t, t)`` (a diffusers
``UNet2DModel``, or facepriv's :class:`~facepriv.models.diffusion.ScoreModel`) and the
``alphas_cumprod`` of its noise schedule (any diffusers scheduler). Images are in ``[-1, 1]``.

Both directions walk the same grid of timesteps ``0 = g_0 < g_1 < ... < g_n = t0`` (``n`` =
``n_inv`` or ``n_gen``). State 0 is the clean image (``alpha_bar = 1``, as in DDIM /
DiffusionCLIP where the step after ``t = 0`` goes to ``t = -1``); state ``k > 0`` is the noisy
image at timestep ``g_k``. One DDIM step from state ``a`` to state ``b`` is

    x0_pred = (x_a - sqrt(1 - abar_a) * eps) / sqrt(abar_a)
    x_b     = sqrt(abar_b) * x0_pred + sqrt(1 - abar_b) * eps

with ``eps = eps_theta(x_a, g_a)``; inversion goes up the grid (``a = k``, ``b = k + 1``),
generation down (``a = k``, ``b = k - 1``). With eta = 0 there is no noise, so inversion then
generation with the same network reconstructs the input up to the discretisation error.

Every network call can be wrapped in :func:`torch.utils.checkpoint.checkpoint`
(``checkpoint=True``, the default while gradients are being recorded): activations inside
the UNet are recomputed in the backward pass, so memory grows with the number of steps by
one image per step instead of all of the UNet's activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from ...core.errors import ConfigError

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def alphas_cumprod_of(scheduler_or_tensor) -> torch.Tensor:
    """``alphas_cumprod`` (T,) of a diffusers scheduler, a ScoreModel, or a tensor as is."""
    if torch.is_tensor(scheduler_or_tensor):
        return scheduler_or_tensor
    sched = getattr(scheduler_or_tensor, "scheduler", scheduler_or_tensor)
    abar = getattr(sched, "alphas_cumprod", None)
    if abar is None:
        raise ConfigError(f"{type(scheduler_or_tensor).__name__} has no alphas_cumprod (not a DDPM/DDIM scheduler)")
    return torch.as_tensor(abar)


def timestep_grid(t0: int, n: int, num_train_timesteps: int) -> list[int]:
    """``n + 1`` integer timesteps from 0 to ``t0`` (duplicates from rounding dropped)."""
    if n < 1:
        raise ConfigError(f"the number of DDIM steps must be at least 1, got {n}")
    if not 1 <= t0 < num_train_timesteps:
        raise ConfigError(f"t0 must be between 1 and {num_train_timesteps - 1}, got {t0}")
    grid = torch.linspace(0, t0, n + 1).round().long().tolist()
    out: list[int] = []
    for g in grid:
        if not out or g > out[-1]:
            out.append(int(g))
    return out


def _eps_fn(net) -> EpsFn:
    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = net(x, t)
        return out.sample if hasattr(out, "sample") else out

    return call


def predict_noise(net, x: torch.Tensor, t: int | torch.Tensor, *, checkpoint: bool = False) -> torch.Tensor:
    """``eps_theta(x, t)`` for a batch; ``t`` is broadcast to the batch."""
    tt = torch.as_tensor(t, device=x.device).long().reshape(-1).expand(x.shape[0])
    fn = _eps_fn(net)
    if checkpoint and torch.is_grad_enabled():
        return _checkpoint(fn, x, tt, use_reentrant=False)
    return fn(x, tt)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, abar_from: torch.Tensor | float,
              abar_to: torch.Tensor | float) -> torch.Tensor:
    """One deterministic DDIM move from noise level ``abar_from`` to ``abar_to``."""
    a_f = torch.as_tensor(abar_from, dtype=x.dtype, device=x.device)
    a_t = torch.as_tensor(abar_to, dtype=x.dtype, device=x.device)
    x0 = (x - (1 - a_f).sqrt() * eps) / a_f.sqrt()
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps


def _abar(abar: torch.Tensor, grid: list[int], k: int) -> torch.Tensor | float:
    return 1.0 if k == 0 else abar[grid[k]]


def ddim_invert(net, x0: torch.Tensor, scheduler, t0: int, n_inv: int, *, checkpoint: bool = True,
                return_trajectory: bool = False):
    """Deterministic DDIM inversion of clean images ``x0`` ([-1, 1]) to timestep ``t0``.

    Returns ``x_t0`` (same shape), or ``(x_t0, [x_0, ..., x_t0])`` with ``return_trajectory``.
    Differentiable w.r.t. ``x0`` and the network's parameters when grad is enabled.
    """
    abar = alphas_cumprod_of(scheduler).to(x0.device, torch.float32)
    grid = timestep_grid(t0, n_inv, abar.shape[0])
    x = x0
    traj = [x]
    for k in range(len(grid) - 1):
        eps = predict_noise(net, x, grid[k], checkpoint=checkpoint)
        x = ddim_step(x, eps.to(x.dtype), _abar(abar, grid, k), _abar(abar, grid, k + 1))
        traj.append(x)
    return (x, traj) if return_trajectory else x


def ddim_generate(net, x_t0: torch.Tensor, scheduler, t0: int, n_gen: int, *, checkpoint: bool = True,
                  return_trajectory: bool = False):
    """Deterministic DDIM generation from ``x_t0`` (at timestep ``t0``) down to a clean image.

    Returns the clean image in (about) [-1, 1], not clipped, so inversion stays invertible and
    gradients are never cut; or ``(x_0, [x_t0, ..., x_0])`` with ``return_trajectory``.
    """
    abar = alphas_cumprod_of(scheduler).to(x_t0.device, torch.float32)
    grid = timestep_grid(t0, n_gen, abar.shape[0])
    x = x_t0
    traj = [x]
    for k in range(len(grid) - 1, 0, -1):
        eps = predict_noise(net, x, grid[k], checkpoint=checkpoint)
        x = ddim_step(x, eps.to(x.dtype), _abar(abar, grid, k), _abar(abar, grid, k - 1))
        traj.append(x)
    return (x, traj) if return_trajectory else x


def ddim_reconstruct(net, x0: torch.Tensor, scheduler, t0: int, n_inv: int, n_gen: int, *,
                     tuned_net=None, checkpoint: bool = True) -> torch.Tensor:
    """Invert with ``net`` then regenerate with ``tuned_net`` (default: the same network)."""
    xt = ddim_invert(net, x0, scheduler, t0, n_inv, checkpoint=checkpoint)
    return ddim_generate(tuned_net or net, xt, scheduler, t0, n_gen, checkpoint=checkpoint)
