"""Imports every built-in model family so that each registers its specs."""

from . import (  # noqa: F401
    detectors,
    diffusion,
    dlib_resnet,
    expression,
    facenet,
    metrics,
    protocol_fr,
    sface,
)
