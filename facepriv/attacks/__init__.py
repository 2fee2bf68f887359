"""Adversarial attacks on face-recognition models, used to protect photos.

    >>> from facepriv.attacks import AttackConfig, SurrogateEnsemble, attack_faces
    >>> ens = SurrogateEnsemble(["dlib-resnet", "facenet-casia"])
    >>> result = attack_faces(x, faces, ens, AttackConfig(method="mifgsm", steps=20))

* :mod:`.identity` - the surrogate ensemble and the identity objectives;
* :mod:`.editor` - :class:`AttackEditor`, the attack as a per-photo edit (protect's baselines,
  deid's adversarial method);
* :mod:`.linf` - L-inf attacks (PGD, MI-FGSM, TI-DIM, TIP-IM) on the original photo's pixels;
* :mod:`.reference` - target identities from photos.
"""

from .config import METHOD_NAMES, METHODS, AttackConfig, AttackResult, MethodTraits, method_traits, parse_epsilon
from .editor import AttackEditor
from .identity import IdentityReference, SurrogateEnsemble, cosine_report, identity_loss
from .linf import attack_faces, quantize_within, surrogate_thresholds
from .reference import reference_from_image, reference_from_images, target_images

__all__ = [
    "METHOD_NAMES",
    "METHODS",
    "MethodTraits",
    "AttackConfig",
    "AttackEditor",
    "AttackResult",
    "IdentityReference",
    "SurrogateEnsemble",
    "attack_faces",
    "cosine_report",
    "identity_loss",
    "method_traits",
    "parse_epsilon",
    "quantize_within",
    "reference_from_image",
    "reference_from_images",
    "surrogate_thresholds",
    "target_images",
]
