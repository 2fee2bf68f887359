"""``adversarial``: de-identification by an imperceptible L-inf perturbation of each face.

Unlike blur or pixelate the face stays visually the same; recognition models (those used as
surrogates, and - less reliably - others) stop matching it to its identity (dodging), or match
it to a target identity instead (impersonation, ``target=``). The attack is
:func:`facepriv.attacks.attack_faces`; this class only adapts it to the :class:`DeidMethod`
interface. ``strength`` scales ``epsilon``.

    >>> from facepriv.deid import create_method
    >>> import facepriv.deid.adversarial  # registers the method
    >>> m = create_method("adversarial", attack="mifgsm", steps=20)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..attacks import AttackConfig, AttackResult, SurrogateEnsemble, attack_faces, reference_from_images
from ..attacks.reference import target_images
from ..attacks.config import METHODS, levels_for, parse_epsilon
from ..core.errors import ConfigError, ProtectionFailed
from ..core.faces import Face
from .base import DeidMethod, register_method


@register_method
class Adversarial(DeidMethod):
    """L-inf adversarial noise on each face region against surrogate FR models."""

    name = "adversarial"
    default_feather = 0.1
    #: :func:`facepriv.deid.deidentify` passes the loaded photo (``loaded=``): its bit depth sets
    #: the output levels, as in ``facepriv protect`` (:func:`facepriv.attacks.config.levels_for`)
    takes_loaded = True

    def __init__(self, *, attack: str = "pgd", surrogates: Sequence[str] | str = ("dlib-resnet", "facenet-casia"),
                 epsilon: float | str = 8 / 255, steps: int = 20, step_size: float | None = None,
                 target: str | Path | None = None, detector: str = "mtcnn", seed: int | None = 0,
                 ensemble: SurrogateEnsemble | None = None, **kw):
        super().__init__(**kw)
        if attack not in METHODS:
            raise ConfigError(f"adversarial: unknown attack {attack!r}; use one of {', '.join(METHODS)}")
        if isinstance(surrogates, str):
            surrogates = [s.strip() for s in surrogates.split(",") if s.strip()]
        if not surrogates and ensemble is None:
            raise ConfigError("adversarial: at least one surrogate model is needed")
        self.attack = attack
        self.surrogates = list(surrogates) if ensemble is None else list(ensemble.names)
        self.epsilon = min(1.0, parse_epsilon(epsilon) * self.strength)
        self.steps = int(steps)
        self.step_size = step_size
        self.target = Path(target) if target is not None else None
        self.detector_name = detector
        self.seed = seed
        self._ensemble = ensemble
        self._target_ref: dict[str, torch.Tensor] | None = None
        self.last_result: AttackResult | None = None
        if METHODS[attack].needs_target and self.target is None:
            raise ConfigError(f"adversarial: the {attack} attack needs a target image")
        self.config().resolved()  # validate the options now

    def config(self, loaded=None) -> AttackConfig:
        """The attack for one photo: quantised to its levels (65535 for a 16-bit file, else 255)."""
        return AttackConfig(method=self.attack, epsilon=self.epsilon, steps=self.steps, step_size=self.step_size,
                            region=self.region, feather=self.feather, seed=self.seed, quantize=levels_for(loaded))

    def _ensemble_on(self, device: torch.device) -> SurrogateEnsemble:
        if self._ensemble is None:
            self._ensemble = SurrogateEnsemble(self.surrogates, device=device)
        return self._ensemble

    def _target(self, ensemble: SurrogateEnsemble) -> dict[str, torch.Tensor] | None:
        if self.target is None:
            return None
        if self._target_ref is None:
            from ..core.io import load_image
            from ..models import create_model

            detector = create_model(self.detector_name)
            images = [load_image(p).rgb for p in target_images(self.target)]
            self._target_ref = reference_from_images(ensemble, images, detector)
        return self._target_ref

    def setup(self, device: str | torch.device = "cpu") -> Adversarial:
        """Load the surrogates (and the target's embeddings) on ``device`` once."""
        parent = getattr(super(), "setup", None)
        if parent is not None:
            parent(device)
        ensemble = self._ensemble_on(torch.device(device))
        self._target(ensemble)
        return self

    def apply(self, image: torch.Tensor, faces: list[Face], loaded=None) -> torch.Tensor:
        """``loaded``: the :class:`~facepriv.core.io.LoadedImage` ``image`` came from, if any
        (a 16-bit file keeps 16-bit levels); without it the output is on the 8-bit grid."""
        if not faces:
            return image.clone()
        ensemble = self._ensemble_on(image.device)
        res = attack_faces(image, faces, ensemble, self.config(loaded), target_ref=self._target(ensemble))
        self.last_result = res
        # what goes into the batch manifest: per face, steps and similarity after the attack
        self.last_info = {"attack": self.attack, "linf": round(res.linf, 6), "far": res.config.get("far"), "faces": [
            {k: row[k] for k in ("face", "status", "reason", "mode", "steps", "similarity", "target_cosine", "linf")
             if k in row}
            for row in res.per_face]}
        # a face the attack did not change (or that moved no surrogate) fails the photo, never "ok"
        ProtectionFailed.check(res.per_face, f"adversarial ({self.attack})")
        return res.image

    def describe(self) -> dict:
        return {**super().describe(), "attack": self.attack, "surrogates": self.surrogates,
                "epsilon": self.epsilon, "steps": self.steps,
                "target": str(self.target) if self.target is not None else None}
