"""What the per-image pass collects for the report: per-model score lists and counters
(:class:`ModelTally`) and the face counts (:class:`FaceCounts`, a report section)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .schema import FaceCounts  # noqa: F401 - counted here, a section of the report

PROTOCOLS = ("other-photos", "self")  # dodging: vs other clean photos of the person | vs its own original
SELF_REASONS = ("identity-unknown", "no-other-photo", "secondary-face")  # why a face fell back to "self"
TARGET_EXCLUSIONS = ("own-original", "source-identity")  # why a target was left out of an image's impersonation


def _counts(keys: tuple[str, ...]) -> dict[str, int]:
    return {k: 0 for k in keys}


@dataclass
class ProtocolScores:
    """Dodging scores of one protocol: every attempt, and each face's best (None: not detected)."""

    after: list = field(default_factory=list)
    face: list = field(default_factory=list)


@dataclass
class ModelTally:
    """Scores and counts of one recognition model over every image. Score lists hold a float per
    comparison (None where the protected face was not detected: counts as protected / failed).
    The counters are keyed by the report's own names (:data:`PROTOCOLS`, :data:`SELF_REASONS`,
    :data:`TARGET_EXCLUSIONS`) and go into it as they are."""

    dod_after: list = field(default_factory=list)  # dodging, protected face, both protocols
    dod_before: list = field(default_factory=list)  # dodging, clean original (other-photos protocol only)
    dod_face: list = field(default_factory=list)  # dodging, best score per face
    imp_after: list = field(default_factory=list)  # impersonation, protected face
    imp_before: list = field(default_factory=list)  # impersonation, clean original
    imp_face: list = field(default_factory=list)  # impersonation, best score per face
    rank_before: list = field(default_factory=list)  # identification ranks of the clean originals
    rank_after: list = field(default_factory=list)  # ... and of the protected photos
    protocol: dict[str, int] = field(default_factory=lambda: _counts(PROTOCOLS))  # faces per dodging protocol
    dod_by: dict[str, ProtocolScores] = field(default_factory=lambda: {k: ProtocolScores() for k in PROTOCOLS})
    self_reasons: dict[str, int] = field(default_factory=lambda: _counts(SELF_REASONS))
    imp_excluded: dict[str, int] = field(default_factory=lambda: _counts(TARGET_EXCLUSIONS))
