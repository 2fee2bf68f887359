"""Utility (``--utility``): is the face still detected after protection, and is its expression kept?"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..core.io import load_image
from ..core.progress import make_progress
from .common import size_ratio
from .config import EXPRESSION_MODEL, AuditConfig
from .embed import ImageFaces
from .metrics import expression_change, match_faces

UTILITY_PAD = 0.5  # --aligned --utility: crops get a border of this share of their size on each side


def pad_for_detection(rgb: np.ndarray, pad: float = UTILITY_PAD) -> np.ndarray:
    """A pre-aligned crop with a constant mid-grey border of ``pad`` x its size on every side:
    the face then fills about half of the image side. Detectors such as MTCNN miss faces that
    fill a tight crop."""
    h, w = rgb.shape[:2]
    py, px = int(round(h * pad)), int(round(w * pad))
    return np.pad(rgb, ((py, py), (px, px), (0, 0)), mode="constant", constant_values=127)


def aligned_face_detection(cfg: AuditConfig, pairs, detector) -> dict[str, dict]:
    """``--aligned --utility``: is the face of each pre-aligned crop still found by a real
    detector? The original and the protected crop are padded (:func:`pad_for_detection`) and
    run through ``detector``; the largest face of the original (at least ``min_face_size``) must
    have a face in the protected crop overlapping it (IoU >= ``cfg.iou`` after scaling by the
    crops' size ratio). Returns rel -> ``{"in_original": bool, "in_protected": bool | None}``
    (None: no face in the original, so nothing to keep), or ``{"error": ...}``."""
    def faces(path: Path):
        rgb = pad_for_detection(load_image(path, max_pixels=cfg.max_pixels).rgb)
        found = [f for f in detector.detect(rgb) if f.size >= cfg.min_face_size]
        return sorted(found, key=lambda f: f.width * f.height, reverse=True), rgb.shape[:2]

    def one(fp) -> dict:
        try:
            fo, (ho, wo) = faces(fp.original)
            if not fo:
                return {"in_original": False, "in_protected": None}
            fpr, (hp, wp) = faces(fp.protected)
            hit = match_faces([fo[0].box], [f.box for f in fpr], cfg.iou, scale=size_ratio((wo, ho), (wp, hp)))[0]
            return {"in_original": True, "in_protected": hit is not None}
        except Exception as exc:  # noqa: BLE001 - the embedding pass reports unreadable files
            return {"error": f"{type(exc).__name__}: {exc}"}

    out: dict[str, dict] = {}
    with make_progress(enabled=cfg.progress) as bar, ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        task = bar.add_task("utility: detecting faces in the crops", total=len(pairs))
        for fp, res in zip(pairs, pool.map(one, pairs)):
            out[fp.rel] = res
            bar.advance(task)
    return out


def _utility(o: ImageFaces, p: ImageFaces, matched, detected, expr, at_original: bool,
             aligned: dict | None = None) -> dict:
    """Utility of one image: faces still detected and, per face (``face``: its index among the
    original's faces), whether the expression was kept. Pre-aligned crops (``aligned``: the
    result of :func:`aligned_face_detection`) say whether a real detector found the face in the
    original crop (``face_in_original``) and still finds it in the protected one
    (``faces_detected_after`` 1 / 0; None when it missed the original's face already)."""
    from ..models.expression import LABELS

    if aligned is not None:
        ok = "error" not in aligned
        out: dict = {"faces": len(o.faces), "face_in_original": aligned.get("in_original") if ok else None,
                     "faces_detected_after": (int(aligned["in_protected"]) if ok and aligned.get("in_original")
                                              else None)}
        if not ok:
            out["detection_error"] = aligned["error"]
    else:
        out = {"faces_detected_after": sum(1 for j in detected if j is not None), "faces": len(o.faces)}
    if expr is None or EXPRESSION_MODEL not in o.embeddings:
        return out
    if aligned is not None and out.get("faces_detected_after") == 0:
        # the detector finds no face left in the protected crop: an expression read from it
        # would be a reading of no face (the crop is still embedded for dodging)
        out["expression"] = []
        out["expression_skipped"] = "no face detected in the protected crop"
        return out
    labels = getattr(expr, "labels", LABELS)
    per_face = []
    for i, j in enumerate(matched):
        if j is None:
            continue
        p_logits = p.extra[EXPRESSION_MODEL][i] if at_original else p.embeddings[EXPRESSION_MODEL][j]
        per_face.append({"face": i, **expression_change(o.embeddings[EXPRESSION_MODEL][i].softmax(-1),
                                                         p_logits.softmax(-1), labels)})
    out["expression"] = per_face
    return out


def _utility_summary(rows: list[dict], faces: dict, aligned: bool = False, detector: str | None = None) -> dict:
    ex = [f for r in rows for f in r.get("expression", [])]
    extra: dict = {}
    if aligned:  # a real detector on the padded crops; crops whose original it missed are left out
        judged = [r for r in rows if r.get("faces_detected_after") is not None]
        rate = (sum(r["faces_detected_after"] for r in judged) / len(judged)) if judged else None
        extra = {"face_detection": f"{detector} on padded crops", "faces_judged": len(judged),
                 "faces_left_out": len(rows) - len(judged)}
    else:
        rate = (faces["matched"] / faces["original"]) if faces["original"] else None
    return {"face_detected_rate": rate, **extra,
            "expression_kept_rate": (sum(f["expression_kept"] for f in ex) / len(ex)) if ex else None,
            "expression_tv_mean": float(np.mean([f["expression_tv"] for f in ex])) if ex else None,
            "n_faces": len(ex), "model": EXPRESSION_MODEL}
