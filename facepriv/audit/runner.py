"""``run_audit(AuditConfig(...)) -> report``: how well protected photos resist face recognition.

Protocols (per recognition model, thresholds at FAR 1e-1 / 1e-2 / 1e-3):

* **Dodging (verification).** When the identity of a photo is known (identities CSV, gallery
  folders or a pairs file), its protected face is compared with every *other* clean photo of
  the same person (never the original of the same file): one verification attempt per
  (protected face, clean photo) pair; PSR = share of attempts below the threshold. When the
  identity is unknown (or the person has no other photo) the protected face is compared with
  its own original (the weaker *self-verification* protocol); each row says which protocol
  it used, the report splits the two (``dodging.by_protocol``) and notes how many faces fell
  back to self-verification. The headline ``psr`` counts the attempts of both protocols. The
  other-photo comparisons with the clean original in place of the protected photo give the
  "before" baseline (the clean false-reject rate); self-verification has no "before", so the
  ROC and the before/after histograms use the other-photo comparisons only.
* **Impersonation.** Each protected face against every target photo except the one(s) used
  to protect (``target_used``, required unless ``allow_target_reuse`` is set, which the report
  notes); PSR = share reaching the threshold. A target photo byte-identical to the image's own
  original, and for the labelled face a target photo of the same
  identity as the source person, is left out of that image's impersonation (flagged on the
  row, counted in ``impersonation.excluded`` and noted).
* **Identification.** Rank of the true identity among the gallery identities (best score per
  identity) for the clean original and the protected photo; rank-1 / rank-5 before and after.
  Gallery photos identical to the original are left out.

Whole photos may hold several faces: original and protected faces are matched by box IoU,
after the protected boxes are scaled by original size / protected size (a protected photo
saved at another size); pre-aligned crops (``aligned``) hold one face each and are paired
directly. A face the detector no longer finds in the protected photo counts as protected (dodging) /
failed (impersonation), and is counted separately (``faces.not_detected``). The identity
label of an image refers to its largest face; other faces use self-verification.

:func:`run_audit` runs the steps, each in a module of its own: :mod:`.config` (the
configuration), :mod:`.loading` (models, thresholds, embedding), :mod:`.identities` (labels,
reference pool, targets, gallery), :mod:`.images` (the per-image pass) with :mod:`.protocols`
(dodging, impersonation, identification) and :mod:`.tally`, :mod:`.aggregate` (per-model
figures, ROC), :mod:`.utility`, :mod:`.quality`, :mod:`.api_run` (online services),
:mod:`.notes` and :mod:`.versions`; the report they fill is :class:`.schema.AuditReport`. This
module re-exports their names.
"""

from __future__ import annotations

import time

from ..core.device import resolve_device
from ..core.errors import ConfigError
from . import inputs as inp, loading
from .aggregate import model_summaries
from .api_run import build_apis
from .config import EXPRESSION_MODEL, AuditConfig
from .identities import GallerySet, TargetSet, _Identities, label_images, resolve_targets
from .images import AuditContext, audit_images
from .loading import embed_photos, load_models, load_recognizers
from .metrics import QualityMeter
from .notes import (_aligned_utility_notes, _protocol_notes, _thin_statistics_notes, name_label_note,
                    sampled_refs_note, threshold_notes)
from .protocols import identification
from .quality import measure_quality
from .schema import (ApiResult, AuditReport, Counts, ImageRow, ModelResult, QualitySummary, ThresholdEntry,
                     UtilitySummary, Versions)
from .utility import _utility_summary, aligned_face_detection
from .versions import model_versions

# Re-exported: the names code and tests import from this module (it held the whole audit once).
from ..core.io import load_image  # noqa: F401
from .aggregate import MAX_IMPOSTOR_PAIRS, _dodging_stats, _roc_entry  # noqa: F401
from .api_run import _api_status, _api_summary, _run_apis  # noqa: F401
from .common import _r, _rel_label, _sim, image_size, size_ratio  # noqa: F401
from .config import _abs  # noqa: F401
from .embed import FaceEmbeddingCache, ImageFaces, model_metric  # noqa: F401
from .identities import REF_SEED, sample_refs  # noqa: F401
from .protocols import RANK_CELLS, RANK_CHUNK, gallery_ranks  # noqa: F401
from .quality import QUALITY_CHUNK_PIXELS, _quality  # noqa: F401
from .tally import PROTOCOLS, SELF_REASONS, TARGET_EXCLUSIONS, FaceCounts, ModelTally  # noqa: F401
from .utility import UTILITY_PAD, _utility, pad_for_detection  # noqa: F401
from .versions import _model_entry, registry_weights  # noqa: F401
from .metrics import expression_change, match_faces, mean_or_none, psr, rank_k  # noqa: F401
from ..core.progress import make_progress  # noqa: F401
from ..models.thresholds import FARS, ThresholdSet, calibration_mismatch, resolve_thresholds, roc_curve  # noqa: F401


def run_audit(cfg: AuditConfig, *, recognizers: dict | None = None, detector=None, apis: dict | None = None,
              quality_meter: QualityMeter | None = None, expression_model=None) -> dict:
    """Run the audit described by ``cfg``; returns the report as a dict (the JSON form of the
    :class:`~facepriv.audit.schema.AuditReport` it builds, and writes when ``cfg.out``).

    ``recognizers`` / ``detector`` / ``apis`` / ``quality_meter`` / ``expression_model`` replace
    the registry models or API adapters (for library use and tests).
    """
    t_start = time.perf_counter()
    # online adapters first: a missing key / boto3 / config file is a usage error before any work
    adapters = dict(apis) if apis is not None else build_apis(cfg)
    device = resolve_device(cfg.device)
    pairs, errors = inp.match_files(cfg.protected, cfg.original, glob=cfg.glob)
    if cfg.max_images:
        pairs = pairs[: cfg.max_images]
    if not pairs:
        raise ConfigError(f"no protected image under {cfg.protected} has an original under {cfg.original}")
    digest = inp.DigestCache()
    gallery = inp.read_gallery(cfg.gallery, glob=cfg.glob) if cfg.gallery is not None else []
    idents = _Identities(cfg, digest, gallery)

    # ---- models
    models = dict(recognizers) if recognizers is not None else load_recognizers(cfg.models, device)
    loaded = load_models(cfg, device, models, detector, expression_model)
    cache, thresholds = loaded.cache, loaded.thresholds

    # ---- identities, the clean reference pool, the targets
    notes: list[str] = []
    pair_ident, pool = label_images(pairs, gallery, idents, digest)
    known = sum(1 for v in pair_ident.values() if v[0] is not None)
    notes += name_label_note(len(idents.by_name))
    targets = resolve_targets(cfg, digest, notes)

    # ---- embed everything
    clean_paths = [fp.original for fp in pairs] + [p for p, _ in pool.entries] + [g.path for g in gallery] + targets
    extra, embed_seconds = embed_photos(cfg, cache, pairs, clean_paths)
    gal = GallerySet.build(gallery, cache, digest, models, idents.gallery_ids, notes)
    tgt = TargetSet.build(cfg, targets, cache, digest, models, idents)

    # ---- every image under each protocol, then identification of all probes at once
    aligned_detection = (aligned_face_detection(cfg, pairs, loaded.utility_detector)
                         if loaded.utility_detector is not None else {})
    ctx = AuditContext(cfg=cfg, models=models, thresholds=thresholds, cache=cache, digest=digest,
                       pool_by_id=pool.by_identity(), gallery=gal, targets=tgt, extra=extra,
                       expression=loaded.expression, aligned_detection=aligned_detection,
                       utility_detector_error=loaded.utility_detector_error, with_apis=bool(adapters))
    res = audit_images(ctx, pairs, pair_ident, errors)
    identification(res.id_probes, gal, models, res.tallies)
    notes += sampled_refs_note(res.refs_sampled, cfg.max_refs)
    report_models, scores = model_summaries(res.tallies, thresholds, models, cache, pool.entries,
                                            gal if gallery else None, impersonation=bool(tgt.ok))
    notes += _protocol_notes(res.tallies, known, bool(tgt.ok))

    # ---- quality
    quality_injected = quality_meter is not None
    quality, quality_meter = measure_quality(cfg, pairs, res.rows, device, quality_meter)
    notes += _thin_statistics_notes(report_models, thresholds)
    if cfg.utility and cfg.aligned:
        notes += _aligned_utility_notes(aligned_detection, cfg.detector)

    # ---- the report
    report = AuditReport(
        created=time.strftime("%Y-%m-%dT%H:%M:%S"), config=cfg.to_json(),
        versions=Versions.from_json(_versions(cfg, models, loaded, recognizers is not None, quality_meter,
                                              quality_injected)),
        thresholds={m: ThresholdEntry.from_json(t.to_json()) for m, t in thresholds.items()},
        models={m: ModelResult.from_json(e) for m, e in report_models.items()},
        quality=QualitySummary.from_json(quality), faces=res.faces,
        counts=Counts(pairs=len(pairs), evaluated=sum(1 for r in res.rows if not r["error"]), identities_known=known,
                      reference_photos=len(pool.entries), targets=len(tgt.ok), gallery_images=len(gal.ok)),
        protocol_notes=notes + threshold_notes(cfg, thresholds), scores=scores, errors=errors)
    if cfg.utility:
        report.utility = UtilitySummary.from_json(
            _utility_summary(res.utility_rows, res.faces.to_json(), cfg.aligned, cfg.detector))
        if loaded.utility_detector_error:
            report.utility.face_detected_rate = None
            report.utility.unavailable = {"face_detection": loaded.utility_detector_error}
    if adapters:  # the services add their comparisons to the rows
        report.apis = {n: ApiResult.from_json(a) for n, a in _run_apis(cfg, res.rows, res.api_jobs, adapters).items()}
    report.images = [ImageRow.from_json(r) for r in res.rows]
    report.timings = {"total_s": round(time.perf_counter() - t_start, 3), "embedding_s": round(embed_seconds, 3),
                      **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in cache.timings.items()}}
    report.calibration = {m: t.calibration for m, t in thresholds.items() if t.calibration}
    report = report.redacted()
    if cfg.out is not None:
        from .report import write_reports

        report.outputs = {k: str(v) for k, v in write_reports(report, cfg.out, cfg).items()}
    return report.to_json()


def _versions(cfg: AuditConfig, models: dict, loaded: loading.AuditModels, recognizers_injected: bool,
              quality_meter, quality_injected: bool) -> dict:
    """report.json ``versions``: the detector is named where it ran (every photo; with
    ``--aligned``, only on the padded crops of ``--utility``)."""
    aligned_without_detector = cfg.aligned and loaded.utility_detector is None
    return model_versions(
        models, None if aligned_without_detector else cfg.detector, injected=recognizers_injected,
        detector_role=(None if aligned_without_detector else "utility: face still detected in the padded crops"
                       if cfg.aligned else "faces of every photo"),
        detector_injected=loaded.detector_injected, expression=loaded.expression if cfg.utility else None,
        expression_amp=loaded.cache.amp_report().get(EXPRESSION_MODEL) if cfg.utility else None,
        expression_injected=loaded.expression_injected, quality_meter=quality_meter,
        quality_injected=quality_injected)
