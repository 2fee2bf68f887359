"""Configuration and result types of the L-inf attacks (:mod:`facepriv.attacks.linf`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

import torch

from ..core.config import ConfigBase
from ..core.errors import ConfigError
from ..core.regions import REGIONS

@dataclass(frozen=True)
class MethodTraits:
    """What one L-inf attack method is: the traits code branches on, and its defaults.

    needs_target: the method only impersonates (a target identity is required);
    multi_target: several target rows are candidate identities (the best is chosen per step),
    not photos of one identity (averaged); momentum / diversity: it uses momentum / input
    diversity by default; help: a short description for command help; defaults: the values
    it sets for the :class:`AttackConfig` fields left at ``None``.
    """

    name: str
    needs_target: bool = False
    multi_target: bool = False
    momentum: bool = False
    diversity: bool = False
    help: str = ""
    defaults: Mapping[str, float] = field(default_factory=dict, hash=False, compare=False)


#: attack methods (in CLI order) and their traits; ``tuple(METHODS)`` is the list of names
METHODS: dict[str, MethodTraits] = {t.name: t for t in (
    # Madry et al. 2018: sign-gradient steps projected onto the eps-ball.
    MethodTraits("pgd", help="plain gradient steps", defaults=MappingProxyType(
        {"momentum": 0.0, "ti_kernel": 0, "diversity_prob": 0.0, "push_weight": 0.0, "naturalness_weight": 0.0})),
    # Dong et al. 2018: momentum on the L1-normalised gradient.
    MethodTraits("mifgsm", momentum=True, help="with momentum", defaults=MappingProxyType(
        {"momentum": 1.0, "ti_kernel": 0, "diversity_prob": 0.0, "push_weight": 0.0, "naturalness_weight": 0.0})),
    # Dong et al. 2019 (TI) + Xie et al. 2019 (DI), with momentum (the usual "TI-DIM").
    MethodTraits("tidim", momentum=True, diversity=True,
                 help="smoothed, randomly resized gradients: carries over better to models it never saw",
                 defaults=MappingProxyType({"momentum": 1.0, "ti_kernel": 9, "diversity_prob": 0.5,
                                            "push_weight": 0.0, "naturalness_weight": 0.0})),
    # Yang et al. 2021 (TIP-IM): impersonation + push from the source + naturalness, MI + DI,
    # and a per-step choice of the best target among the candidates given.
    MethodTraits("tipim", needs_target=True, multi_target=True, momentum=True, diversity=True,
                 help="impersonation with a naturalness term; needs --target",
                 defaults=MappingProxyType({"momentum": 1.0, "ti_kernel": 0, "diversity_prob": 0.5,
                                            "push_weight": 1.0, "naturalness_weight": 0.5})),
)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def method_traits(name: str) -> MethodTraits | None:
    """The traits of attack method ``name`` (None for an unknown name: callers word their own error)."""
    return METHODS.get(name)


NATURALNESS = ("hf", "mmd")


#: the largest L-inf budget accepted anywhere (64 of 255 levels: already a visible change)
EPSILON_MAX = 64 / 255
EPSILON_RANGE_TEXT = "must be in (0, 64/255] (e.g. 8/255 = about 3 % of the pixel range)"
EPSILON_FORMS_TEXT = ("give a fraction of the pixel range such as 0.03, a ratio such as 8/255, or whole "
                      "8-bit levels such as 8 (each pixel changes by at most 8 of 255 levels)")


def epsilon_in_range(v: float) -> bool:
    """``v`` (in [0, 1] units) is a budget :func:`parse_epsilon` and ``AttackConfig`` accept."""
    return math.isfinite(v) and 0.0 < v <= EPSILON_MAX * (1 + 1e-9)


def parse_epsilon(value: str | float | int, name: str = "--epsilon") -> float:
    """An L-inf budget in [0, 1] units from user text or a number, the one parser of every command.

    Accepted forms: a ratio ``"8/255"``; whole 8-bit levels ``"8"`` (any whole number >= 1 counts
    levels: 8 -> 8/255); a fraction of the pixel range ``"0.03"`` (below 1). The result must lie in
    (0, 64/255]. Zero denominators, non-numbers, values <= 0, non-whole values >= 1 (``1.5``: 1.5
    levels or 150 %?) and anything above 64/255 raise :class:`ConfigError` with a message that
    starts with ``"{name} {value}:"``.
    """
    shown = str(value).strip() if not isinstance(value, float) else f"{value:g}"

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{name} {shown}: {why}")

    if isinstance(value, bool):
        raise bad(f"not a number; {EPSILON_FORMS_TEXT}")
    ratio = False
    if isinstance(value, (int, float)):
        v = float(value)
    else:
        text = str(value).strip()
        try:
            if "/" in text:
                num, den = (float(t) for t in text.split("/", 1))
                if den == 0:
                    raise bad(f"the denominator is zero; {EPSILON_FORMS_TEXT}")
                v, ratio = num / den, True
            else:
                v = float(text)
        except ValueError:
            raise bad(f"not a number; {EPSILON_FORMS_TEXT}") from None
    if not math.isfinite(v):
        raise bad(f"not a finite number; {EPSILON_FORMS_TEXT}")
    if v <= 0:
        raise bad(f"{EPSILON_RANGE_TEXT}; 0 or less would change nothing")
    if not ratio and v >= 1.0:  # whole 8-bit levels
        if v != int(v):
            raise bad(f"{EPSILON_RANGE_TEXT}; a value of 1 or more counts whole 8-bit levels "
                      "(8 = 8/255), so it must be a whole number")
        v = v / 255.0
    if not epsilon_in_range(v):
        raise bad(f"{EPSILON_RANGE_TEXT}; that is {v * 255:.4g} of 255 levels")
    return min(v, EPSILON_MAX)


def levels_for(loaded) -> int:
    """Output levels (``AttackConfig.quantize``) for a loaded photo: 65535 for a file deeper
    than 8 bits (16-bit PNG/TIFF), else 255 (also for ``None``: video frames, plain tensors)."""
    return 65535 if loaded is not None and getattr(loaded, "bit_depth", 8) > 8 else 255


@dataclass
class AttackConfig(ConfigBase):
    """One configurable L-inf attack on the pixels of the original photo: the one attack
    configuration ``protect`` (pgd/mifgsm/tidim/tipim), ``deid -m adversarial`` and ``patch``
    (its thresholds) pass; :meth:`from_dict` takes saved or given options and refuses unknown ones.

    ``method`` picks the algorithm and the defaults of the fields left at ``None``
    (see :data:`METHODS`): ``pgd`` | ``mifgsm`` | ``tidim`` | ``tipim``.

    epsilon
        L-inf budget in [0, 1] units, in (0, 64/255] (default 8/255: each pixel changes by at
        most 8 of 255 levels), or text :func:`parse_epsilon` reads (``"8/255"``, ``"8"``); it
        holds in the quantised output.
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

    config_name: ClassVar[str] = "attack option"

    method: str = "pgd"
    epsilon: float | str = 8 / 255
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
        defaults = METHODS[self.method].defaults
        cfg = dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        if isinstance(cfg.epsilon, str):
            cfg.epsilon = parse_epsilon(cfg.epsilon, "epsilon")
        if not epsilon_in_range(float(cfg.epsilon)):
            raise ConfigError(f"epsilon {float(cfg.epsilon):.4g} (= {float(cfg.epsilon) * 255:.4g}/255) "
                              f"{EPSILON_RANGE_TEXT}")
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
