"""``facepriv deid``: de-identification of every face in photos and videos.

    >>> from facepriv.deid import create_method, deidentify
    >>> method = create_method("pixelate")

Methods (``METHODS``; one interface, :class:`~facepriv.deid.base.DeidMethod`): classical
(blur, pixelate, mask, eyebar, noise), k-Same (k-same-average, k-same-select,
k-same-pixelate), adversarial (imperceptible L-inf noise against FR models) and generative
(inpaint: RePaint or a diffusers inpainting pipeline, with identity and expression guards
and a classical fallback for faces that still match).
Videos: :func:`~facepriv.deid.video.deid_video`.
"""

from . import adversarial  # noqa: F401 - registers the adversarial (L-inf noise) method
from . import classical  # noqa: F401 - registers the classical methods
from . import generative  # noqa: F401 - registers the diffusion inpainting method
from . import ksame  # noqa: F401 - registers the k-Same methods
from .base import ALIASES, METHODS, DeidMethod, create_method, register_method
from .ksame import FacePool
from .pipeline import DeidConfig, build_methods, deidentify, run_deid
from .video import VideoOptions, deid_video, is_video

__all__ = ["ALIASES", "METHODS", "DeidConfig", "DeidMethod", "FacePool", "VideoOptions", "build_methods",
           "create_method", "deid_video", "deidentify", "is_video", "register_method", "run_deid"]
