"""The per-image pass: each protected photo's faces matched with its original's and scored by
every recognition model under each protocol (:mod:`~facepriv.audit.protocols`), with its
utility and the comparisons it sends to the online services."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..models.thresholds import FARS, ThresholdSet
from . import inputs as inp
from .api_run import api_jobs
from .common import _r, _rel_label, size_ratio
from .config import AuditConfig
from .embed import FaceEmbeddingCache, ImageFaces, model_metric
from .identities import GallerySet, TargetSet, sample_refs
from .metrics import match_faces
from .protocols import IdentificationProbe, dodging, impersonation
from .tally import FaceCounts, ModelTally
from .utility import _utility


@dataclass
class AuditContext:
    """What every image is scored against, prepared before the per-image pass."""

    cfg: AuditConfig
    models: dict  # recognition models by name
    thresholds: dict[str, ThresholdSet]
    cache: FaceEmbeddingCache  # every photo, embedded
    digest: inp.DigestCache
    pool_by_id: dict[str, list[Path]]  # clean reference photos per identity
    gallery: GallerySet
    targets: TargetSet
    extra: dict[Path, np.ndarray]  # --landmarks original: landmarks per resolved protected path
    expression: object | None = None  # --utility
    aligned_detection: dict[str, dict] = field(default_factory=dict)  # --aligned --utility, by rel
    utility_detector_error: str | None = None
    with_apis: bool = False


@dataclass
class ImagePass:
    """What the per-image pass collects."""

    rows: list[dict]
    tallies: dict[str, ModelTally]
    faces: FaceCounts = field(default_factory=FaceCounts)
    utility_rows: list[dict] = field(default_factory=list)
    refs_sampled: list[int] = field(default_factory=list)  # per image whose references were sampled: how many
    id_probes: list[IdentificationProbe] = field(default_factory=list)  # primary faces of gallery identities
    api_jobs: list[tuple] = field(default_factory=list)  # see :func:`~facepriv.audit.api_run.api_jobs`


@dataclass
class _Image:
    """One image being scored: its faces and what its primary face is compared with."""

    ident: str | None
    o: ImageFaces
    p: ImageFaces
    detected: list[int | None]  # per original face: its face in the protected photo (None: not found)
    matched: list[int | None]  # ... the face whose embedding is compared (all, with --landmarks original)
    refs: list[Path]  # other clean photos of the person (sampled)
    own: set[int]  # targets identical to the original
    same_id: set[int]  # targets of the source person (left out for the primary face)
    id_probe: IdentificationProbe | None


def audit_images(ctx: AuditContext, pairs: list[inp.FilePair], pair_ident: dict, errors: list[dict]) -> ImagePass:
    """Score every image; unreadable images and originals without a face get an error row (and
    an entry in ``errors``)."""
    res = ImagePass(rows=[], tallies={m: ModelTally() for m in ctx.models})
    for fp in pairs:
        res.rows.append(audit_image(ctx, fp, pair_ident[fp.rel], errors, res))
    return res


def audit_image(ctx: AuditContext, fp: inp.FilePair, ident_info: tuple, errors: list[dict], res: ImagePass) -> dict:
    cfg = ctx.cfg
    ident, ident_src = ident_info
    row: dict = {"protected": fp.rel, "original": fp.original_rel, "identity": ident,
                 "identity_source": ident_src, "error": None, "models": {}}
    o = ctx.cache.get(fp.original)
    p = ctx.cache.get(fp.protected, ctx.extra.get(fp.protected.resolve()))
    error = o.error or p.error or (None if o.faces else "no face detected in the original")
    if error:
        row["error"] = error
        errors.append({"file": fp.rel, "error": row["error"]})
        return row
    detected, matched = _match_faces(cfg, o, p, row, res.faces)
    d_orig = ctx.digest(fp.original)
    refs = _references(ctx, fp, ident, d_orig, row, res.refs_sampled)
    id_probe = _id_probe(ctx, fp, ident, d_orig)
    if id_probe is not None:
        res.id_probes.append(id_probe)
    own, same_id = _target_exclusions(ctx, ident, d_orig, row)
    img = _Image(ident=ident, o=o, p=p, detected=detected, matched=matched, refs=refs, own=own, same_id=same_id,
                 id_probe=id_probe)
    for m, model in ctx.models.items():
        row["models"][m] = _score_model(ctx, img, m, model, res.tallies[m])
    if cfg.utility:
        u = _utility(o, p, matched, detected, ctx.expression, cfg.landmarks == "original",
                     ctx.aligned_detection.get(fp.rel, {"error": ctx.utility_detector_error or "not checked"})
                     if cfg.aligned else None)
        row["utility"] = u
        res.utility_rows.append(u)
    if ctx.with_apis:  # the primary face's comparisons, at most api_max_refs references
        res.api_jobs += api_jobs(cfg, len(res.rows), fp, refs, ctx.targets, own | same_id)
    return row


def _match_faces(cfg: AuditConfig, o: ImageFaces, p: ImageFaces, row: dict, faces: FaceCounts) -> tuple[list, list]:
    """Pair the original's faces with the protected photo's (by box IoU after scaling; pre-aligned
    crops are one face each)."""
    if cfg.aligned:  # one pre-aligned face per crop, whatever the crops' sizes
        detected = [0 if p.faces else None for _ in o.faces]
    else:
        scale = size_ratio(o.size, p.size)
        detected = match_faces([f.box for f in o.faces], [f.box for f in p.faces], cfg.iou, scale=scale)
        if scale != (1.0, 1.0):
            row["resized"] = (f"protected {p.size[0]}x{p.size[1]} vs original {o.size[0]}x{o.size[1]}: faces "
                              "matched after scaling")
    matched = list(range(len(o.faces))) if cfg.landmarks == "original" else detected
    n_det = sum(1 for j in detected if j is not None)
    row.update(faces_original=len(o.faces), faces_protected=len(p.faces), faces_matched=n_det,
               faces_not_detected=len(o.faces) - n_det)
    faces.add(len(o.faces), n_det, len(p.faces))
    return detected, matched


def _references(ctx: AuditContext, fp: inp.FilePair, ident: str | None, d_orig: str, row: dict,
                refs_sampled: list[int]) -> list[Path]:
    """The clean photos the primary face is compared with: other photos of the person with a
    face, at most max_refs of them (a fixed-seed sample per image); labels once per image."""
    refs = [path for path in ctx.pool_by_id.get(ident, [])
            if ctx.digest(path) != d_orig and path != fp.protected.resolve()]
    ref_ok = [r for r in refs if not ctx.cache.get(r).error and ctx.cache.get(r).faces]
    n_ref_all = len(ref_ok)
    ref_ok = sample_refs(ref_ok, ctx.cfg.max_refs, fp.rel)
    if ref_ok:
        row["references"] = [_rel_label(r, ctx.cfg) for r in ref_ok]
        if len(ref_ok) < n_ref_all:
            row["references_total"] = n_ref_all
            refs_sampled.append(n_ref_all)
    return ref_ok


def _id_probe(ctx: AuditContext, fp: inp.FilePair, ident: str | None, d_orig: str) -> IdentificationProbe | None:
    """An identification probe where the image's identity is in the gallery; the gallery photos
    identical to the original or the protected photo are left out of its ranking."""
    g = ctx.gallery
    if not (g.ok and ident is not None and ident in g.identities):
        return None
    d_prot = ctx.digest(fp.protected)
    return IdentificationProbe(ident=ident, exclude=g.by_digest.get(d_orig, []) + (
        g.by_digest.get(d_prot, []) if d_prot != d_orig else []))


def _target_exclusions(ctx: AuditContext, ident: str | None, d_orig: str, row: dict) -> tuple[set[int], set[int]]:
    """Impersonation targets this image must not be measured against: its own original (every
    face), and for the labelled (largest) face a photo of the source person themself."""
    t = ctx.targets
    own = {k for k, d in enumerate(t.digests) if d == d_orig}
    same_id = {k for k, t_id in enumerate(t.idents) if ident is not None and t_id == ident and k not in own}
    if own or same_id:
        row["impersonation_excluded"] = (
            [{"target": t.labels[k], "reason": "own-original", "faces": "all"} for k in sorted(own)]
            + [{"target": t.labels[k], "reason": "source-identity", "faces": [0]} for k in sorted(same_id)])
    return own, same_id


def _score_model(ctx: AuditContext, img: _Image, m: str, model, tally: ModelTally) -> dict:
    """One model's row of an image: every face under dodging and impersonation."""
    metric = model_metric(model)
    mrow: dict = {"faces": []}
    o_emb = img.o.embeddings[m]
    p_emb = img.p.extra[m] if ctx.cfg.landmarks == "original" else img.p.embeddings[m]
    R = torch.stack([ctx.cache.get(r).embeddings[m][0] for r in img.refs]) if img.refs else None
    for i in range(len(img.o.faces)):
        j = img.matched[i]
        pe = p_emb[j] if j is not None else None
        frow: dict = {"face": i, "detected": img.detected[i] is not None}
        dodging(frow, tally, pe, o_emb[i], R, metric, face=i, ident=img.ident)
        if ctx.targets.ok:
            impersonation(frow, tally, pe, o_emb[i], ctx.targets.emb[m], metric,
                          skip=img.own | (img.same_id if i == 0 else set()), n_own=len(img.own),
                          labels=ctx.targets.labels)
        if i == 0 and img.id_probe is not None:  # ranked for all probes at once, after the pass
            img.id_probe.frows[m] = frow
            img.id_probe.before[m] = o_emb[0]
            img.id_probe.after[m] = pe
        mrow["faces"].append(frow)
    th = ctx.thresholds[m].values
    mrow["dodging_max"] = _r(max((s for f in mrow["faces"] for s in f["dodging"] if s is not None), default=None))
    mrow["protected_at"] = {far: None if th[far] is None else
                            all(s is None or s < th[far] for f in mrow["faces"] for s in f["dodging"])
                            for far in FARS}
    return mrow
