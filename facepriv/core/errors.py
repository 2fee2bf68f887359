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


class ProtectionFailed(FaceprivError):
    """A face was left unprotected: the attack changed none of its pixels, or moved no surrogate.

    ``faces``: the per-face report rows (see :func:`facepriv.attacks.attack_faces`) of the faces
    that failed. Raised from an edit function, it makes :func:`facepriv.core.photo.process_photo`
    write nothing and report the photo as an error.
    """

    def __init__(self, message: str, faces: list[dict] | None = None):
        super().__init__(message)
        self.faces = list(faces or [])

    @classmethod
    def check(cls, per_face: list[dict], what: str = "the attack") -> None:
        """Raise when a row of ``per_face`` has a status other than ``attacked`` (failed, skipped)."""
        bad = [r for r in per_face if r.get("status") != "attacked"]
        if bad:
            which = ", ".join(f"face {r.get('face', '?')} ({r.get('reason') or r.get('status')})" for r in bad)
            raise cls(f"{what} left {len(bad)} of {len(per_face)} face(s) unprotected: {which}", bad)
