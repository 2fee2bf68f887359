"""``facepriv deid``: de-identification of every face in photos.

    >>> from facepriv.deid import create_method, deidentify
    >>> method = create_method("pixelate")
"""

from . import classical  # noqa: F401 - registers the classical methods
from .base import METHODS, DeidMethod, create_method, register_method
from .pipeline import DeidConfig, deidentify, run_deid

__all__ = ["METHODS", "DeidConfig", "DeidMethod", "create_method", "deidentify", "register_method", "run_deid"]
