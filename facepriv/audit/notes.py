"""The report's ``protocol_notes``: what a reader must know to read the numbers right."""

from __future__ import annotations

import math

from ..models.thresholds import FARS, ThresholdSet, calibration_mismatch
from .config import AuditConfig
from .tally import ModelTally


def name_label_note(n_by_name: int) -> list[str]:
    """Photos labelled from the identities CSV by bare file name only."""
    if not n_by_name:
        return []
    return [f"{n_by_name} photo(s) got their identity from the identities CSV by bare file "
            "name only (no row with their relative path); check that those names are unique "
            "(identity_source 'identities (file name)')"]


def sampled_refs_note(refs_sampled: list[int], max_refs: int) -> list[str]:
    """Images compared with a sample of the other clean photos of their person (``--max-refs``);
    ``refs_sampled``: how many each had."""
    if not refs_sampled:
        return []
    return [f"dodging: {len(refs_sampled)} image(s) had more other clean photos of their person than "
            f"--max-refs {max_refs} (up to {max(refs_sampled)}); each was compared with a fixed-seed "
            f"sample of {max_refs} of them (row references / references_total; --max-refs 0 compares "
            "with all)"]


def _protocol_notes(per_model: dict[str, ModelTally], known: int, impersonation: bool) -> list[str]:
    """Notes on the dodging protocol mix and on impersonation targets left out (the counts are
    per model; they are the same for every model, so the first one's are given)."""
    if not per_model:
        return []
    pm = next(iter(per_model.values()))
    notes = []
    n_self, n_other = pm.protocol["self"], pm.protocol["other-photos"]
    if n_self:
        why = {"identity-unknown": "identity unknown" + (
                   " (no --identities, --gallery or --pairs matched the originals)" if known == 0 else ""),
               "no-other-photo": "no other clean photo of the person",
               "secondary-face": "secondary face of a photo (the identity label is the largest face's)"}
        reasons = "; ".join(f"{why[k]}: {v}" for k, v in pm.self_reasons.items() if v)
        n_cmp_other = len(pm.dod_by["other-photos"].after)
        text = (f"dodging: {n_self} of {n_self + n_other} face(s) fell back to self-verification (protected face vs "
                f"its own original: weaker, no 'before'): {reasons}. ")
        if n_other:
            text += (f"{n_other} face(s) were compared with other clean photos of the same person ({n_cmp_other} "
                     "comparison(s)). The headline dodging PSR counts both protocols (dodging.by_protocol splits "
                     "them); the 'before' baseline, the ROC and the before/after histograms use the other-photo "
                     "comparisons only, self-verification is shown apart in the histograms.")
        else:
            text += "There is no 'before' baseline and no ROC (they need other photos of the same person)."
        notes.append(text)
    ex = pm.imp_excluded
    if impersonation and any(ex.values()):
        parts = []
        if ex["own-original"]:
            parts.append(f"{ex['own-original']} with a target photo byte-identical to the image's own original")
        if ex["source-identity"]:
            parts.append(f"{ex['source-identity']} with a target photo of the source person's own identity")
        notes.append(f"impersonation: {sum(ex.values())} comparison(s) left out of the impersonation PSR and its "
                     "'before' (impersonating oneself is not an attack): " + ", ".join(parts)
                     + "; the rows list them (impersonation_excluded)")
    return notes


def _aligned_utility_notes(detection: dict[str, dict], detector: str) -> list[str]:
    missed = sum(1 for d in detection.values() if d.get("in_original") is False)
    if not missed:
        return []
    judged = sum(1 for d in detection.values() if d.get("in_original"))
    return [f"utility: the detector ({detector}) found no face in {missed} original crop(s), even padded; they are "
            "left out of 'face still detected' (" + (f"{judged} crop(s) judged)" if judged else
                                                     "none left: the rate is null)")]


def _thin_statistics_notes(report_models: dict, thresholds: dict[str, ThresholdSet]) -> list[str]:
    """Notes where a figure is decided by the size of the test rather than by the protection:
    rank-5 over a gallery of 5 identities or fewer (100 % by definition), an ROC from fewer than
    1/FAR impostor pairs (its low-FAR end is not resolved), FAR thresholds calibrated on fewer
    than 1/FAR impostor pairs (their own note says so, when they carry one)."""
    notes = []
    for m, e in report_models.items():
        ident = e.get("identification")
        if ident and ident.get("n") and ident.get("gallery_identities", 0) <= 5:
            notes.append(f"identification ({m}): the gallery has only {ident['gallery_identities']} identit"
                         f"{'y' if ident['gallery_identities'] == 1 else 'ies'}, so rank-5 is 100% by definition; "
                         "only rank-1 says anything")
        roc = e.get("roc")
        if roc and roc.get("n_impostor") is not None:
            n = roc["n_impostor"]
            bad = [f for f in FARS if n < math.ceil(1 / float(f))]
            if bad:
                notes.append(f"ROC ({m}): only {n} impostor pair(s): the curve cannot resolve FAR "
                             f"{', '.join(bad)} (each needs at least 1/FAR impostor pairs)")
    for m, t in thresholds.items():
        cal = t.calibration or {}
        n = cal.get("n_impostor")
        if n is None or t.kind not in ("calibrated", "file") or "impostor pairs" in (t.note or ""):
            continue
        bad = [f for f in FARS if n < math.ceil(1 / float(f))]
        if bad:
            notes.append(f"thresholds ({m}): calibrated on only {n} impostor pair(s): FAR {', '.join(bad)} cannot be "
                         "resolved (each needs at least 1/FAR impostor pairs); those thresholds only sit above the "
                         "highest impostor scores seen")
    return notes


def threshold_notes(cfg: AuditConfig, thresholds: dict[str, ThresholdSet]) -> list[str]:
    """The thresholds' own notes, then where they were calibrated under other conditions
    (detector, alignment) than this audit's."""
    return [t.note for t in thresholds.values() if t.note] + [
        n for t in thresholds.values()
        if (n := calibration_mismatch(t, detector=None if cfg.aligned else cfg.detector, aligned=cfg.aligned,
                                      aligned_template=cfg.aligned_template))]
