"""Exceptions facepriv raises on purpose. Each carries a message meant for the user."""

from __future__ import annotations


class FaceprivError(Exception):
    """Base class: an expected failure with a clear message (no traceback needed)."""


class ImageLoadError(FaceprivError):
    """An input file could not be read as an image (corrupt, truncated, not an image, too big)."""


class ImageTooLargeError(ImageLoadError):
    """The image has more pixels than the configured limit (decompression-bomb guard)."""


class NoFaceError(FaceprivError):
    """No face was found where one was required (``--on-no-face error``)."""


class ConfigError(FaceprivError):
    """Bad configuration or option combination."""
