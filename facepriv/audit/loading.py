"""Loading what the audit runs (recognition models, face detector, expression model, thresholds)
and embedding every photo once."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError
from ..models.thresholds import ThresholdSet, resolve_thresholds
from . import inputs as inp
from .common import image_size, size_ratio
from .config import EXPRESSION_MODEL, AuditConfig
from .embed import FaceEmbeddingCache


def load_recognizers(names: list[str], device) -> dict:
    from ..models import create_model, get_spec

    out = {}
    for n in names:
        spec = get_spec(n)
        if spec.task != "recognition":
            raise ConfigError(f"{n} is a {spec.task} model, not a face-recognition model")
        out[spec.name] = create_model(spec.name, device=device)
    return out


@dataclass
class AuditModels:
    """Everything but the recognition models that the audit runs, and how it got them."""

    detector: object | None  # faces of every photo; with --aligned, only "face still detected"
    detector_injected: bool
    utility_detector: object | None  # --aligned --utility: the detector run on the padded crops
    utility_detector_error: str | None  # ... why it could not be loaded
    expression: object | None
    expression_injected: bool
    thresholds: dict[str, ThresholdSet]
    cache: FaceEmbeddingCache


def _load_detector(cfg: AuditConfig, device, detector) -> tuple[object | None, str | None]:
    """The face detector (``detector`` where the caller gave one) and, for pre-aligned crops,
    why it could not be loaded. Pre-aligned crops need no detector, except for the utility check
    "face still detected" (a crop is one face by construction: only a real detector can say
    whether it still is); without it the rest of the audit runs and the utility section says
    what is missing."""
    if detector is None and not cfg.aligned:
        from ..models import create_model

        return create_model(cfg.detector, device=device), None
    if detector is None and cfg.utility:
        from ..models import create_model

        try:
            return create_model(cfg.detector, device=device), None
        except Exception as exc:  # noqa: BLE001 - weights missing offline, a bad name, ...
            return None, f"{cfg.detector} could not be loaded: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return detector, None


def _load_thresholds(cfg: AuditConfig, models: dict) -> dict[str, ThresholdSet]:
    file_data = None
    if cfg.thresholds is not None:
        from ..models.thresholds import _read_threshold_file

        file_data = _read_threshold_file(cfg.thresholds)
    return {name: resolve_thresholds(name, spec=getattr(m, "spec", None), file=cfg.thresholds, file_data=file_data)
            for name, m in models.items()}


def load_models(cfg: AuditConfig, device, models: dict, detector=None, expression_model=None) -> AuditModels:
    """The detector, thresholds, expression model (``--utility``) and the embedding cache for
    the recognition ``models``; ``detector`` / ``expression_model`` replace the registry's."""
    detector_injected = detector is not None
    detector, utility_detector_error = _load_detector(cfg, device, detector)
    expression_injected = expression_model is not None
    thresholds = _load_thresholds(cfg, models)
    embed_models = dict(models)
    if cfg.utility:
        if expression_model is None:
            from ..models import create_model

            expression_model = create_model(EXPRESSION_MODEL, device=device)
        embed_models[EXPRESSION_MODEL] = expression_model
    cache = FaceEmbeddingCache(embed_models, detector=None if cfg.aligned else detector, device=device,
                               batch_size=cfg.batch_size, aligned=cfg.aligned, aligned_template=cfg.aligned_template,
                               amp=cfg.amp, workers=cfg.workers, min_face_size=cfg.min_face_size,
                               max_pixels=cfg.max_pixels)
    return AuditModels(detector=detector, detector_injected=detector_injected,
                       utility_detector=detector if cfg.aligned and cfg.utility else None,
                       utility_detector_error=utility_detector_error, expression=expression_model,
                       expression_injected=expression_injected, thresholds=thresholds, cache=cache)


def embed_photos(cfg: AuditConfig, cache: FaceEmbeddingCache, pairs: list[inp.FilePair], clean_paths: list[Path]
                 ) -> tuple[dict[Path, np.ndarray], float]:
    """Embed the clean photos, then the protected ones (with ``--landmarks original``, at their
    original's landmarks, scaled to the protected photo's size). Returns those landmarks by
    resolved protected path and the seconds taken."""
    t_embed = time.perf_counter()
    cache.process(clean_paths, progress=cfg.progress, description="clean photos")
    extra = {}
    if cfg.landmarks == "original":
        for fp in pairs:
            o = cache.get(fp.original)
            if o.faces:
                lms = np.stack([f.landmarks for f in o.faces]).astype(np.float32)
                sx, sy = size_ratio(o.size, image_size(fp.protected))
                extra[fp.protected.resolve()] = lms / np.array([sx, sy], dtype=np.float32)
    cache.process([fp.protected for fp in pairs], extra=extra, progress=cfg.progress, description="protected photos")
    return extra, time.perf_counter() - t_embed
