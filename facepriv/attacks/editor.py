"""The L-inf attack as a per-photo edit function: what ``protect -m pgd|...`` and ``deid -m adversarial`` run.

    >>> from facepriv.attacks import AttackConfig, AttackEditor
    >>> edit = AttackEditor(AttackConfig(method="mifgsm", steps=20), ["dlib-resnet", "facenet-casia"])
    >>> process_photo(item, dst, detector=detector, policy=policy, edit=edit, save=save)

One :class:`~facepriv.attacks.config.AttackConfig` says how to attack; the editor adds what to
attack against (the surrogate models, loaded once) and whom to impersonate (``target``: an image
or a folder of images, read once with ``detector``). Each photo is attacked at its own output
levels (:func:`~facepriv.attacks.config.levels_for`: 16-bit files keep 16-bit levels), and a
face the attack could not protect raises :class:`~facepriv.core.errors.ProtectionFailed`, so no
unprotected photo is written as protected.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..core.errors import ConfigError, ProtectionFailed
from ..core.faces import Face, FaceDetector
from ..core.io import load_image
from .config import METHODS, AttackConfig, AttackResult, levels_for
from .identity import SurrogateEnsemble
from .linf import attack_faces
from .reference import reference_from_images, target_images

DEFAULT_SURROGATES = ("dlib-resnet", "facenet-casia")


class AttackEditor:
    """``edit(x, faces, loaded) -> protected x`` over :func:`attack_faces` (see the module docstring).

    ``surrogates``: registry names (loaded on the first photo's device, or by :meth:`setup`) or a
    loaded :class:`SurrogateEnsemble`; ``detector``: a detector or a registry name, needed only to
    read ``target``; ``label`` starts the error of a photo with an unprotected face. After each
    call ``last_result`` holds the :class:`AttackResult`.
    """

    def __init__(self, config: AttackConfig, surrogates: Sequence[str] | SurrogateEnsemble = DEFAULT_SURROGATES, *,
                 target: str | Path | None = None, detector: FaceDetector | str | None = None,
                 label: str | None = None, progress=None):
        self.config = config.resolved()  # every option checked now, not at the first photo
        if isinstance(surrogates, torch.nn.Module):  # a loaded SurrogateEnsemble
            self.ensemble, self.surrogates = surrogates, list(surrogates.names)
        else:
            self.ensemble, self.surrogates = None, [s for s in surrogates]
            if not self.surrogates:
                raise ConfigError("at least one surrogate model is needed")
        self.target = Path(target) if target is not None else None
        if METHODS[self.config.method].needs_target and self.target is None:
            raise ConfigError(f"{self.config.method} is a targeted method: give --target (an image or a folder "
                              "of images)")
        self.detector = detector
        self.label = label or f"attack {self.config.method}"
        self.progress = progress
        self.target_ref: dict[str, torch.Tensor] | None = None
        self.last_result: AttackResult | None = None

    def setup(self, device: str | torch.device = "cpu") -> AttackEditor:
        """Load the surrogates on ``device`` and the target's embeddings, once."""
        if self.ensemble is None:
            self.ensemble = SurrogateEnsemble(self.surrogates, device=device)
        if self.target is not None and self.target_ref is None:
            self.target_ref = self._read_target()
        return self

    def _read_target(self) -> dict[str, torch.Tensor]:
        detector = self.detector
        if detector is None:
            raise ConfigError("a face detector is needed to read the target image")
        if isinstance(detector, str):
            from ..models import create_model

            detector = self.detector = create_model(detector)
        images = [load_image(p).rgb for p in target_images(self.target)]
        return reference_from_images(self.ensemble, images, detector)

    def config_for(self, loaded=None) -> AttackConfig:
        """The attack of one photo: this config at the photo's output levels."""
        return self.config.replace(quantize=levels_for(loaded))

    def attack(self, x: torch.Tensor, faces: list[Face], loaded=None) -> AttackResult:
        """Attack the faces of one photo; returns the full result (no check of the faces)."""
        self.setup(x.device)
        self.last_result = attack_faces(x, faces, self.ensemble, self.config_for(loaded), target_ref=self.target_ref,
                                        progress=self.progress)
        return self.last_result

    def check(self, res: AttackResult) -> torch.Tensor:
        """The protected image of ``res``; :class:`ProtectionFailed` if a face was left unprotected."""
        ProtectionFailed.check(res.per_face, self.label)
        return res.image

    def __call__(self, x: torch.Tensor, faces: list[Face], loaded=None) -> torch.Tensor:
        return self.check(self.attack(x, faces, loaded))
