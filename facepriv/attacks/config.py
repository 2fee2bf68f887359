"""Configuration and result types of the L-inf attacks (:mod:`facepriv.attacks.linf`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..core.errors import ConfigError
from ..core.regions import REGIONS

#: attack methods and the defaults each one sets for the fields left at ``None``
METHODS: dict[str, dict] = {
    # Madry et al. 2018: sign-gradient steps projected onto the eps-ball.
    "pgd": {"momentum": 0.0, "ti_kernel": 0, "diversity_prob": 0.0, "push_weight": 0.0, "naturalness_weight": 0.0},
    # Dong et al. 2018: momentum on the L1-normalised gradient.
    "mifgsm": {"momentum": 1.0, "ti_kernel": 0, "diversity_prob": 0.0, "push_weight": 0.0, "naturalness_weight": 0.0},
    # Dong et al. 2019 (TI) + Xie et al. 2019 (DI), with momentum (the usual "TI-DIM").
    "tidim": {"momentum": 1.0, "ti_kernel": 9, "diversity_prob": 0.5, "push_weight": 0.0, "naturalness_weight": 0.0},
    # Yang et al. 2021 (TIP-IM): impersonation + push from the source + naturalness, MI + DI,
    # and a per-step choice of the best target among the candidates given.
    "tipim": {"momentum": 1.0, "ti_kernel": 0, "diversity_prob": 0.5, "push_weight": 1.0, "naturalness_weight": 0.5},
}
NATURALNESS = ("hf", "mmd")


def parse_epsilon(value: str | float | int) -> float:
    """An L-inf budget from user text: ``"8/255"``, ``"8"`` (8-bit levels) or ``"0.03"``."""
    if isinstance(value, (int, float)):
        v = float(value)
    else:
        text = str(value).strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                v = float(num) / float(den)
            else:
                v = float(text)
        except ValueError:
            raise ConfigError(f"epsilon {value!r}: use a number such as 8/255, 8 or 0.03") from None
    if v >= 1.0:  # whole 8-bit levels
        v = v / 255.0
    if not 0.0 < v <= 1.0:
        raise ConfigError(f"epsilon {value!r} must be > 0")
    return v


@dataclass
class AttackConfig:
    """One configurable L-inf attack on the pixels of the original photo.

    ``method`` picks the algorithm and the defaults of the fields left at ``None``
    (see :data:`METHODS`): ``pgd`` | ``mifgsm`` | ``tidim`` | ``tipim``.

    epsilon
        L-inf budget in [0, 1] units (default 8/255); it holds in the quantised output.
    step_size
        per-step change; ``None`` = ``min(eps, 2.5 * eps / steps)`` (Madry et al.'s rule).
    momentum
        decay of the accumulated L1-normalised gradient (0 = plain PGD).
    ti_kernel
        translation-invariant gradient smoothing: Gaussian kernel length in pixels of a face
        100 px across (scaled to the faces' size in the photo); 0 = off.
    diversity_prob
        probability per step of input diversity (random resize + small random affine of the
        image before alignment); ``diversity_scale`` / ``diversity_shift`` (fractions) and
        ``diversity_rotate`` (degrees) bound the random transform.
    random_start
        start from uniform noise in the eps-ball (inside the face region).
    region, feather
        which pixels may change (:func:`facepriv.core.regions.region_mask`); the budget is
        ``epsilon x mask``, so a feathered edge tapers the perturbation to zero.
    early_stop, early_stop_margin, far, thresholds
        stop a face once every surrogate is past its verification threshold by the margin
        (in the model's own similarity units): below it (dodging) or above it for the target
        (impersonation). Thresholds come from ``thresholds[name]``, else the model's spec at
        false-accept rate ``far``, else a calibration stored by ``facepriv audit calibrate``,
        else the spec's ``default``.
    push_weight
        with a target, weight of the "move away from the source" term (TIP-IM uses 1).
    naturalness, naturalness_weight
        a naturalness penalty on the perturbation (``hf``: high-frequency energy, ``mmd``:
        kernel MMD between patches of the protected and the original face), mixed into the
        gradient with this relative weight (TIP-IM's gamma).
    quantize
        number of levels of the output (255 for 8-bit files, 65535 for 16-bit, None = off):
        the result is rounded to that grid and re-clipped into the budget.
    seed
        seed of the random start and input diversity (None = torch's global RNG).
    """

    method: str = "pgd"
    epsilon: float = 8 / 255
    step_size: float | None = None
    steps: int = 20
    momentum: float | None = None
    ti_kernel: int | None = None
    diversity_prob: float | None = None
    diversity_scale: float = 0.1
    diversity_shift: float = 0.04
    diversity_rotate: float = 6.0
    random_start: bool = False
    region: str = "face"
    feather: float = 0.1
    early_stop: bool = False
    early_stop_margin: float = 0.05
    far: str = "1e-2"
    thresholds: dict[str, float] | None = None
    push_weight: float | None = None
    naturalness: str = "hf"
    naturalness_weight: float | None = None
    quantize: int | None = 255
    seed: int | None = 0

    def resolved(self) -> AttackConfig:
        """A validated copy with the method's defaults filled in."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown attack method {self.method!r}; use one of {', '.join(METHODS)}")
        defaults = METHODS[self.method]
        cfg = dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        if not 0.0 < cfg.epsilon <= 1.0:
            raise ConfigError(f"epsilon must be in (0, 1] (e.g. 8/255), not {cfg.epsilon}")
        if int(cfg.steps) != cfg.steps or cfg.steps < 0:
            raise ConfigError(f"steps must be a whole number >= 0, not {cfg.steps}")
        if cfg.step_size is None:
            cfg.step_size = min(cfg.epsilon, 2.5 * cfg.epsilon / max(1, cfg.steps))
        if cfg.step_size <= 0:
            raise ConfigError("step_size must be > 0")
        if cfg.momentum < 0:
            raise ConfigError("momentum must be >= 0")
        if int(cfg.ti_kernel) != cfg.ti_kernel or cfg.ti_kernel < 0:
            raise ConfigError("ti_kernel must be a whole number >= 0 (0 = off)")
        if not 0.0 <= cfg.diversity_prob <= 1.0:
            raise ConfigError("diversity_prob must be in [0, 1]")
        if cfg.diversity_scale < 0 or cfg.diversity_shift < 0 or cfg.diversity_rotate < 0:
            raise ConfigError("diversity_scale/shift/rotate must be >= 0")
        if cfg.region not in REGIONS:
            raise ConfigError(f"unknown region {cfg.region!r}; use one of {', '.join(REGIONS)}")
        if cfg.feather < 0:
            raise ConfigError("feather must be >= 0")
        if cfg.naturalness not in NATURALNESS:
            raise ConfigError(f"unknown naturalness term {cfg.naturalness!r}; use one of {', '.join(NATURALNESS)}")
        if cfg.naturalness_weight < 0 or cfg.push_weight < 0:
            raise ConfigError("naturalness_weight and push_weight must be >= 0")
        if cfg.quantize is not None and int(cfg.quantize) < 1:
            raise ConfigError("quantize must be a number of levels >= 1 (255 for 8-bit output) or None")
        cfg.steps = int(cfg.steps)
        cfg.ti_kernel = int(cfg.ti_kernel)
        return cfg

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class AttackResult:
    """What :func:`facepriv.attacks.attack_faces` returns.

    image: the protected image (3, H, W), on the input's device, quantised to
    ``cfg.quantize`` levels; per_face: one dict per input face (see ``attack_faces``);
    linf: the largest absolute pixel change (in [0, 1] units).
    """

    image: torch.Tensor
    per_face: list[dict]
    linf: float
    config: dict = field(default_factory=dict)
