"""The recognition protocols, one function each: dodging and impersonation verification of
one face (:func:`dodging`, :func:`impersonation`) and identification against the gallery
(:func:`identification`, ranked by :func:`gallery_ranks`). See :mod:`facepriv.audit.runner`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .common import _r, _sim
from .embed import model_metric
from .identities import GallerySet
from .tally import ModelTally

RANK_CHUNK = 1024  # identification probes scored per matrix product (at most)
RANK_CELLS = 1 << 24  # ... and at most this many probe x gallery scores per product (~128 MB in float64)


def dodging(frow: dict, tally: ModelTally, pe: torch.Tensor | None, oe: torch.Tensor, refs: torch.Tensor | None,
            metric: str, *, face: int, ident: str | None) -> None:
    """Dodging verification of face ``face`` of an image: its protected embedding ``pe`` (None:
    not found in the protected photo) against the other clean photos of the person ``refs``
    (the primary face, when it has any: protocol "other-photos", with the clean original ``oe``
    against the same photos as "before"), else against its own original ``oe`` ("self").
    Writes the scores into the face's row ``frow`` and the tally."""
    if face == 0 and refs is not None:
        after = _sim(pe, refs, metric)[0].tolist() if pe is not None else [None] * len(refs)
        before = _sim(oe, refs, metric)[0].tolist()
        frow["protocol"] = "other-photos"  # scores in the order of row["references"]
    else:
        after = [float(_sim(pe, oe, metric)[0, 0])] if pe is not None else [None]
        before = []
        frow["protocol"] = "self"
        frow["self_reason"] = ("secondary-face" if face > 0 else "identity-unknown" if ident is None
                               else "no-other-photo")
        tally.self_reasons[frow["self_reason"]] += 1
    tally.protocol[frow["protocol"]] += 1
    frow["dodging"] = [_r(s) for s in after]
    frow["dodging_before"] = [_r(s) for s in before]
    face_max = max(after) if pe is not None else None
    tally.dod_after += after
    tally.dod_before += before
    tally.dod_face.append(face_max)
    tally.dod_by[frow["protocol"]].after += after
    tally.dod_by[frow["protocol"]].face.append(face_max)


def impersonation(frow: dict, tally: ModelTally, pe: torch.Tensor | None, oe: torch.Tensor, targets: torch.Tensor,
                  metric: str, *, skip: set[int], n_own: int, labels: list[str]) -> None:
    """Impersonation of one face: its protected embedding ``pe`` (None: not found) and its clean
    original ``oe`` ("before") against every target photo (``targets``, embedded) except those
    in ``skip`` (the image's own original: ``n_own`` of them, and for the primary face photos of
    the source person). Writes the scores into ``frow`` and the tally."""
    keep = [k for k in range(len(targets)) if k not in skip]
    ia: list = []
    ib: list = []
    if keep:
        T = targets[keep]
        ia = _sim(pe, T, metric)[0].tolist() if pe is not None else [None] * len(T)
        ib = _sim(oe, T, metric)[0].tolist()
        tally.imp_face.append(max((s for s in ia if s is not None), default=None))
    frow["impersonation"] = [_r(s) for s in ia]
    frow["impersonation_before"] = [_r(s) for s in ib]
    if skip:  # the scores above are for the targets left after these
        frow["impersonation_excluded"] = [labels[k] for k in sorted(skip)]
        tally.imp_excluded["own-original"] += n_own
        tally.imp_excluded["source-identity"] += len(skip) - n_own
    tally.imp_after += ia
    tally.imp_before += ib


@dataclass
class IdentificationProbe:
    """The primary face of an image whose identity is in the gallery, ranked once all images are
    scored: per model its row (``frows``) and embeddings before / after protection."""

    ident: str
    exclude: list[int]  # gallery photos identical to the original or the protected photo
    frows: dict[str, dict] = field(default_factory=dict)
    before: dict[str, torch.Tensor] = field(default_factory=dict)
    after: dict[str, torch.Tensor | None] = field(default_factory=dict)


def gallery_ranks(gallery: torch.Tensor, gallery_ids: list[str], probes: torch.Tensor, true_ids: list[str],
                  exclude: list[list[int]] | None, metric: str, chunk: int = RANK_CHUNK) -> list[int | None]:
    """For each probe, the 1-based rank of its true identity among the gallery identities, each
    scored by its best photo, leaving out the gallery photos ``exclude[k]`` of probe ``k``; ties
    count against (as :func:`~facepriv.audit.metrics.identity_rank`, whose per-probe loop this
    replaces). None when the true identity has no photo left.

    One similarity matrix per chunk of probes, the best score per identity by ``scatter_reduce``
    (amax) over the gallery's identity index. Scores are computed in float64, so a rank never
    depends on the chunking (float32 matrix products of different shapes round differently,
    which could swap two identities within ~1e-8 of each other); exact ties stay ties."""
    uids = sorted(set(gallery_ids))
    pos = {u: i for i, u in enumerate(uids)}
    gidx = torch.tensor([pos[g] for g in gallery_ids], dtype=torch.long)
    n_id, n_g = len(uids), len(gallery_ids)
    chunk = max(1, min(chunk, RANK_CELLS // max(1, n_g)))  # bounded memory whatever the gallery's size
    gallery64 = gallery.double()
    out: list[int | None] = []
    for s in range(0, len(probes), chunk):
        P = probes[s: s + chunk]
        n = len(P)
        S = _sim(P.double(), gallery64, metric)  # float64: scores independent of the chunking
        keep = torch.ones(n, n_g, dtype=torch.bool)
        if exclude is not None:
            for r, ex in enumerate(exclude[s: s + chunk]):
                if ex:
                    keep[r, ex] = False
        S = S.masked_fill(~keep, -math.inf)
        idx = gidx.expand(n, -1)
        best = torch.full((n, n_id), -math.inf, dtype=S.dtype).scatter_reduce(1, idx, S, reduce="amax", include_self=True)
        present = torch.zeros(n, n_id).scatter_add(1, idx, keep.float()) > 0
        t = torch.tensor([pos.get(x, -1) for x in true_ids[s: s + chunk]], dtype=torch.long)
        rows = torch.arange(n)
        has = (t >= 0) & present[rows, t.clamp(min=0)]
        target = best[rows, t.clamp(min=0)]
        ahead = (best >= target[:, None]) & present
        ahead[rows, t.clamp(min=0)] = False
        ranks = 1 + ahead.sum(1)
        out += [int(r) if h else None for r, h in zip(ranks.tolist(), has.tolist())]
    return out


def identification(probes: list[IdentificationProbe], gallery: GallerySet, models: dict,
                   tallies: dict[str, ModelTally]) -> None:
    """Identification: every probe against the gallery, one matrix product per model (chunked);
    the ranks go into the probes' face rows and the tallies."""
    if not probes:
        return
    for m, model in models.items():
        metric = model_metric(model)
        excl = [pr.exclude for pr in probes]
        true_ids = [pr.ident for pr in probes]
        rb = gallery_ranks(gallery.emb[m], gallery.ids, torch.stack([pr.before[m] for pr in probes]), true_ids,
                           excl, metric)
        has_after = [k for k, pr in enumerate(probes) if pr.after[m] is not None]
        ra: list = [None] * len(probes)
        if has_after:
            got = gallery_ranks(gallery.emb[m], gallery.ids, torch.stack([probes[k].after[m] for k in has_after]),
                                [true_ids[k] for k in has_after], [excl[k] for k in has_after], metric)
            for k, r in zip(has_after, got):
                ra[k] = r
        for pr, b, a in zip(probes, rb, ra):
            if b is None:  # the true identity has no gallery photo left once the probe's own are excluded
                continue
            pr.frows[m]["rank_before"], pr.frows[m]["rank_after"] = b, a
            tallies[m].rank_before.append(b)
            tallies[m].rank_after.append(a)
