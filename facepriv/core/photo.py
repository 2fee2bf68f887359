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
    the photo as failed and its manifest row keeps the boxes. The steps are public for commands
    that run their edit elsewhere (patch apply batches it across photos): :func:`load_and_detect`,
    :func:`no_face_result`, :func:`unprotected_result` and :func:`save_edited`.
    """
    img, faces, timings = load_and_detect(item, detector=detector, policy=policy, max_pixels=save.max_pixels)
    if not faces:
        return no_face_result(item, dst, img, policy=policy, save=save, timings=timings)
    t = time.perf_counter()
    x = img.to_tensor(device)
    try:
        y = edit(x, faces, img)
    except ProtectionFailed as exc:  # a face left unprotected: write nothing, report the photo as failed
        timings["edit_s"] = round(time.perf_counter() - t, 4)
        return unprotected_result(exc, faces, timings)
    timings["edit_s"] = round(time.perf_counter() - t, 4)
    return save_edited(img.with_pixels(y), dst, faces, save=save, timings=timings)


def load_and_detect(item: InputItem, *, detector: FaceDetector, policy: FacePolicy,
                    max_pixels: int | None = None) -> tuple[LoadedImage, list[Face], dict[str, float]]:
    """Load ``item`` and find the faces ``policy`` keeps; timings ``load_s`` and ``detect_s``."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    img = load_image(item.path, max_pixels=max_pixels)
    timings["load_s"] = round(time.perf_counter() - t, 4)
    t = time.perf_counter()
    faces = policy.select(detector.detect(img.rgb))
    timings["detect_s"] = round(time.perf_counter() - t, 4)
    return img, faces, timings


def no_face_status(policy: FacePolicy, path: str | Path) -> str:
    """What ``policy`` makes of an input without a face: ``"skipped"`` (write nothing) or
    ``"copied"`` (write it through); ``on_no_face="error"`` raises :class:`NoFaceError`."""
    if policy.on_no_face == "error":
        raise NoFaceError(f"no face found in {path}")
    return "skipped" if policy.on_no_face == "skip" else "copied"


def no_face_result(item: InputItem, dst: Path, img: LoadedImage, *, policy: FacePolicy, save: SaveOptions,
                   timings: dict, extra: dict | None = None) -> ItemResult:
    """The result of a photo without a face, by :func:`no_face_status`: nothing written, or
    ``img`` written through to ``dst`` unchanged (``save_s``); ``extra`` + ``reason: no face``."""
    status = no_face_status(policy, item.path)
    extra = {**(extra or {}), "reason": "no face"}
    if status == "skipped":
        return ItemResult(status="skipped", faces=0, timings=timings, extra=extra)
    t = time.perf_counter()
    save_image(img, dst, quality=save.quality, keep_metadata=save.keep_metadata)
    timings["save_s"] = round(time.perf_counter() - t, 4)
    return ItemResult(status="copied", output=dst, faces=0, timings=timings, extra=extra)


def unprotected_result(exc: ProtectionFailed, faces: list[Face], timings: dict) -> ItemResult:
    """The ``error`` result of a photo whose edit left faces unprotected: nothing written; the
    row keeps every face's box and names the ``unprotected`` ones."""
    return ItemResult(status="error", error=str(exc), faces=len(faces), timings=timings,
                      extra={"boxes": _boxes(faces), "unprotected": [r.get("face") for r in exc.faces]})


def save_edited(out: LoadedImage, dst: Path, faces: list[Face], *, save: SaveOptions, timings: dict,
                extra: dict | None = None) -> ItemResult:
    """Write the edited photo ``out`` to ``dst`` (``save_s``): the ``ok`` result, ``extra`` +
    the ``boxes`` of ``faces``."""
    t = time.perf_counter()
    save_image(out, dst, quality=save.quality, keep_metadata=save.keep_metadata)
    timings["save_s"] = round(time.perf_counter() - t, 4)
    return ItemResult(status="ok", output=dst, faces=len(faces), timings=timings,
                      extra={**(extra or {}), "boxes": _boxes(faces)})


def _boxes(faces: list[Face]) -> list[list[float]]:
    return [f.to_json()["box"] for f in faces]
