"""``facepriv audit calibrate``: FAR thresholds, ROC, AUC and EER from labelled clean pairs.

The pairs file is LFW's ``pairs.txt`` as distributed (images under ``--root``/<Name>/<Name>_NNNN.jpg)
or a list of labelled pairs (``file_x,file_y,label``, comma/semicolon/tab/space separated);
see :func:`~facepriv.audit.inputs.read_pairs`. Each image is read once; its largest face is
embedded by every model.
Pairs where either image has no detected face are left out (and counted); when that leaves no
genuine or no impostor pair, calibration stops with a :class:`ConfigError` saying what to add
(exit 2 on the command line). The thresholds are
stored per model under ``FACEPRIV_HOME/thresholds/<model>.json`` (and/or one JSON file given
with ``out``), and later audits use them automatically for models without published protocol
thresholds. Each record keeps the detector and alignment mode it was computed with; an audit
that reuses it under other ones says so in its notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.device import resolve_device
from ..core.errors import ConfigError
from .embed import FaceEmbeddingCache, model_metric
from .inputs import read_pairs
from ..models.thresholds import calibrate_scores, calibration_record, missing_pairs_message, store_calibration


@dataclass
class CalibrationConfig:
    pairs: Path
    models: list[str]
    root: Path | None = None
    out: Path | None = None  # one JSON with every model's calibration
    store: bool = True  # write FACEPRIV_HOME/thresholds/<model>.json
    detector: str = "mtcnn"
    aligned: bool = False
    aligned_template: str = "arcface-112"
    device: str = "auto"
    batch_size: int = 32
    workers: int = 2
    min_face_size: float = 20.0
    progress: bool = True


def checked_pairs(cfg: CalibrationConfig) -> list:
    """The pairs of ``cfg.pairs``; a :class:`ConfigError` naming the first missing image (and its
    line) and the image root the file's format expects when any image does not exist."""
    pairs = read_pairs(cfg.pairs, cfg.root)
    missing: dict[Path, int] = {}  # file -> first line naming it
    for lp in pairs:
        for p in (lp.a, lp.b):
            if p not in missing and not p.is_file():
                missing[p] = lp.line
    if missing:
        first, line = next(iter(missing.items()))
        where = f"line {line} of {Path(cfg.pairs).name}" if line else Path(cfg.pairs).name
        hint = getattr(pairs, "root_hint", "") or "use --root to say where the pairs' relative paths start"
        raise ConfigError(f"{len(missing)} image(s) named by the pairs file do not exist, e.g. {first} ({where}); "
                          f"{hint}")
    return pairs


def pair_scores(cfg: CalibrationConfig, models: dict, cache: FaceEmbeddingCache,
                pairs: list | None = None) -> tuple[dict, dict]:
    """Genuine / impostor similarity lists per model, and counts of skipped pairs."""
    from ..models.recognition import similarity

    if pairs is None:
        pairs = checked_pairs(cfg)
    res = cache.process([p for lp in pairs for p in (lp.a, lp.b)], progress=cfg.progress,
                        description="calibration photos")
    scores = {m: {"genuine": [], "impostor": []} for m in models}
    skipped = {"no_face": 0, "error": 0, "pairs": len(pairs)}
    for lp in pairs:
        ra, rb = res[lp.a.resolve()], res[lp.b.resolve()]
        if ra.error or rb.error:
            skipped["error"] += 1
            continue
        if not ra.faces or not rb.faces:
            skipped["no_face"] += 1
            continue
        for m, model in models.items():
            s = float(similarity(ra.embeddings[m][:1], rb.embeddings[m][:1], model_metric(model))[0])
            scores[m]["genuine" if lp.same else "impostor"].append(s)
    n_gen = sum(1 for lp in pairs if lp.same)
    n_imp = len(pairs) - n_gen
    usable = next(iter(scores.values()), {"genuine": [], "impostor": []})
    if models and (not usable["genuine"] or not usable["impostor"]):
        left_out = skipped["no_face"] + skipped["error"]
        why = (f" ({skipped['no_face']} pair(s) left out without a detected face, {skipped['error']} unreadable)"
               if left_out else "")
        raise ConfigError(missing_pairs_message(
            len(usable["genuine"]), len(usable["impostor"]),
            where=f"the pairs file {Path(cfg.pairs).name} ({n_gen} same / {n_imp} different pairs{why})"))
    return scores, skipped


def run_calibration(cfg: CalibrationConfig, *, recognizers: dict | None = None, detector=None) -> dict:
    """Calibrate every model on the pairs; returns {model: calibration record} (+ stored paths)."""
    from .runner import load_recognizers

    pairs = checked_pairs(cfg)  # a bad pairs file fails before any model loads
    device = resolve_device(cfg.device)
    models = dict(recognizers) if recognizers is not None else load_recognizers(cfg.models, device)
    if detector is None and not cfg.aligned:
        from ..models import create_model

        detector = create_model(cfg.detector, device=device)
    cache = FaceEmbeddingCache(models, detector=detector, device=device, batch_size=cfg.batch_size,
                               aligned=cfg.aligned, aligned_template=cfg.aligned_template, workers=cfg.workers,
                               min_face_size=cfg.min_face_size)
    scores, skipped = pair_scores(cfg, models, cache, pairs)
    out: dict = {}
    for m, model in models.items():
        spec = getattr(model, "spec", None)
        default = (getattr(spec, "thresholds", {}) or {}).get("default")
        cal = calibrate_scores(scores[m]["genuine"], scores[m]["impostor"], default_threshold=default)
        rec = calibration_record(m, cal, pairs_file=cfg.pairs, spec=spec,
                                 extra={"skipped_pairs": skipped, "detector": None if cfg.aligned else cfg.detector,
                                        "aligned": bool(cfg.aligned),
                                        "aligned_template": cfg.aligned_template if cfg.aligned else None,
                                        "genuine_scores": [round(v, 6) for v in scores[m]["genuine"]],
                                        "impostor_scores": [round(v, 6) for v in scores[m]["impostor"]]})
        if cfg.store:
            rec["stored"] = str(store_calibration(m, rec))
        out[m] = rec
    if cfg.out is not None:
        import json

        from ..core.io import atomic_write_bytes

        atomic_write_bytes(Path(cfg.out), json.dumps({"models": out}, indent=1).encode())
    return out
