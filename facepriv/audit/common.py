"""Small helpers shared by the audit's steps: image sizes, similarity, rounding, labels."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .config import AuditConfig


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image as :func:`~facepriv.core.io.load_image` returns it (EXIF
    orientation applied), read from the header only; None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - the embedding pass reports unreadable files
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def size_ratio(original: tuple[int, int], protected: tuple[int, int]) -> tuple[float, float]:
    """(sx, sy) mapping protected-image pixels to original-image pixels."""
    if not original or not protected or not all(original) or not all(protected):
        return 1.0, 1.0
    return original[0] / protected[0], original[1] / protected[1]


def _sim(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    from ..models.recognition import similarity_matrix

    return similarity_matrix(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), metric)


def _r(v, nd: int = 6):
    if v is None:
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return v
    return round(float(v), nd)


def _rel_label(path: Path, cfg: AuditConfig) -> str:
    for root in (cfg.original, cfg.gallery, cfg.pairs_root or (cfg.pairs.parent if cfg.pairs else None), cfg.target):
        if root is not None and root.is_dir():
            try:
                return Path(path).resolve().relative_to(root.resolve()).as_posix()
            except ValueError:
                continue
    return Path(path).name
