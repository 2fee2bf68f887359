"""Pairs files for `facepriv audit calibrate`: LFW's pairs.txt as distributed, space-separated
lists (flattened CFP-FP / CFP-FF protocol), CSV, CFP's split folders; error messages name the
line and what was expected. Tiny synthetic LFW-style trees only (never the real LFW).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from facepriv.audit import inputs as inp
from facepriv.core.errors import ConfigError

from .helpers import MeanColour


# person -> (photo numbers, colour)
PEOPLE = {"Ann_Lee": ((1, 2, 12), (200, 40, 40)), "Bo_Ma": ((1,), (40, 40, 200)), "Cy_Ng": ((1, 3), (40, 200, 40))}


# LFW layout: "FOLDS N" header, N same pairs then N different pairs per fold, tab separated
LFW_PAIRS = "1\t2\nAnn_Lee\t1\t12\nCy_Ng\t1\t3\nAnn_Lee\t2\tBo_Ma\t1\nBo_Ma\t1\tCy_Ng\t3\n"


def lfw_tree(top: Path, sub: str | None = "images") -> Path:
    """top/[sub/]<Name>/<Name>_NNNN.jpg (solid colour per person) and top/pairs.txt; returns the
    folder holding the person folders."""
    people = top / sub if sub else top
    for name, (numbers, rgb) in PEOPLE.items():
        for n in numbers:
            f = people / name / f"{name}_{n:04d}.jpg"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((112, 112, 3), rgb, dtype=np.uint8)).save(f)
    (top / "pairs.txt").write_text(LFW_PAIRS)
    return people


def _rel(pairs, root: Path):
    return [(p.a.relative_to(root).as_posix(), p.b.relative_to(root).as_posix(), p.same, p.line) for p in pairs]


def test_lfw_pairs_txt_is_read_as_distributed(tmp_path):
    people = lfw_tree(tmp_path, sub=None)
    pairs = inp.read_pairs(tmp_path / "pairs.txt", people)
    assert pairs.format == "lfw" and pairs.root == people
    assert _rel(pairs, people) == [
        ("Ann_Lee/Ann_Lee_0001.jpg", "Ann_Lee/Ann_Lee_0012.jpg", True, 2),  # 4-digit zero padding
        ("Cy_Ng/Cy_Ng_0001.jpg", "Cy_Ng/Cy_Ng_0003.jpg", True, 3),
        ("Ann_Lee/Ann_Lee_0002.jpg", "Bo_Ma/Bo_Ma_0001.jpg", False, 4),
        ("Bo_Ma/Bo_Ma_0001.jpg", "Cy_Ng/Cy_Ng_0003.jpg", False, 5),
    ]
    assert all(p.a.is_file() and p.b.is_file() for p in pairs)
    # space separated, a single-number header (pairsDevTrain.txt style), no header at all, and
    # blank / comment lines: the same pairs
    for i, text in enumerate(("2\n" + LFW_PAIRS.split("\n", 1)[1].replace("\t", " "),
                              LFW_PAIRS.split("\n", 1)[1],
                              "# LFW view 2\n\n" + LFW_PAIRS.replace("\t", "  "))):
        f = tmp_path / f"variant{i}.txt"
        f.write_text(text)
        got = inp.read_pairs(f, people)
        assert [(a, b, s) for a, b, s, _ in _rel(got, people)] == [(a, b, s) for a, b, s, _ in _rel(pairs, people)]
    assert [p.line for p in got] == [4, 5, 6, 7]  # line numbers count the skipped lines


def test_lfw_image_root_defaults_and_subfolders(tmp_path):
    people = lfw_tree(tmp_path, sub="images")  # like shared LFW: top/pairs.txt + top/images/<Name>/
    # default root: the pairs file's folder -> its images/ sub-folder holds the person folders
    assert inp.read_pairs(tmp_path / "pairs.txt").root == people
    assert inp.read_pairs(tmp_path / "pairs.txt", tmp_path).root == people  # --root = the top folder
    assert inp.read_pairs(tmp_path / "pairs.txt", people).root == people  # --root = the person folders
    other = tmp_path / "dl"
    lfw = lfw_tree(other, sub="lfw")  # the LFW download: pairs.txt beside lfw/
    first = inp.read_pairs(other / "pairs.txt")[0]
    assert first.a == lfw / "Ann_Lee" / "Ann_Lee_0001.jpg" and first.a.is_file()


@pytest.mark.parametrize("line, expected", [
    ("Ann_Lee\t1", "line 3: 'Ann_Lee\\t1' is not an LFW pair"),
    ("Ann_Lee\tone\t2", "line 3: 'Ann_Lee\\tone\\t2' is not an LFW pair"),
    ("Ann_Lee\t1\tBo_Ma", "line 3"),
    ("Ann_Lee\t1\tBo_Ma\t1\textra", "line 3"),
])
def test_malformed_lfw_lines_name_the_line_and_the_format(tmp_path, line, expected):
    f = tmp_path / "pairs.txt"
    f.write_text(f"10 300\nAnn_Lee\t1\t2\n{line}\nBo_Ma\t1\tCy_Ng\t1\n")
    with pytest.raises(ConfigError) as e:
        inp.read_pairs(f, tmp_path)
    assert expected in str(e.value)
    assert "'name n1 n2' (same person) or 'name1 n1 name2 n2' (different people)" in str(e.value)


def test_header_only_lfw_file_is_an_error(tmp_path):
    f = tmp_path / "pairs.txt"
    f.write_text("10 300\n")
    with pytest.raises(ConfigError, match="has no pairs"):
        inp.read_pairs(f)


def test_space_separated_list_cfp_style_and_other_lists(tmp_path):
    root = tmp_path / "cfp"
    # flattened CFP-FP protocol: frontal path, profile path, 1 / -1 (or 0), space separated
    f = tmp_path / "cfp_fp_pairs.txt"
    f.write_text("Data/Images/001/frontal/01.jpg Data/Images/001/profile/01.jpg 1\n"
                 "Data/Images/001/frontal/02.jpg  Data/Images/002/profile/03.jpg -1\n"
                 "Data/Images/003/frontal/01.jpg Data/Images/004/profile/01.jpg 0\n")
    pairs = inp.read_pairs(f, root)
    assert pairs.format == "list"
    assert [(p.a, p.b, p.same, p.line) for p in pairs] == [
        (root / "Data/Images/001/frontal/01.jpg", root / "Data/Images/001/profile/01.jpg", True, 1),
        (root / "Data/Images/001/frontal/02.jpg", root / "Data/Images/002/profile/03.jpg", False, 2),
        (root / "Data/Images/003/frontal/01.jpg", root / "Data/Images/004/profile/01.jpg", False, 3)]
    # header with named columns in another order, semicolons
    g = tmp_path / "named.csv"
    g.write_text("label;img2;img1\nsame;b.jpg;a.jpg\n")
    (p,) = inp.read_pairs(g, root)
    assert (p.a, p.b, p.same, p.line) == (root / "a.jpg", root / "b.jpg", True, 2)
    # absolute paths are kept
    h = tmp_path / "abs.csv"
    h.write_text(f"{tmp_path / 'x.jpg'},y.jpg,no\n")
    (p,) = inp.read_pairs(h, root)
    assert p.a == tmp_path / "x.jpg" and p.b == root / "y.jpg" and p.same is False


def test_malformed_list_lines_name_the_line_and_the_format(tmp_path):
    f = tmp_path / "pairs.csv"
    f.write_text("file_x,file_y,label\na.jpg,b.jpg,yes\n\nc.jpg,d.jpg\n")
    with pytest.raises(ConfigError, match=r"line 4 has 2 comma-separated column\(s\), expected file_x,file_y,label"):
        inp.read_pairs(f)
    f.write_text("a.jpg b.jpg 1\nc.jpg d.jpg perhaps\n")
    with pytest.raises(ConfigError, match=r"line 2: unknown label 'perhaps'"):
        inp.read_pairs(f)
    with pytest.raises(ConfigError, match="is a folder: give the pairs file itself"):
        inp.read_pairs(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        inp.read_pairs(tmp_path / "nope.txt")


def test_calibrate_lfw_pairs_end_to_end_and_wrong_root(tmp_path, monkeypatch):
    from facepriv.audit import runner
    from facepriv.cli import app

    lfw_tree(tmp_path, sub="images")
    monkeypatch.setattr(runner, "load_recognizers", lambda names, device: {"mean-colour": MeanColour()})
    out = tmp_path / "cal.json"
    res = CliRunner().invoke(app, ["-q", "audit", "calibrate", "--pairs", str(tmp_path / "pairs.txt"),
                                   "--models", "mean-colour", "--aligned", "--no-store", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads(out.read_text())["models"]["mean-colour"]
    assert rec["n_genuine"] == 2 and rec["n_impostor"] == 2
    assert rec["skipped_pairs"] == {"no_face": 0, "error": 0, "pairs": 4}
    # same person = same colour: cosine 1; different colours are far apart
    assert rec["genuine_scores"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert max(rec["impostor_scores"]) < 0.6 and rec["auc"] == pytest.approx(1.0)
    # a root without the person folders: the error names the missing image, its line and the
    # root that is expected
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    res = CliRunner().invoke(app, ["-q", "audit", "calibrate", "--pairs", str(tmp_path / "pairs.txt"),
                                   "--root", str(wrong), "--models", "mean-colour", "--aligned", "--no-store"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "image(s) named by the pairs file do not exist" in text and "(line 2 of pairs.txt)" in text
    assert "--root must be the folder that holds the person folders" in text
    assert "Ann_Lee/Ann_Lee_0001.jpg" in text and "Traceback" not in text


# ----------------------------------------------------------------------------- CFP as distributed
def _cfp(tmp_path: Path) -> Path:
    """A miniature CFP tree: Data/Images/<id>/{frontal,profile}/NN.jpg, Protocol/Pair_list_{F,P}.txt
    and Protocol/Split/{FP,FF}/01/{same,diff}.txt."""
    proto = tmp_path / "cfp" / "Protocol"
    f_lines, p_lines = [], []
    for i, ident in enumerate(("001", "002"), 1):
        for kind, lines in (("frontal", f_lines), ("profile", p_lines)):
            d = tmp_path / "cfp" / "Data" / "Images" / ident / kind
            d.mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(d / "01.jpg")
            lines.append(f"{i} ../Data/Images/{ident}/{kind}/01.jpg")
    proto.mkdir(parents=True, exist_ok=True)
    (proto / "Pair_list_F.txt").write_text("\n".join(f_lines) + "\n")
    (proto / "Pair_list_P.txt").write_text("\n".join(p_lines) + "\n")
    for split in ("FP", "FF"):
        fold = proto / "Split" / split / "01"
        fold.mkdir(parents=True)
        (fold / "same.txt").write_text("1,1\n2,2\n")
        (fold / "diff.txt").write_text("1,2\n")
    return proto


def test_cfp_split_folders_are_read_as_distributed(tmp_path):
    proto = _cfp(tmp_path)
    fp = inp.read_pairs(proto / "Split" / "FP")  # every fold of the split
    assert fp.format == "cfp" and [p.same for p in fp] == [True, True, False]
    assert fp[0].a.resolve() == (tmp_path / "cfp/Data/Images/001/frontal/01.jpg").resolve()
    assert fp[0].b.resolve() == (tmp_path / "cfp/Data/Images/001/profile/01.jpg").resolve()
    assert all(p.a.is_file() and p.b.is_file() for p in fp)
    ff = inp.read_pairs(proto / "Split" / "FF" / "01")  # one fold; both images frontal
    assert [p.b.parent.name for p in ff] == ["frontal"] * 3
    assert ff[2].b.resolve() == (tmp_path / "cfp/Data/Images/002/frontal/01.jpg").resolve()


def test_a_bad_cfp_line_or_missing_list_names_the_file(tmp_path):
    proto = _cfp(tmp_path)
    (proto / "Split" / "FP" / "01" / "diff.txt").write_text("1,9\n")
    with pytest.raises(ConfigError, match=r"diff.txt: line 1: '1,9': expected 'i,j' indexes"):
        inp.read_pairs(proto / "Split" / "FP")
    (proto / "Pair_list_P.txt").unlink()
    with pytest.raises(ConfigError, match="Pair_list_P.txt is missing"):
        inp.read_pairs(proto / "Split" / "FP")
