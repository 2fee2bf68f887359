"""``adversarial``: de-identification by an imperceptible L-inf perturbation of each face.

Unlike blur or pixelate the face stays visually the same; recognition models (those used as
surrogates, and - less reliably - others) stop matching it to its identity (dodging), or match
it to a target identity instead (impersonation, ``target=``). The attack is
:func:`facepriv.attacks.attack_faces`, run by the same :class:`facepriv.attacks.AttackEditor`
and configured by the same :class:`facepriv.attacks.AttackConfig` as ``protect -m pgd|...``; this
class only adapts it to the :class:`DeidMethod` interface. ``strength`` scales ``epsilon``.

    >>> from facepriv.deid import create_method
    >>> import facepriv.deid.adversarial  # registers the method
    >>> m = create_method("adversarial", attack="mifgsm", steps=20)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..attacks import AttackConfig, AttackEditor, AttackResult, SurrogateEnsemble
from ..attacks.config import METHODS, parse_epsilon
from ..core.errors import ConfigError
from ..core.faces import Face
from .base import DeidMethod, register_method


@register_method
class Adversarial(DeidMethod):
    """L-inf adversarial noise on each face region against surrogate FR models.

    The options build one :class:`AttackConfig` (``attack`` is its method; ``region`` and
    ``feather`` the method's); ``config=`` passes a whole AttackConfig instead (its epsilon is
    still scaled by ``strength``; ``region``/``feather`` are the method's).
    """

    name = "adversarial"
    default_feather = 0.1
    #: :func:`facepriv.deid.deidentify` passes the loaded photo (``loaded=``): its bit depth sets
    #: the output levels, as in ``facepriv protect`` (:func:`facepriv.attacks.config.levels_for`)
    takes_loaded = True

    def __init__(self, *, attack: str = "pgd", surrogates: Sequence[str] | str = ("dlib-resnet", "facenet-casia"),
                 epsilon: float | str = 8 / 255, steps: int = 20, step_size: float | None = None,
                 target: str | Path | None = None, detector: str = "mtcnn", seed: int | None = 0,
                 ensemble: SurrogateEnsemble | None = None, config: AttackConfig | None = None, **kw):
        super().__init__(**kw)
        if config is None:
            config = AttackConfig(method=attack, epsilon=epsilon, steps=steps, step_size=step_size, seed=seed)
        if config.method not in METHODS:
            raise ConfigError(f"adversarial: unknown attack {config.method!r}; use one of {', '.join(METHODS)}")
        if isinstance(surrogates, str):
            surrogates = [s.strip() for s in surrogates.split(",") if s.strip()]
        if not surrogates and ensemble is None:
            raise ConfigError("adversarial: at least one surrogate model is needed")
        if METHODS[config.method].needs_target and target is None:
            raise ConfigError(f"adversarial: the {config.method} attack needs a target image")
        eps = min(1.0, parse_epsilon(config.epsilon) * self.strength)  # above 64/255: refused by the config
        config = config.replace(epsilon=eps, region=self.region, feather=self.feather)
        self.editor = AttackEditor(config, ensemble if ensemble is not None else list(surrogates), target=target,
                                   detector=detector, label=f"adversarial ({config.method})")
        self.attack, self.epsilon, self.steps = config.method, eps, int(config.steps)
        self.surrogates = list(self.editor.surrogates)
        self.target = self.editor.target

    @property
    def last_result(self) -> AttackResult | None:
        return self.editor.last_result

    def config(self, loaded=None) -> AttackConfig:
        """The attack for one photo: quantised to its levels (65535 for a 16-bit file, else 255)."""
        return self.editor.config_for(loaded)

    def setup(self, device: str | torch.device = "cpu") -> Adversarial:
        """Load the surrogates (and the target's embeddings) on ``device`` once."""
        parent = getattr(super(), "setup", None)
        if parent is not None:
            parent(device)
        self.editor.setup(torch.device(device))
        return self

    def apply(self, image: torch.Tensor, faces: list[Face], loaded=None) -> torch.Tensor:
        """``loaded``: the :class:`~facepriv.core.io.LoadedImage` ``image`` came from, if any
        (a 16-bit file keeps 16-bit levels); without it the output is on the 8-bit grid."""
        if not faces:
            return image.clone()
        res = self.editor.attack(image, faces, loaded)
        # what goes into the batch manifest: per face, steps and similarity after the attack
        self.last_info = {"attack": self.attack, "linf": round(res.linf, 6), "far": res.config.get("far"), "faces": [
            {k: row[k] for k in ("face", "status", "reason", "mode", "steps", "similarity", "target_cosine", "linf")
             if k in row}
            for row in res.per_face]}
        # a face the attack did not change (or that moved no surrogate) fails the photo, never "ok"
        return self.editor.check(res)

    def describe(self) -> dict:
        return {**super().describe(), "attack": self.attack, "surrogates": self.surrogates,
                "epsilon": self.epsilon, "steps": self.steps,
                "target": str(self.target) if self.target is not None else None}
