"""Reference identities for impersonation: embeddings of a target photo's face."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..core.align import landmarks_tensor
from ..core.errors import ConfigError, NoFaceError
from ..core.faces import FaceDetector
from .identity import SurrogateEnsemble


def _as_rgb(image) -> tuple[np.ndarray, str]:
    """uint8 (H, W, 3) pixels and a name for messages, from an array, a PIL image or a path."""
    if isinstance(image, (str, Path)):
        from ..core.io import load_image

        return load_image(image).rgb, str(image)
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB")), "the target image"
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ConfigError(f"a target image must be RGB uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    return arr, "the target image"


def target_images(target: str | Path) -> list[Path]:
    """The photo(s) a ``--target`` names, for every command and method: the file itself, or the
    images in a folder and its sub-folders (suffixes :data:`facepriv.core.io.IMAGE_SUFFIXES`),
    sorted, leaving out dotfiles and anything inside a hidden folder (``.thumbnails/``)."""
    from ..core.io import IMAGE_SUFFIXES

    target = Path(target).expanduser()
    if target.is_dir():
        files = sorted(p for p in target.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(target).parts))
        if not files:
            raise ConfigError(f"--target folder {target} has no images ({', '.join(IMAGE_SUFFIXES)}; "
                              "dotfiles and hidden folders are left out)")
        return files
    if not target.is_file():
        raise ConfigError(f"--target {target} does not exist")
    return [target]


@torch.no_grad()
def reference_from_image(ensemble: SurrogateEnsemble, rgb_uint8, detector: FaceDetector) -> dict[str, torch.Tensor]:
    """Embeddings ``{surrogate: (1, D)}`` of the largest face in ``rgb_uint8``.

    ``rgb_uint8``: (H, W, 3) uint8 array (also accepted: a PIL image or a file path).
    Raises :class:`NoFaceError` when the detector finds no face.
    """
    rgb, name = _as_rgb(rgb_uint8)
    faces = detector.detect(rgb)
    if not faces:
        raise NoFaceError(f"no face found in {name}; a target for impersonation must show one face clearly")
    face = max(faces, key=lambda f: f.width * f.height)
    device = next((p.device for p in ensemble.parameters()), torch.device("cpu"))
    x = torch.tensor(rgb, device=device).permute(2, 0, 1).float().div_(255.0)
    emb = ensemble.embed(x, landmarks_tensor([face], device))
    return {k: v.detach() for k, v in emb.items()}


def reference_from_images(ensemble: SurrogateEnsemble, images: Sequence, detector: FaceDetector) -> dict[str, torch.Tensor]:
    """Stacked references ``{surrogate: (T, D)}`` of several target photos (one row each).

    For pgd / mifgsm / tidim the rows are averaged (photos of one target identity); for tipim
    each row is a candidate target identity.
    """
    if not images:
        raise ConfigError("no target images given")
    refs = [reference_from_image(ensemble, im, detector) for im in images]
    return {k: torch.cat([r[k] for r in refs], 0) for k in refs[0]}
