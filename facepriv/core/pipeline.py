"""Load -> detect -> edit faces -> save: the per-photo step every command shares.

Commands (deid, protect, patch apply) provide only the edit function; this module applies the
face policy, the output options and the bookkeeping the batch runner records.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .batch import InputItem, ItemResult
from .errors import ConfigError, NoFaceError, ProtectionFailed
from .faces import Face, FaceDetector, FacePolicy
from .io import LoadedImage, load_image, resolve_max_pixels, save_image


@dataclass
class SaveOptions:
    """Output options. ``max_pixels``: the decompression-bomb limit for inputs; None means
    ``FACEPRIV_MAX_PIXELS`` or the built-in default (resolved here, so a malformed variable is
    reported before any work and the settings hash records the limit in force), 0 no limit."""

    quality: int = 95
    keep_metadata: bool = False
    max_pixels: int | None = None

    def __post_init__(self):
        if not 1 <= int(self.quality) <= 100:
            raise ConfigError(f"quality must be between 1 and 100, not {self.quality}")
        self.max_pixels = resolve_max_pixels(self.max_pixels)


EditFn = Callable[[torch.Tensor, list[Face], LoadedImage], torch.Tensor]


def process_photo(item: InputItem, dst: Path, *, detector: FaceDetector, policy: FacePolicy, edit: EditFn,
                  save: SaveOptions, device: torch.device | str = "cpu") -> ItemResult:
    """Run ``edit(image_tensor, faces, loaded)`` on one photo and write the result to ``dst``.

    ``image_tensor`` is float RGB (3, H, W) in [0, 1] on ``device``; ``edit`` returns the same.
    An ``edit`` that raises :class:`ProtectionFailed` (a face it could not protect) gets nothing
    written and an ``error`` result that names the faces (``unprotected``), so the batch counts
    the photo as failed and its manifest row keeps the boxes.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    img = load_image(item.path, max_pixels=save.max_pixels)
    timings["load_s"] = round(time.perf_counter() - t, 4)
    t = time.perf_counter()
    faces = policy.select(detector.detect(img.rgb))
    timings["detect_s"] = round(time.perf_counter() - t, 4)
    if not faces:
        if policy.on_no_face == "error":
            raise NoFaceError(f"no face found in {item.path}")
        if policy.on_no_face == "skip":
            return ItemResult(status="skipped", faces=0, timings=timings, extra={"reason": "no face"})
        t = time.perf_counter()
        save_image(img, dst, quality=save.quality, keep_metadata=save.keep_metadata)
        timings["save_s"] = round(time.perf_counter() - t, 4)
        return ItemResult(status="copied", output=dst, faces=0, timings=timings, extra={"reason": "no face"})
    t = time.perf_counter()
    x = img.to_tensor(device)
    boxes = [f.to_json()["box"] for f in faces]
    try:
        y = edit(x, faces, img)
    except ProtectionFailed as exc:  # a face left unprotected: write nothing, report the photo as failed
        timings["edit_s"] = round(time.perf_counter() - t, 4)
        return ItemResult(status="error", error=str(exc), faces=len(faces), timings=timings,
                          extra={"boxes": boxes, "unprotected": [r.get("face") for r in exc.faces]})
    timings["edit_s"] = round(time.perf_counter() - t, 4)
    t = time.perf_counter()
    save_image(img.with_pixels(y), dst, quality=save.quality, keep_metadata=save.keep_metadata)
    timings["save_s"] = round(time.perf_counter() - t, 4)
    return ItemResult(status="ok", output=dst, faces=len(faces), timings=timings,
                      extra={"boxes": boxes})
