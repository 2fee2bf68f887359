"""Per-model figures of the report (``models`` and ``scores``) from the per-image tallies."""

from __future__ import annotations

import numpy as np
import torch

from ..models.thresholds import ThresholdSet, roc_curve
from .common import _r, _sim
from .embed import FaceEmbeddingCache, model_metric
from .identities import GallerySet
from .metrics import mean_or_none, psr, rank_k
from .tally import PROTOCOLS, ModelTally

MAX_IMPOSTOR_PAIRS = 20000


def model_summaries(tallies: dict[str, ModelTally], thresholds: dict[str, ThresholdSet], models: dict,
                    cache: FaceEmbeddingCache, pool: list, gallery: GallerySet | None,
                    impersonation: bool) -> tuple[dict, dict]:
    """``models`` (per model: dodging, impersonation, identification, ROC, mixed precision) and
    ``scores`` (every score, for the histograms) of the report. ``gallery``: None without one."""
    report_models: dict = {}
    scores: dict = {}
    for m, pm in tallies.items():
        th = thresholds[m].values
        entry: dict = {"dodging": _dodging_entry(pm, th)}
        if impersonation:
            entry["impersonation"] = _impersonation_entry(pm, th)
        if gallery is not None:
            entry["identification"] = {
                "n": len(pm.rank_before),
                "rank1_before": rank_k(pm.rank_before, 1), "rank1_after": rank_k(pm.rank_after, 1),
                "rank5_before": rank_k(pm.rank_before, 5), "rank5_after": rank_k(pm.rank_after, 5),
                "gallery_images": len(gallery.ok), "gallery_identities": len({g.identity for g, _ in gallery.ok}),
            }
        roc = _roc_entry(pm, pool, models[m], m, cache.get)
        if roc:
            entry["roc"] = roc
        entry["amp"] = cache.amp_report().get(m)
        report_models[m] = entry
        scores[m] = {"dodging_after": [_r(s) for s in pm.dod_after], "dodging_before": [_r(s) for s in pm.dod_before],
                     "dodging_after_other_photos": [_r(s) for s in pm.dod_by["other-photos"].after],
                     "dodging_self": [_r(s) for s in pm.dod_by["self"].after],
                     "impersonation_after": [_r(s) for s in pm.imp_after],
                     "impersonation_before": [_r(s) for s in pm.imp_before]}
    return report_models, scores


def _dodging_entry(pm: ModelTally, th: dict) -> dict:
    """Headline: every attempt of both protocols; by_protocol: each protocol alone; before: the
    other-photo comparisons (self-verification has no clean "before")."""
    out = {
        **_dodging_stats(pm.dod_after, pm.dod_face, th),
        "protocol": dict(pm.protocol),
        "by_protocol": {k: _dodging_stats(pm.dod_by[k].after, pm.dod_by[k].face, th) for k in PROTOCOLS},
        "before": {"n": len(pm.dod_before), "psr": psr(pm.dod_before, th, mode="dodging"),
                   "mean_similarity": _r(mean_or_none(pm.dod_before)), "protocol": "other-photos"},
    }
    out["by_protocol"]["self"]["reasons"] = dict(pm.self_reasons)
    return out


def _impersonation_entry(pm: ModelTally, th: dict) -> dict:
    return {
        "n": len(pm.imp_after), "n_faces": len(pm.imp_face),
        "psr": psr(pm.imp_after, th, mode="impersonation"),
        "psr_faces": psr(pm.imp_face, th, mode="impersonation"),
        "mean_similarity": _r(mean_or_none(pm.imp_after)),
        "excluded": dict(pm.imp_excluded),
        "before": {"n": len(pm.imp_before), "psr": psr(pm.imp_before, th, mode="impersonation"),
                   "mean_similarity": _r(mean_or_none(pm.imp_before))},
    }


def _dodging_stats(after: list, faces: list, th: dict) -> dict:
    return {"n": len(after), "n_faces": len(faces), "psr": psr(after, th, mode="dodging"),
            "psr_faces": psr(faces, th, mode="dodging"), "mean_similarity": _r(mean_or_none(after)),
            "not_detected": sum(1 for s in after if s is None)}


def _roc_entry(pm: ModelTally, pool: list, model, name: str, faces_of) -> dict | None:
    """ROC before/after protection: genuine = (photo, other photo of the same person) pairs,
    impostors = clean photos of different people. "before" and "after" use the same genuine
    comparisons (other-photos protocol); self-verification, which has no "before", is left out."""
    gen_after = pm.dod_by["other-photos"].after
    if not pm.dod_before:
        return None
    by_id: dict[str, list[torch.Tensor]] = {}
    for path, ident in pool:
        r = faces_of(path)
        if not r.error and r.faces:
            by_id.setdefault(ident, []).append(r.embeddings[name][0])
    if len(by_id) < 2:
        return None
    embs = torch.stack([e for es in by_id.values() for e in es])
    ids = np.array([i for i, es in by_id.items() for _ in es])
    metric = model_metric(model)
    n = len(ids)
    if n * (n - 1) // 2 <= 2 * MAX_IMPOSTOR_PAIRS:
        S = _sim(embs, embs, metric).numpy()
        iu = np.triu_indices(n, 1)
        imp = S[iu][ids[iu[0]] != ids[iu[1]]]
    else:  # large pools: a fixed random sample of impostor pairs instead of the full matrix
        rng = np.random.default_rng(0)
        a, b = rng.integers(0, n, 4 * MAX_IMPOSTOR_PAIRS), rng.integers(0, n, 4 * MAX_IMPOSTOR_PAIRS)
        sel = ids[a] != ids[b]
        a, b = a[sel][:MAX_IMPOSTOR_PAIRS], b[sel][:MAX_IMPOSTOR_PAIRS]
        from ..models.recognition import similarity

        imp = similarity(embs[torch.from_numpy(a)], embs[torch.from_numpy(b)], metric).numpy()
    if len(imp) == 0:
        return None
    if len(imp) > MAX_IMPOSTOR_PAIRS:
        imp = np.random.default_rng(0).choice(imp, MAX_IMPOSTOR_PAIRS, replace=False)
    out = {"n_impostor": int(len(imp)), "n_genuine": len(pm.dod_before), "genuine_protocol": "other-photos",
           "self_left_out": len(pm.dod_by["self"].after)}
    from ..models.thresholds import _downsample_roc, auc_score

    finite = [s for s in gen_after + pm.dod_before if s is not None]
    floor = float(min(imp.min(), min(finite, default=imp.min()))) - 1.0  # "never verifies" (face not detected)
    for key, gen in (("before", pm.dod_before), ("after", gen_after)):
        g = np.array([(floor if s is None else s) for s in gen], dtype=np.float64)
        if len(g) == 0:
            continue
        fpr, tpr, thr = roc_curve(g, imp)
        out[key] = {"auc": _r(auc_score(fpr, tpr)), **{k: v for k, v in _downsample_roc(fpr, tpr, thr, 200).items()
                                                        if k != "threshold"}}
    return out
