"""Who is who: identities from a pairs file, an identities CSV or gallery folders (never from a
bare gallery file name; the CSV's file-name fallback is noted), and the references each image
is verified against (--max-refs samples them deterministically).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from facepriv.audit import inputs as inp
from facepriv.audit import run_audit
from facepriv.audit.identities import sample_refs
from facepriv.core.errors import ConfigError

from .helpers import CalibratedMeanColour, MeanColour, audit_cfg, colour_cos, random_image, solid, write_thresholds


def test_pairs_identities_and_gallery(tmp_path):
    root = tmp_path / "imgs"
    for n in ("a1", "a2", "a3", "b1", "c1"):
        random_image(root / f"{n}.jpg")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("file_x,file_y,Decision\r\na1.jpg,a2.jpg,Yes\r\na2.jpg,a3.jpg,yes\r\na1.jpg,b1.jpg,No\r\n"
                     "b1.jpg,c1.jpg,different\r\n")
    lp = inp.read_pairs(pairs, root)
    assert [p.same for p in lp] == [True, True, False, False]
    comp = inp.pair_components(lp)
    ids = {p.name: c for p, c in comp.items()}
    assert ids["a1.jpg"] == ids["a2.jpg"] == ids["a3.jpg"] != ids["b1.jpg"] != ids["c1.jpg"]
    tsv = tmp_path / "p.tsv"
    tsv.write_text("a1.jpg\tb1.jpg\t0\n")
    assert inp.read_pairs(tsv, root)[0].same is False
    bad = tmp_path / "bad.csv"
    bad.write_text("a1.jpg,a2.jpg,yes\na1.jpg,a2.jpg,maybe\n")
    with pytest.raises(ConfigError, match="unknown label"):
        inp.read_pairs(bad, root)
    idf = tmp_path / "ids.csv"
    idf.write_text("file,identity\nimgs/a1.jpg,alice\nimgs/b1.jpg,bob\n")
    idx = inp.read_identities(idf)
    assert idx.lookup(root / "a1.jpg") == "alice" and idx.lookup(root / "c1.jpg") is None
    gal = tmp_path / "gal"
    random_image(gal / "alice" / "x.jpg")
    random_image(gal / "bob" / "sub" / "y.jpg")
    assert sorted((g.path.name, g.identity) for g in inp.read_gallery(gal)) == [("x.jpg", "alice"), ("y.jpg", "bob")]
    random_image(gal / "loose.jpg")
    with pytest.raises(ConfigError, match="identity folder"):
        inp.read_gallery(gal)


def test_gallery_file_names_never_assign_identities(tmp_path):
    """Bob's 1.jpg must not be labelled alice because the gallery holds alice/1.jpg."""
    orig, prot, gal = tmp_path / "orig", tmp_path / "prot", tmp_path / "gallery"
    bob = (40, 200, 60)
    solid(orig / "1.jpg", bob)
    solid(prot / "1.png", (45, 190, 70))
    solid(gal / "alice" / "1.jpg", (220, 30, 30))
    solid(gal / "alice" / "2.jpg", (210, 40, 35))
    solid(gal / "carol" / "1b.jpg", (30, 30, 220))
    rep = run_audit(audit_cfg(prot, orig, aligned=True, gallery=gal), recognizers={"mean-colour": MeanColour()})
    row = rep["images"][0]
    assert row["identity"] is None and row["identity_source"] is None
    f0 = row["models"]["mean-colour"]["faces"][0]
    assert f0["protocol"] == "self" and "references" not in row  # never compared with alice's photos
    assert rep["counts"]["identities_known"] == 0
    assert rep["models"]["mean-colour"]["identification"]["n"] == 0
    assert any("self-verification" in n for n in rep["protocol_notes"])


def test_identities_csv_name_fallback_is_noted(tmp_path):
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    solid(orig / "sub" / "1.jpg", (40, 200, 60))
    solid(prot / "sub" / "1.png", (40, 200, 60))
    solid(orig / "2.jpg", (200, 40, 60))
    solid(prot / "2.png", (200, 40, 60))
    ids = tmp_path / "ids.csv"
    ids.write_text("file,identity\n1.jpg,bob\n2.jpg,carol\n")  # 1.jpg is really sub/1.jpg: name only
    rep = run_audit(audit_cfg(prot, orig, aligned=True, identities=ids), recognizers={"mean-colour": MeanColour()})
    rows = {r["protected"]: r for r in rep["images"]}
    assert rows["sub/1.png"]["identity"] == "bob" and rows["sub/1.png"]["identity_source"] == "identities (file name)"
    assert rows["2.png"]["identity"] == "carol" and rows["2.png"]["identity_source"] == "identities"
    notes = [n for n in rep["protocol_notes"] if "bare file name" in n]
    assert len(notes) == 1 and notes[0].startswith("1 photo(s)")
    # with the relative path in the CSV there is no fallback and no note
    ids.write_text("file,identity\nsub/1.jpg,bob\n2.jpg,carol\n")
    rep = run_audit(audit_cfg(prot, orig, aligned=True, identities=ids), recognizers={"mean-colour": MeanColour()})
    assert {r["identity_source"] for r in rep["images"]} == {"identities"}
    assert not any("bare file name" in n for n in rep["protocol_notes"])


def test_identities_from_pairs_file_end_to_end(tmp_path):
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    colours = {"a1": (200, 40, 40), "a2": (190, 60, 50), "b1": (40, 40, 200), "b2": (60, 50, 190)}
    protected = {"a1": (40, 200, 40), "a2": (190, 60, 50), "b1": (45, 45, 195), "b2": (60, 50, 190)}
    for n, c in colours.items():
        solid(orig / f"{n}.png", c)
        solid(prot / f"{n}.png", protected[n])
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("file_x,file_y,label\na1.png,a2.png,same\nb1.png,b2.png,same\na1.png,b1.png,different\n")
    th = write_thresholds(tmp_path / "th.json", "mean-colour", {"1e-1": 0.9, "1e-2": 0.95, "1e-3": 0.99})
    rep = run_audit(audit_cfg(prot, orig, aligned=True, pairs=pairs, pairs_root=orig, thresholds=th),
                    recognizers={"mean-colour": MeanColour()})
    rows = {r["protected"]: r for r in rep["images"]}
    assert {r["identity_source"] for r in rows.values()} == {"pairs"}
    assert rows["a1.png"]["identity"] == rows["a2.png"]["identity"] != rows["b1.png"]["identity"]
    assert rep["counts"]["identities_known"] == 4
    d = rep["models"]["mean-colour"]["dodging"]
    assert d["protocol"] == {"other-photos": 4, "self": 0}
    expected = {}
    for n, r, f in ((r["protected"][:2], r, r["models"]["mean-colour"]["faces"][0]) for r in rows.values()):
        mate = {"a1": "a2", "a2": "a1", "b1": "b2", "b2": "b1"}[n]
        assert r["references"] == [f"{mate}.png"]  # the other photo of the same person, never itself
        expected[n] = colour_cos(protected[n], colours[mate])
        assert f["dodging"][0] == pytest.approx(expected[n], abs=1e-4)
        assert f["dodging_before"][0] == pytest.approx(colour_cos(colours[n], colours[mate]), abs=1e-4)
    # PSR = share of the 4 attempts below each threshold, from the known similarities
    ths = {"1e-1": 0.9, "1e-2": 0.95, "1e-3": 0.99}
    for far, t in ths.items():
        assert d["psr"][far] == pytest.approx(sum(s < t for s in expected.values()) / 4)
    assert d["psr"]["1e-1"] == 0.25  # only a1 (turned green) escapes at the loosest threshold
    assert "roc" in rep["models"]["mean-colour"]  # impostor pairs exist: a ROC is drawn


def test_max_refs_samples_references_deterministically(tmp_path):
    orig, prot, gal = tmp_path / "orig", tmp_path / "prot", tmp_path / "gallery"
    solid(orig / "alice" / "a.png", (220, 30, 30))  # identity from the gallery folder name
    solid(prot / "alice" / "a.png", (200, 60, 40))
    for k in range(6):
        solid(gal / "alice" / f"{k}.png", (215 - 10 * k, 30 + 5 * k, 30))
    solid(gal / "bob" / "0.png", (30, 30, 220))
    run = lambda **kw: run_audit(audit_cfg(prot, orig, aligned=True, gallery=gal, **kw),  # noqa: E731
                                 recognizers={"mean-colour": CalibratedMeanColour(),
                                              "mc2": CalibratedMeanColour("mc2")})
    rep = run(max_refs=3)
    row = rep["images"][0]
    assert len(row["references"]) == 3 and row["references_total"] == 6
    assert len(set(row["references"])) == 3 and all(r.startswith("alice/") for r in row["references"])
    for m in ("mean-colour", "mc2"):  # labels once per image; per model only the scores
        f0 = row["models"][m]["faces"][0]
        assert "references" not in f0 and len(f0["dodging"]) == 3
    assert rep["config"]["max_refs"] == 3
    assert any("--max-refs 3" in n and "fixed-seed" in n for n in rep["protocol_notes"])
    assert run(max_refs=3)["images"][0]["references"] == row["references"]  # same sample every run
    full = run(max_refs=0)["images"][0]
    assert len(full["references"]) == 6 and "references_total" not in full
    # the online APIs get the same (sampled) references as the local models
    class Recorder:
        calls, stats, stopped_reason = 0, {}, None

        def __init__(self):
            self.sent = []

        def describe(self):
            return {"name": "recorder"}

        def compare_many(self, pairs, **kw):
            from facepriv.audit.apis.base import CompareResult

            self.sent += [(Path(a).name, Path(b).relative_to(gal).as_posix()) for a, b in pairs]
            return [CompareResult(score=0.1, thresholds={"1e-3": 0.5}) for _ in pairs]

    api = Recorder()
    rep = run_audit(audit_cfg(prot, orig, aligned=True, gallery=gal, max_refs=3, api_max_refs=5),
                    recognizers={"mean-colour": CalibratedMeanColour()}, apis={"rec": api})
    assert [b for _, b in api.sent] == rep["images"][0]["references"] == row["references"]
    assert {r["protocol"] for r in rep["images"][0]["apis"]["rec"]} == {"other-photos"}
    # the sample keeps the pool order and depends only on the image, not on the other images
    refs = list(range(50))
    s = sample_refs(refs, 5, "x/a.png")
    assert s == sorted(s) and s == sample_refs(refs, 5, "x/a.png") and s != sample_refs(refs, 5, "x/b.png")
    assert sample_refs(refs, 0, "x") == refs and sample_refs(refs[:3], 5, "x") == refs[:3]
