"""Detected faces and the detector interface.

A detector takes an RGB ``uint8`` image ``(H, W, 3)`` and returns :class:`Face` objects with a
box, a score and five landmarks in a fixed order, in image pixel coordinates:

    0 left eye, 1 right eye, 2 nose tip, 3 left mouth corner, 4 right mouth corner

"left" means the left side **of the image** (the subject's right), as in MTCNN and the
ArcFace template. Detectors that report another order must reorder to this one.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass
class Face:
    box: np.ndarray  # (4,) float32: x1, y1, x2, y2
    landmarks: np.ndarray  # (5, 2) float32, order LANDMARK_NAMES
    score: float
    extra: dict = field(default_factory=dict)

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def size(self) -> float:
        """Shorter side of the box in pixels (what --min-face-size compares against)."""
        return min(self.width, self.height)

    def to_json(self) -> dict:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
            "score": round(float(self.score), 4),
        }


class FaceDetector(ABC):
    """Interface every face detector implements."""

    name: str = "detector"

    @abstractmethod
    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 image, best first."""

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Face]]:
        return [self.detect(im) for im in images]


class CachedDetector(FaceDetector):
    """A detector that never detects the same image twice: the faces of an image already seen
    (by pixel hash) are served again, those of a new one come from ``detector`` and are kept.
    For a first pass over the photos (MAP's scan, a k-Same pool made of the inputs) whose faces
    the photo's own turn reuses. :meth:`detect_batch` (video frames, never seen twice) goes
    straight to ``detector``.
    """

    def __init__(self, detector: FaceDetector):
        self.detector = detector
        self.name = getattr(detector, "name", "detector")
        self.cache: dict[str, list[Face]] = {}

    @staticmethod
    def key(image: np.ndarray) -> str:
        return f"{image.shape}:{hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).hexdigest()}"

    def detect(self, image: np.ndarray) -> list[Face]:
        k = self.key(image)
        if k not in self.cache:
            self.cache[k] = self.detector.detect(image)
        return list(self.cache[k])

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Face]]:
        return self.detector.detect_batch(images)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of (n, 4) and (m, 4) x1, y1, x2, y2 boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


ON_NO_FACE = ("skip", "copy", "error")


@dataclass
class FacePolicy:
    """Which detected faces a command works on, and what to do when there are none.

    on_no_face: ``skip`` (write nothing), ``copy`` (write the image through unchanged, metadata
    still stripped) or ``error`` (count the file as failed). max_faces keeps the largest N;
    min_face_size drops faces whose box's shorter side is smaller (pixels).
    """

    on_no_face: str = "copy"
    max_faces: int | None = None
    min_face_size: float = 20.0

    def __post_init__(self):
        if self.on_no_face not in ON_NO_FACE:
            raise ConfigError(f"--on-no-face must be one of {', '.join(ON_NO_FACE)}, not {self.on_no_face!r}")
        if self.max_faces is not None and self.max_faces < 1:
            raise ConfigError("--max-faces must be at least 1")

    def select(self, faces: list[Face]) -> list[Face]:
        kept = [f for f in faces if f.size >= self.min_face_size]
        if self.max_faces is not None:
            kept = sorted(kept, key=lambda f: f.width * f.height, reverse=True)[: self.max_faces]
        return kept
