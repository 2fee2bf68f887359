"""Noise baselines of ``facepriv protect``: L-inf attacks on the photo (PGD, MI-FGSM, TI-DIM, TIP-IM).

    >>> from facepriv.protect.baselines import BaselineConfig, build_editor
    >>> edit = build_editor(BaselineConfig(method="pgd", steps=20), device, detector)
    >>> process_photo(item, dst, detector=detector, policy=policy, edit=edit, save=save)

:func:`build_editor` loads the surrogate ensemble and the target reference once and returns an
``EditFn`` (``edit(x, faces, loaded) -> protected x``, what
:func:`facepriv.core.pipeline.process_photo` takes). Without a target the faces are protected by
dodging (pushed away from their own identity); with ``target`` (an image, or a folder of images)
by impersonation of that identity. The attack itself is :func:`facepriv.attacks.attack_faces`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..attacks import AttackConfig, AttackResult, SurrogateEnsemble, attack_faces, reference_from_images
from ..attacks.reference import target_images
from ..attacks.config import METHOD_NAMES, METHODS, parse_epsilon
from ..attacks.config import levels_for
from ..core.errors import ConfigError, ProtectionFailed
from ..core.faces import Face, FaceDetector
from ..core.io import LoadedImage, load_image

BASELINE_METHODS = METHOD_NAMES  # pgd, mifgsm, tidim, tipim
__all__ = ["BASELINE_METHODS", "BaselineConfig", "BaselineEditor", "build_editor", "target_images"]


@dataclass
class BaselineConfig:
    """Options of the noise baselines (see :class:`facepriv.attacks.AttackConfig` for details).

    Fields left at ``None`` take the method's defaults. ``epsilon`` is in [0, 1] units or text
    such as ``"8/255"``; ``target`` an image or a folder of images of the identity to impersonate
    (for ``tipim``: the candidate target identities, one per image).
    """

    method: str = "pgd"
    surrogates: list[str] = field(default_factory=lambda: ["dlib-resnet", "facenet-casia"])
    epsilon: float | str = 8 / 255
    steps: int = 20
    step_size: float | None = None
    target: Path | None = None
    diversity_prob: float | None = None
    diversity_scale: float = 0.1
    diversity_shift: float = 0.04
    diversity_rotate: float = 6.0
    momentum: float | None = None
    ti_kernel: int | None = None
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
    seed: int | None = 0

    def __post_init__(self):
        if self.method not in BASELINE_METHODS:
            raise ConfigError(f"unknown protect baseline {self.method!r}; use one of {', '.join(BASELINE_METHODS)}")
        if not self.surrogates:
            raise ConfigError("at least one surrogate model is needed")
        self.epsilon = parse_epsilon(self.epsilon)
        if self.target is not None:
            self.target = Path(self.target)
        if METHODS[self.method].needs_target and self.target is None:
            raise ConfigError(f"{self.method} is a targeted method: give --target (an image or a folder of images)")

    def attack_config(self, levels: int | None = 255) -> AttackConfig:
        return AttackConfig(
            method=self.method, epsilon=float(self.epsilon), step_size=self.step_size, steps=self.steps,
            momentum=self.momentum, ti_kernel=self.ti_kernel, diversity_prob=self.diversity_prob,
            diversity_scale=self.diversity_scale, diversity_shift=self.diversity_shift,
            diversity_rotate=self.diversity_rotate,
            random_start=self.random_start, region=self.region, feather=self.feather,
            early_stop=self.early_stop, early_stop_margin=self.early_stop_margin, far=self.far,
            thresholds=self.thresholds, push_weight=self.push_weight, naturalness=self.naturalness,
            naturalness_weight=self.naturalness_weight, quantize=levels, seed=self.seed,
        ).resolved()

    def to_json(self) -> dict:
        d = asdict(self)
        d["target"] = str(self.target) if self.target is not None else None
        return d


class BaselineEditor:
    """The ``EditFn`` :func:`build_editor` returns; ``last_result`` keeps the latest report."""

    def __init__(self, cfg: BaselineConfig, ensemble: SurrogateEnsemble,
                 target_ref: dict[str, torch.Tensor] | None, progress=None):
        self.cfg = cfg
        self.ensemble = ensemble
        self.target_ref = target_ref
        self.progress = progress
        self.last_result: AttackResult | None = None
        cfg.attack_config()  # validate now, not at the first photo

    def __call__(self, x: torch.Tensor, faces: list[Face], loaded: LoadedImage | None = None) -> torch.Tensor:
        levels = levels_for(loaded)
        res = attack_faces(x, faces, self.ensemble, self.cfg.attack_config(levels), target_ref=self.target_ref,
                           progress=self.progress)
        self.last_result = res
        ProtectionFailed.check(res.per_face, f"protect {self.cfg.method}")  # an unprotected face fails the photo
        return res.image


def build_editor(cfg: BaselineConfig, device: str | torch.device, detector: FaceDetector | None,
                 progress=None) -> BaselineEditor:
    """Load the surrogates (and the target's embeddings) once; return the per-photo edit function.

    ``detector`` is needed only to find the face in the target image(s).
    """
    ensemble = SurrogateEnsemble(cfg.surrogates, device=device)
    target_ref = None
    if cfg.target is not None:
        if detector is None:
            raise ConfigError("a face detector is needed to read the target image")
        images = [load_image(p).rgb for p in target_images(cfg.target)]
        target_ref = reference_from_images(ensemble, images, detector)
    return BaselineEditor(cfg, ensemble, target_ref, progress=progress)
