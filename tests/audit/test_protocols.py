"""The three protocols: dodging (other photos of the person, self-verification only as a noted
fallback, kept out of the ROC), impersonation (another photo of the target; the image's own
original and the source person left out) and identification (ranks against a gallery, with
notes when the statistics are thin). Similarities are known in advance (MeanColour).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from facepriv.audit import run_audit
from facepriv.audit.metrics import identity_rank, match_faces, psr, rank_k
from facepriv.audit.notes import _thin_statistics_notes
from facepriv.audit.protocols import gallery_ranks
from facepriv.core.errors import ConfigError
from facepriv.models.recognition import similarity_matrix
from facepriv.models.thresholds import FARS, ThresholdSet, auc_score, roc_curve

from .helpers import (CalibratedMeanColour, MeanColour, audit_cfg, colour_cos, render_text, solid,
                      write_thresholds)


def test_psr_and_identification_metrics():
    th = {"1e-1": 0.2, "1e-2": 0.4, "1e-3": 0.6}
    sims = [0.1, 0.3, 0.5, 0.7, None]  # None: face not detected
    assert psr(sims, th) == {"1e-1": 0.4, "1e-2": 0.6, "1e-3": 0.8}
    assert psr(sims, th, mode="impersonation") == {"1e-1": 0.6, "1e-2": 0.4, "1e-3": 0.2}
    assert psr([], th)["1e-3"] is None
    scores = torch.tensor([0.9, 0.2, 0.5, 0.8, 0.1])
    ids = ["a", "a", "b", "c", "c"]
    assert identity_rank(scores, ids, "a") == 1
    assert identity_rank(scores, ids, "c") == 2 and identity_rank(scores, ids, "b") == 3
    assert identity_rank(scores, ids, "z") is None
    assert identity_rank(torch.tensor([0.5, 0.5]), ["a", "b"], "a") == 2  # ties count against
    assert rank_k([1, 2, 6, None], 1) == 0.25 and rank_k([1, 2, 6, None], 5) == 0.5
    assert match_faces([np.array([0, 0, 10, 10]), np.array([20, 20, 30, 30])],
                       [np.array([21, 21, 31, 31]), np.array([50, 50, 60, 60])]) == [None, 0]


# ------------------------------------------------------------------------------ dodging
def test_self_verification_is_noted_and_kept_out_of_the_roc(tmp_path, monkeypatch):
    from facepriv.cli import audit as cli_audit

    orig, prot = tmp_path / "orig", tmp_path / "prot"
    clean = {"a1": (200, 40, 40), "a2": (190, 70, 50), "b1": (40, 40, 200), "c1": (40, 200, 40)}
    protected = {"a1": (20, 200, 220), "a2": (185, 75, 60), "b1": (120, 60, 170), "c1": (200, 40, 200)}
    for n in clean:
        solid(orig / f"{n}.png", clean[n])
        solid(prot / f"{n}.png", protected[n])
    ids = tmp_path / "ids.csv"
    ids.write_text("file,identity\na1.png,ann\na2.png,ann\nb1.png,bea\n")  # c1: identity unknown
    ths = {"1e-1": 0.9, "1e-2": 0.97, "1e-3": 0.995}
    th = write_thresholds(tmp_path / "th.json", "mean-colour", ths)
    rep = run_audit(audit_cfg(prot, orig, aligned=True, identities=ids, thresholds=th, out=tmp_path / "rep"),
                    recognizers={"mean-colour": MeanColour()})
    d = rep["models"]["mean-colour"]["dodging"]
    # a1 <-> a2 are other photos of ann; bea has one photo; c1 has no identity
    other = [colour_cos(protected["a1"], clean["a2"]), colour_cos(protected["a2"], clean["a1"])]
    other_before = [colour_cos(clean["a1"], clean["a2"]), colour_cos(clean["a2"], clean["a1"])]
    self_ = [colour_cos(protected["b1"], clean["b1"]), colour_cos(protected["c1"], clean["c1"])]
    assert d["protocol"] == {"other-photos": 2, "self": 2}
    assert d["by_protocol"]["self"]["reasons"] == {"identity-unknown": 1, "no-other-photo": 1, "secondary-face": 0}
    rows = {r["protected"]: r["models"]["mean-colour"]["faces"][0] for r in rep["images"]}
    assert rows["b1.png"]["self_reason"] == "no-other-photo" and rows["c1.png"]["self_reason"] == "identity-unknown"
    for far, t in ths.items():
        assert d["by_protocol"]["other-photos"]["psr"][far] == pytest.approx(sum(s < t for s in other) / 2)
        assert d["by_protocol"]["self"]["psr"][far] == pytest.approx(sum(s < t for s in self_) / 2)
        assert d["psr"][far] == pytest.approx(sum(s < t for s in other + self_) / 4)  # headline: both protocols
        assert d["before"]["psr"][far] == pytest.approx(sum(s < t for s in other_before) / 2)
    assert d["before"]["n"] == d["by_protocol"]["other-photos"]["n"] == 2 and d["before"]["protocol"] == "other-photos"
    # (1) the note, with the counts
    note = next(n for n in rep["protocol_notes"] if "self-verification" in n)
    assert "2 of 4 face(s)" in note and "identity unknown: 1" in note and "no other clean photo of the person: 1" in note
    # (2) ROC before and after over the same population: the two other-photo comparisons
    scores = rep["scores"]["mean-colour"]
    assert len(scores["dodging_after_other_photos"]) == len(scores["dodging_before"]) == 2
    assert scores["dodging_self"] == pytest.approx(self_, abs=1e-5)
    roc = rep["models"]["mean-colour"]["roc"]
    assert roc["n_genuine"] == 2 and roc["genuine_protocol"] == "other-photos" and roc["self_left_out"] == 2
    impostors = [colour_cos(clean[x], clean["b1"]) for x in ("a1", "a2")]  # pool: a1, a2 (ann), b1 (bea)
    assert roc["n_impostor"] == 2
    for key, gen in (("before", other_before), ("after", other)):
        fpr, tpr, _ = roc_curve(np.array(gen), np.array(impostors))
        assert roc[key]["auc"] == pytest.approx(auc_score(fpr, tpr), abs=1e-6)
    # the AUC "after" with the self-verification scores mixed in would differ: they are really left out
    assert roc["after"]["auc"] == pytest.approx(0.75)  # protected a1 falls between the two impostor scores
    fpr, tpr, _ = roc_curve(np.array(other + self_), np.array(impostors))
    assert auc_score(fpr, tpr) != pytest.approx(roc["after"]["auc"], abs=1e-3)
    # (3) the protocol split and the per-face PSR in the terminal and HTML tables
    text = render_text(cli_audit.psr_table(rep), 80)

    def row(label: str) -> list[str]:  # the cells after the label
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(label))
        return line.strip()[len(label):].split()

    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    assert row("dodging, all")[:5] == ["4", *[pct(d["psr"][f]) for f in FARS], pct(d["psr_faces"]["1e-3"])]
    assert row("other photos")[0] == "2" and row("other photos")[5] == pct(d["before"]["psr"]["1e-3"])
    assert row("self-verif.")[0] == "2" and row("self-verif.")[5] == "n/a"
    assert "faces" in text and "…" not in text and max(len(ln) for ln in text.splitlines()) <= 80
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "other photos</td>" in html and "self-verif.</td>" in html and "per-face PSR" in html
    assert "ROC before and after over the same 2 other-photo comparison(s)" in html
    assert "2 self-verification comparison(s) left out" in html


def test_only_other_photos_has_no_self_verification_note(tmp_path):
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    for n, c in (("a1", (200, 40, 40)), ("a2", (190, 70, 50))):
        solid(orig / f"{n}.png", c)
        solid(prot / f"{n}.png", c)
    ids = tmp_path / "ids.csv"
    ids.write_text("a1.png,ann\na2.png,ann\n")
    rep = run_audit(audit_cfg(prot, orig, aligned=True, identities=ids), recognizers={"mean-colour": MeanColour()})
    d = rep["models"]["mean-colour"]["dodging"]
    assert d["protocol"] == {"other-photos": 2, "self": 0} and d["by_protocol"]["self"]["n"] == 0
    assert not any("self-verification" in n for n in rep["protocol_notes"])
    from facepriv.audit.report import dodging_rows

    assert [label for label, _, _ in dodging_rows(d)] == ["dodging (others)"]


# ------------------------------------------------------------------------------ impersonation
def test_impersonation_psr_against_another_target_photo(tmp_path):
    orig, prot, target = tmp_path / "orig", tmp_path / "prot", tmp_path / "target"
    t_used, t_other = (230, 26, 26), (204, 77, 26)
    p_colours = {"x": (230, 26, 26), "y": (26, 26, 230)}  # x wears the target's colour exactly, y does not
    for n, c in p_colours.items():
        solid(orig / f"{n}.png", (30, 200, 30))
        solid(prot / f"{n}.png", c)
    solid(target / "used.png", t_used)
    solid(target / "other.png", t_other)
    ths = {"1e-1": 0.5, "1e-2": 0.8, "1e-3": 0.99}
    th = write_thresholds(tmp_path / "th.json", "mean-colour", ths)
    model = {"mean-colour": MeanColour()}
    # without --target-used the audit refuses (the usual protocol needs another photo of the target)
    with pytest.raises(ConfigError, match="--target-used"):
        run_audit(audit_cfg(prot, orig, aligned=True, target=target, thresholds=th), recognizers=model)
    rep = run_audit(audit_cfg(prot, orig, aligned=True, target=target, target_used=[target / "used.png"], thresholds=th),
                    recognizers=model)
    imp = rep["models"]["mean-colour"]["impersonation"]
    sims = [colour_cos(c, t_other) for c in p_colours.values()]
    assert rep["counts"]["targets"] == 1 and imp["n"] == 2
    for far, t in ths.items():
        assert imp["psr"][far] == pytest.approx(sum(s >= t for s in sims) / 2)
    assert imp["psr"]["1e-2"] == 0.5 and imp["psr"]["1e-3"] == 0.0  # x is close to, not equal to, the other photo
    before = [colour_cos((30, 200, 30), t_other)] * 2
    assert imp["before"]["psr"]["1e-1"] == pytest.approx(sum(s >= 0.5 for s in before) / 2)
    assert not any("allow-target-reuse" in n for n in rep["protocol_notes"])
    # opting in to reuse: the photo used to protect counts, PSR rises, and the report says so
    rep2 = run_audit(audit_cfg(prot, orig, aligned=True, target=target, allow_target_reuse=True, thresholds=th),
                     recognizers=model)
    imp2 = rep2["models"]["mean-colour"]["impersonation"]
    sims2 = [colour_cos(c, t) for c in p_colours.values() for t in (t_other, t_used)]
    assert imp2["n"] == 4
    assert imp2["psr"]["1e-3"] == pytest.approx(sum(s >= 0.99 for s in sims2) / 4) == 0.25
    assert any("--allow-target-reuse" in n for n in rep2["protocol_notes"])
    assert rep2["config"]["allow_target_reuse"] is True


class _RecordingAPI:
    """An adapter double that records which pairs it was asked to compare (no network)."""

    name = "recorder"

    def __init__(self):
        self.pairs: list[tuple[str, str]] = []
        self.calls = 0
        self.stats = {"cache_hits": 0, "retries": 0, "errors": 0}

    def describe(self) -> dict:
        return {"name": self.name}

    def compare_many(self, pairs, **kw):
        from facepriv.audit.apis import CompareResult

        self.pairs += [(Path(a).name, Path(b).name) for a, b in pairs]
        self.calls += len(pairs)
        return [CompareResult(score=50.0, thresholds={"default": 60.0}) for _ in pairs]


def test_impersonation_leaves_out_the_own_original_and_the_source_person(tmp_path):
    orig, prot, target = tmp_path / "orig", tmp_path / "prot", tmp_path / "target"
    clean = {"x": (200, 40, 40), "y": (40, 40, 200)}
    protected = {"x": (150, 90, 60), "y": (90, 60, 160)}
    for n in clean:
        solid(orig / f"{n}.png", clean[n])
        solid(prot / f"{n}.png", protected[n])
    solid(target / "used.png", (10, 10, 10))
    shutil.copy(orig / "x.png", target / "x_copy.png")  # byte-identical to x's own original
    solid(target / "yvonne2.png", (50, 60, 190))  # another photo of y's own person
    solid(target / "zed.png", (120, 120, 40))  # a real target
    ids = tmp_path / "ids.csv"
    ids.write_text("file,identity\nx.png,xavier\ny.png,yvonne\n../target/yvonne2.png,yvonne\n")
    ths = {"1e-1": 0.9, "1e-2": 0.95, "1e-3": 0.99}
    th = write_thresholds(tmp_path / "th.json", "mean-colour", ths)
    api = _RecordingAPI()
    rep = run_audit(audit_cfg(prot, orig, aligned=True, identities=ids, target=target, target_used=[target / "used.png"],
                              thresholds=th, out=tmp_path / "rep"),
                    recognizers={"mean-colour": MeanColour()}, apis={"recorder": api})
    rows = {r["protected"]: r for r in rep["images"]}
    assert rows["x.png"]["impersonation_excluded"] == [{"target": "x_copy.png", "reason": "own-original", "faces": "all"}]
    assert rows["y.png"]["impersonation_excluded"] == [
        {"target": "yvonne2.png", "reason": "source-identity", "faces": [0]}]
    colours = {"x_copy.png": clean["x"], "yvonne2.png": (50, 60, 190), "zed.png": (120, 120, 40)}
    kept = {"x": ["yvonne2.png", "zed.png"], "y": ["x_copy.png", "zed.png"]}  # target order: sorted file names
    sims = []
    for n, targets in kept.items():
        f = rows[f"{n}.png"]["models"]["mean-colour"]["faces"][0]
        expected = [colour_cos(protected[n], colours[t]) for t in targets]
        assert f["impersonation"] == pytest.approx(expected, abs=1e-5)
        assert f["impersonation_before"] == pytest.approx([colour_cos(clean[n], colours[t]) for t in targets], abs=1e-5)
        sims += expected
    imp = rep["models"]["mean-colour"]["impersonation"]
    assert imp["n"] == 4 and imp["excluded"] == {"own-original": 1, "source-identity": 1}
    for far, t in ths.items():
        assert imp["psr"][far] == pytest.approx(sum(s >= t for s in sims) / 4)
    # without the exclusion y would "impersonate" its own person: its similarity to yvonne2 passes 1e-3
    assert colour_cos(protected["y"], colours["yvonne2.png"]) < colour_cos(clean["y"], colours["yvonne2.png"])
    assert colour_cos(clean["y"], colours["yvonne2.png"]) >= ths["1e-3"]
    assert imp["before"]["psr"]["1e-3"] == pytest.approx(
        sum(colour_cos(clean[n], colours[t]) >= 0.99 for n, ts in kept.items() for t in ts) / 4)
    note = next(n for n in rep["protocol_notes"] if n.startswith("impersonation:"))
    assert "2 comparison(s) left out" in note and "own original" in note and "source person" in note
    # the online comparisons skip them too (the first remaining target per image)
    sent = [(a, b) for a, b in api.pairs if b in colours]
    assert sorted(sent) == [("x.png", "yvonne2.png"), ("y.png", "x_copy.png")]
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "impersonation target x_copy.png left out (own-original)" in html


# ------------------------------------------------------------------------------ identification
def _expected_rank(probe, gallery: dict[str, list], true_id: str) -> int:
    """Rank of ``true_id`` by best cosine per identity, ties counted against it (computed here)."""
    best = {i: max(colour_cos(probe, c) for c in cols) for i, cols in gallery.items() if cols}
    return 1 + sum(1 for i, s in best.items() if i != true_id and s >= best[true_id])


def test_identification_rank1_and_rank5_differ_on_a_seven_identity_gallery(tmp_path):
    """Seven gallery identities; four probes whose protected colours push the true identity to
    rank 1, 3, 6 and 5: rank-1 after = 1/4, rank-5 after = 3/4, both 1 before."""
    orig, prot, gal = tmp_path / "orig", tmp_path / "prot", tmp_path / "gallery"
    refs = {"A": (230, 20, 20), "B": (20, 230, 20), "C": (20, 20, 230), "D": (200, 200, 20), "E": (20, 200, 200),
            "F": (200, 20, 200), "G": (150, 150, 150)}
    originals = {"A": (220, 30, 25), "B": (30, 220, 25), "C": (25, 30, 220), "D": (210, 190, 30)}
    protected = {"A": (220, 30, 25), "B": (60, 200, 150), "C": (200, 100, 120), "D": (150, 100, 200)}
    for ident, c in refs.items():
        solid(gal / ident / "ref.png", c)
    for ident, c in originals.items():
        solid(orig / f"{ident}.png", c)
        solid(prot / f"{ident}.png", protected[ident])
        # the gallery holds a copy of each original: it gives the identity and is left out of the ranking
        shutil.copy(orig / f"{ident}.png", gal / ident / "same-as-original.png")
    rep = run_audit(audit_cfg(prot, orig, aligned=True, gallery=gal), recognizers={"mean-colour": MeanColour()})

    def gallery_for(probe: str) -> dict[str, list]:
        # every gallery photo except the copy of this probe's own original (identical to A's protected too)
        return {i: [c] + ([originals[i]] if i in originals and i != probe else []) for i, c in refs.items()}

    expected_after = {i: _expected_rank(protected[i], gallery_for(i), i) for i in originals}
    assert expected_after == {"A": 1, "B": 3, "C": 6, "D": 5}  # the constructed case holds
    rows = {r["protected"][0]: r for r in rep["images"]}
    for ident in originals:
        assert rows[ident]["identity"] == ident and rows[ident]["identity_source"] == "gallery"
        f0 = rows[ident]["models"]["mean-colour"]["faces"][0]
        assert f0["rank_before"] == _expected_rank(originals[ident], gallery_for(ident), ident) == 1
        assert f0["rank_after"] == expected_after[ident]
    ident_summary = rep["models"]["mean-colour"]["identification"]
    assert ident_summary["n"] == 4 and ident_summary["gallery_identities"] == 7
    assert ident_summary["gallery_images"] == 7 + 4
    assert ident_summary["rank1_before"] == 1.0 and ident_summary["rank5_before"] == 1.0
    assert ident_summary["rank1_after"] == sum(r == 1 for r in expected_after.values()) / 4 == 0.25
    assert ident_summary["rank5_after"] == sum(r <= 5 for r in expected_after.values()) / 4 == 0.75


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_gallery_ranks_match_the_per_probe_loop_with_ties(metric):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    # duplicated embeddings under different identities make exact ties
    gallery = torch.cat([base, base[:3], torch.randn(5, 8, generator=g)])
    ids = ["a", "b", "c", "d", "e", "f", "b", "c", "a", "g", "a", "b", "h", "d"]
    probes = torch.cat([base[[0, 1, 2, 4]], torch.randn(6, 8, generator=g)])
    true = ["a", "b", "c", "e", "a", "g", "h", "z", "d", "f"]
    exclude = [[0], [], [1, 6], [4], [], [9], [12], [], [3, 13], [5]]
    got = gallery_ranks(gallery, ids, probes, true, exclude, metric, chunk=3)
    want = []
    for p, t, ex in zip(probes, true, exclude):
        keep = [k for k in range(len(ids)) if k not in ex]
        kid = [ids[k] for k in keep]
        want.append(identity_rank(similarity_matrix(p[None], gallery[keep], metric)[0], kid, t) if t in kid else None)
    assert got == want
    # a big gallery shrinks the probe chunk to a memory budget: same ranks
    import facepriv.audit.protocols as protocols

    old_cells = protocols.RANK_CELLS
    try:
        protocols.RANK_CELLS = 2 * len(ids)  # two probes per product
        assert gallery_ranks(gallery, ids, probes, true, exclude, metric) == want
    finally:
        protocols.RANK_CELLS = old_cells
    assert want[6] is None and want[7] is None and want[8] is None  # identity gone / unknown
    assert any(r is not None and r > 1 for r in want)
    # a tie counts against the true identity
    assert gallery_ranks(torch.eye(2)[[0, 0]], ["x", "y"], torch.eye(2)[:1], ["x"], None, metric) == [2]


def test_thin_statistics_notes():
    models = {"m": {"identification": {"n": 3, "gallery_identities": 4}, "roc": {"n_impostor": 150}},
              "big": {"identification": {"n": 3, "gallery_identities": 6}, "roc": {"n_impostor": 5000}}}
    th = {"m": ThresholdSet("m", {}, "calibrated on x", "calibrated", calibration={"n_impostor": 50}),
          "big": ThresholdSet("big", {}, "calibrated", "calibrated", note="only 50 impostor pairs: ...",
                              calibration={"n_impostor": 50})}
    notes = _thin_statistics_notes(models, th)
    text = " | ".join(notes)
    assert "identification (m)" in text and "rank-5 is 100% by definition" in text and "(big)" not in text
    assert "ROC (m): only 150 impostor pair(s): the curve cannot resolve FAR 1e-3 " in text
    assert "thresholds (m): calibrated on only 50 impostor pair(s): FAR 1e-2, 1e-3 " in text
    assert len(notes) == 3  # big: enough identities and impostors; its thresholds carry their own note


def test_small_gallery_is_noted_end_to_end(tmp_path):
    orig, prot, gal = tmp_path / "orig", tmp_path / "prot", tmp_path / "gallery"
    solid(orig / "alice" / "a.png", (220, 30, 30))
    solid(prot / "alice" / "a.png", (30, 220, 30))
    solid(gal / "alice" / "1.png", (210, 40, 30))
    solid(gal / "alice" / "2.png", (200, 50, 30))
    solid(gal / "bob" / "1.png", (30, 30, 220))
    rep = run_audit(audit_cfg(prot, orig, aligned=True, gallery=gal), recognizers={"mean-colour": CalibratedMeanColour()})
    assert rep["models"]["mean-colour"]["identification"]["rank5_after"] == 1.0
    assert any("only 2 identities, so rank-5 is 100% by definition" in n for n in rep["protocol_notes"])
    assert any("ROC (mean-colour): only" in n for n in rep["protocol_notes"])
