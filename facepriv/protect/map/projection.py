"""Gradient projection between the identity and the expression objectives (PCGrad-style).

MAP optimises two goals with one set of weights ``theta``: the adversarial identity loss
``L_id`` and the expression loss ``L_exp``. Their parameter gradients ``g_id`` and ``g_exp``
are computed separately; where they *conflict* (negative inner product), each loses its
component along the other (Yu et al., "Gradient Surgery for Multi-Task Learning", 2020):

    g_id'  = g_id  - (g_id . g_exp) / |g_exp|^2 * g_exp
    g_exp' = g_exp - (g_exp . g_id) / |g_id|^2  * g_id

(both from the *original* gradients, so the rule is symmetric). Afterwards ``g_id' . g_exp = 0``,
``g_exp' . g_id = 0`` and ``g_id' . g_exp' >= 0``: neither update undoes the other, and the
sum moves toward a point good for both. Gradients that do not conflict are left untouched.

* ``mode="global"``: one decision over the concatenation of all parameters.
* ``mode="layerwise"``: an independent decision per parameter tensor (each weight / bias of
  each layer), so a conflict in one layer does not rescale the others.
* ``mode="none"``: plain sum (for ablations).

Gradients are lists with one tensor (or ``None``: unused) per parameter. :class:`EMAGradients`
smooths them over steps before the projection (bias-corrected exponential moving average),
and :class:`ConflictStats` counts how often and how strongly they conflicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ...core.errors import ConfigError

PROJECTION_MODES = ("global", "layerwise", "none")
Grads = Sequence[torch.Tensor | None]


def _filled(grads: Grads, like: Grads) -> list[torch.Tensor]:
    out = []
    for g, ref in zip(grads, like):
        if g is None:
            if ref is None:
                raise ValueError("a parameter has no gradient in either objective")
            g = torch.zeros_like(ref)
        out.append(g)
    return out


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def _project_pair(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], eps: float = 1e-20):
    """Symmetric projection of two gradient groups; returns (a', b', info)."""
    dot = _dot(a, b)
    na, nb = _dot(a, a), _dot(b, b)
    cos = float(dot / (na.sqrt() * nb.sqrt()).clamp_min(eps)) if na > 0 and nb > 0 else 0.0
    if dot >= 0 or na <= eps or nb <= eps:
        return list(a), list(b), {"conflict": False, "cosine": cos, "removed_id": 0.0, "removed_exp": 0.0}
    ca, cb = (dot / nb), (dot / na)
    a2 = [x - (ca * y.double()).to(x.dtype) for x, y in zip(a, b)]
    b2 = [y - (cb * x.double()).to(y.dtype) for x, y in zip(a, b)]
    # Fraction of each gradient's norm that the projection removed (|component| / |g|).
    removed_a = float((-dot) / (na.sqrt() * nb.sqrt()))  # = |cos|: |proj of a on b| / |a|
    return a2, b2, {"conflict": True, "cosine": cos, "removed_id": removed_a, "removed_exp": removed_a}


def pcgrad_combine(g_id: Grads, g_exp: Grads, mode: str = "global") -> tuple[list[torch.Tensor], dict]:
    """Project conflicting ``g_id`` / ``g_exp`` and sum them (see the module docstring).

    Returns the combined per-parameter gradients and an info dict: ``conflict`` (bool, any
    conflict), ``cosine`` (between the full gradients, before projection), and for
    ``layerwise`` the number of conflicting tensors (``layers_conflicting`` of ``layers``).
    """
    if mode not in PROJECTION_MODES:
        raise ConfigError(f"projection must be one of {', '.join(PROJECTION_MODES)}, not {mode!r}")
    a = _filled(g_id, g_exp)
    b = _filled(g_exp, g_id)
    na, nb = _dot(a, a), _dot(b, b)
    full_cos = float(_dot(a, b) / (na.sqrt() * nb.sqrt()).clamp_min(1e-20)) if na > 0 and nb > 0 else 0.0
    if mode == "none":
        return [x + y for x, y in zip(a, b)], {"conflict": full_cos < 0, "cosine": full_cos, "projected": False,
                                               "layers": len(a), "layers_conflicting": 0, "removed": 0.0}
    if mode == "global":
        a2, b2, info = _project_pair(a, b)
        return [x + y for x, y in zip(a2, b2)], {
            "conflict": info["conflict"], "cosine": full_cos, "projected": info["conflict"],
            "layers": len(a), "layers_conflicting": len(a) if info["conflict"] else 0,
            "removed": info["removed_id"]}
    combined, n_conf, removed = [], 0, []
    for x, y in zip(a, b):
        x2, y2, info = _project_pair([x], [y])
        if info["conflict"]:
            n_conf += 1
            removed.append(info["removed_id"])
        combined.append(x2[0] + y2[0])
    return combined, {"conflict": n_conf > 0, "cosine": full_cos, "projected": n_conf > 0, "layers": len(a),
                      "layers_conflicting": n_conf, "removed": sum(removed) / len(removed) if removed else 0.0}


class EMAGradients:
    """Bias-corrected exponential moving average of the two objectives' gradients.

    ``beta = 0`` disables it (the raw gradients are returned).
    """

    def __init__(self, beta: float = 0.0):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"EMA factor must be in [0, 1), got {beta}")
        self.beta = beta
        self.steps = 0
        self._m: dict[str, list[torch.Tensor]] = {}

    def update(self, name: str, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.beta == 0.0:
            return list(grads)
        if name not in self._m:
            self._m[name] = [torch.zeros_like(g) for g in grads]
        m = self._m[name]
        for mi, g in zip(m, grads):
            mi.mul_(self.beta).add_(g, alpha=1 - self.beta)
        n = self.steps + 1
        corr = 1.0 - self.beta ** n
        return [mi / corr for mi in m]

    def step(self) -> None:
        self.steps += 1


@dataclass
class ConflictStats:
    """How often and how strongly ``g_id`` and ``g_exp`` conflicted during fine-tuning."""

    steps: int = 0
    conflicts: int = 0
    cosines: list[float] = field(default_factory=list)
    removed: list[float] = field(default_factory=list)
    layer_fractions: list[float] = field(default_factory=list)

    def record(self, info: dict) -> None:
        self.steps += 1
        self.cosines.append(float(info["cosine"]))
        if info.get("conflict"):
            self.conflicts += 1
            self.removed.append(float(info.get("removed", 0.0)))
        if info.get("layers"):
            self.layer_fractions.append(info.get("layers_conflicting", 0) / info["layers"])

    def summary(self) -> dict:
        n = max(self.steps, 1)
        return {
            "steps": self.steps,
            "conflict_steps": self.conflicts,
            "conflict_rate": round(self.conflicts / n, 4),
            "mean_cosine": round(sum(self.cosines) / n, 4) if self.cosines else None,
            "min_cosine": round(min(self.cosines), 4) if self.cosines else None,
            "mean_removed_fraction": round(sum(self.removed) / len(self.removed), 4) if self.removed else 0.0,
            "mean_layers_conflicting": (round(sum(self.layer_fractions) / len(self.layer_fractions), 4)
                                        if self.layer_fractions else 0.0),
        }
