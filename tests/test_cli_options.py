"""Numeric options checked when the command line is parsed (one --epsilon parser for every
command), help that shows every default and explains its words, -o/--out everywhere, and
--quiet printing errors only."""

from __future__ import annotations

import math
import shutil
from typing import Annotated

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from conftest import fixture_path
from facepriv.attacks.config import EPSILON_MAX, AttackConfig, parse_epsilon
from facepriv.cli import app
from facepriv.cli import common
from facepriv.cli.common import hoist_global_options
from facepriv.core.batch import BatchSummary
from facepriv.core.errors import ConfigError

runner = CliRunner()
WIDE = {"COLUMNS": "250"}  # one help line per option: phrases are not wrapped apart


def invoke(*args, env=None):
    return runner.invoke(app, hoist_global_options(list(map(str, args))), env=env or WIDE)


def said(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture
def photo_dir(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    shutil.copy(fixture_path("obama.jpg"), d / "obama.jpg")
    return d


# ----------------------------------------------------------------------------- parse_epsilon
@pytest.mark.parametrize("text, levels", [("8/255", 8), ("8", 8), ("16", 16), ("1", 1), ("64/255", 64),
                                          ("64", 64), (" 4/255 ", 4), (8, 8), (0.03, 0.03 * 255)])
def test_epsilon_accepts_a_ratio_whole_levels_or_a_fraction(text, levels):
    assert parse_epsilon(text) * 255 == pytest.approx(levels)


def test_epsilon_fraction_text_is_taken_as_a_fraction_of_the_range():
    assert parse_epsilon("0.03") == pytest.approx(0.03)


@pytest.mark.parametrize("bad, why", [
    ("8/0", "denominator is zero"), ("abc", "not a number"), ("8/x", "not a number"), ("0", "(0, 64/255]"),
    ("-1", "(0, 64/255]"), ("0/255", "(0, 64/255]"), ("256", "(0, 64/255]"), ("255", "(0, 64/255]"),
    ("65", "(0, 64/255]"), ("1.5", "whole number"), ("0.3", "(0, 64/255]"), ("300/255", "(0, 64/255]"),
    ("nan", "finite"), ("inf", "finite"), (True, "not a number"),
])
def test_epsilon_rejects_zero_denominators_non_numbers_and_out_of_range(bad, why):
    with pytest.raises(ConfigError) as err:
        parse_epsilon(bad)
    msg = str(err.value)
    assert msg.startswith(f"--epsilon {str(bad).strip()}:") and why in msg


def test_epsilon_range_message_explains_the_scale():
    with pytest.raises(ConfigError, match=r"--epsilon 1\.5: must be in \(0, 64/255\] \(e\.g\. 8/255 = about 3 % of "
                                          r"the pixel range\)"):
        parse_epsilon("1.5")


def test_attack_config_checks_the_same_range():
    assert AttackConfig(epsilon=EPSILON_MAX).resolved().epsilon == pytest.approx(64 / 255)
    assert AttackConfig(epsilon=parse_epsilon("8")).resolved().epsilon == pytest.approx(8 / 255)
    for eps in (65 / 255, 0.5, 1.0, 0.0, -0.01, math.nan):
        with pytest.raises(ConfigError, match=r"\(0, 64/255\]"):
            AttackConfig(epsilon=eps).resolved()


# ----------------------------------------------------------------------------- the shared option
def test_shared_epsilon_option_converts_and_exits_2_with_the_range_message():
    seen = []
    mini = typer.Typer()

    @mini.command("plain")
    def plain(epsilon: common.Epsilon = None):
        seen.append(epsilon)

    @mini.command("custom")
    def custom(epsilon: Annotated[str | None, common.epsilon_option(help="my budget", rich_help_panel="X")] = "8/255"):
        seen.append(epsilon)

    for cmd in ("plain", "custom"):
        ok = runner.invoke(mini, [cmd, "--epsilon", "4"])
        assert ok.exit_code == 0 and seen[-1] == pytest.approx(4 / 255)
        for bad in ("8/0", "256", "1.5", "0"):
            r = runner.invoke(mini, [cmd, "--epsilon", bad], env=WIDE)
            assert r.exit_code == 2, bad
            assert f"--epsilon {bad}:" in said(r) and "Traceback" not in r.output
            assert "ZeroDivisionError" not in r.output
    assert runner.invoke(mini, ["plain"]).exit_code == 0 and seen[-1] is None
    assert runner.invoke(mini, ["custom"]).exit_code == 0 and seen[-1] == pytest.approx(8 / 255)  # default parsed too
    assert "my budget" in runner.invoke(mini, ["custom", "--help"]).output


@pytest.mark.parametrize("bad", ["8/0", "256", "255", "1.5", "abc"])
def test_deid_epsilon_is_a_usage_error_at_parse_time(tmp_path, photo_dir, bad):
    out = tmp_path / "o"
    r = invoke("deid", photo_dir, "--method", "adversarial", "--epsilon", bad, "--out", out)
    assert r.exit_code == 2
    assert f"--epsilon {bad}:" in said(r) and "ZeroDivisionError" not in r.output
    assert not out.exists()


class _Captured(Exception):
    pass


def _fake_summary(tmp_path, failures=()):
    counts = {"ok": 1} if not failures else {"ok": 1, "error": len(failures)}
    return BatchSummary(1 + len(failures), counts, list(failures), 0, 0.1, tmp_path / "missing-manifest.jsonl")


@pytest.fixture
def fake_deid(monkeypatch, tmp_path):
    """run_deid replaced: the CLI's config is recorded and a one-file summary returned."""
    import facepriv.deid as deid_pkg

    seen = {}

    def run(inputs, out, cfg, **kw):
        seen["cfg"] = cfg
        return seen.get("summary") or _fake_summary(tmp_path)

    monkeypatch.setattr(deid_pkg, "run_deid", run)
    return seen


@pytest.mark.parametrize("text, expected", [("8/255", 8 / 255), ("8", 8 / 255), ("0.03", 0.03)])
def test_deid_epsilon_takes_the_same_forms_as_protect(tmp_path, photo_dir, fake_deid, text, expected):
    r = invoke("deid", photo_dir, "--method", "adversarial", "--epsilon", text, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert fake_deid["cfg"].options["adversarial"]["epsilon"] == pytest.approx(expected)


def test_deid_epsilon_times_strength_over_the_cap_is_a_usage_error(tmp_path, photo_dir, fake_deid):
    r = invoke("deid", photo_dir, "--method", "adversarial", "--epsilon", "40", "--strength", "2",
               "--out", tmp_path / "o")
    assert r.exit_code == 2 and "(0, 64/255]" in said(r) and "--strength" in said(r)
    assert "cfg" not in fake_deid


# ----------------------------------------------------------------------------- other numbers
@pytest.mark.parametrize("args", [
    ["deid", "{photos}", "--method", "adversarial", "--steps", "0"],
    ["deid", "{photos}", "--strength", "0"],
    ["deid", "{photos}", "--strength", "-1"],
    ["deid", "{photos}", "--quality", "0"],
    ["deid", "{photos}", "--quality", "101"],
    ["deid", "{photos}", "--method", "k-same-average", "--k", "1"],
    ["deid", "{photos}", "--feather", "-0.1"],
    ["deid", "{photos}", "--noise-sigma", "0"],
    ["deid", "{photos}", "--min-face-size", "-5"],
    ["deid", "{photos}", "--method", "mask", "--color", "300,0,0"],
    ["patch", "train", "--data", "{photos}", "--lr", "0"],
    ["patch", "train", "--data", "{photos}", "--evasion-share", "1.5"],
    ["patch", "train", "--data", "{photos}", "--tv", "-1"],
    ["patch", "train", "--data", "{photos}", "--patch-size", "4"],
    ["patch", "apply", "{photos}", "--generator", "{photos}", "--batch-size", "0"],
    ["audit", "--protected", "{photos}", "--original", "{photos}", "--api-rate", "-1"],
    ["audit", "--protected", "{photos}", "--original", "{photos}", "--batch-size", "0"],
])
def test_out_of_range_numbers_are_usage_errors(tmp_path, photo_dir, fake_deid, args):
    out = tmp_path / "o"
    r = invoke(*[a.format(photos=photo_dir) for a in args], "--out", out)
    assert r.exit_code == 2, r.output
    assert "cfg" not in fake_deid and not out.exists()


# ----------------------------------------------------------------------------- help
def _help(*cmd) -> str:
    """The help text with the panel borders and rich's line wrapping taken out."""
    r = invoke(*cmd, "--help")
    assert r.exit_code == 0, r.output
    return " ".join(r.output.replace("│", " ").split())


def test_deid_help_shows_every_default_and_explains_the_jargon():
    text = _help("deid")
    for default in ("[default: blur]", "[default: 8/255]", "[default: pgd]", "[default: 20]",
                    "[default: dlib-resnet,facenet-casia]", "[default: 178956970]", "[default: a photo of a face]"):
        assert default in text, default
    assert "each pixel changes by at most 8 of 255 levels" in text
    assert "the face-recognition models the noise is optimised against" in text
    assert "dodging" in text and "impersonation" in text
    for attack in ("pgd", "mifgsm", "tidim", "tipim"):
        assert attack in text


@pytest.mark.parametrize("cmd", [("deid",), ("patch", "train"), ("patch", "apply"), ("audit",), ("protect",)])
def test_flags_are_shown_without_a_value_type(cmd):
    text = _help(*cmd)
    assert "<bool>" not in text
    assert "--help" in text


def test_on_off_flags_show_both_forms():
    text = _help("audit")
    assert "--no-amp" in text and "[default: on with CUDA, else off]" in text
    assert "--no-expression-guard" in _help("deid")
    assert "--no-eot" in _help("patch", "train")


def test_patch_help_explains_surrogates_and_evasion():
    text = _help("patch") + " " + _help("patch", "train")
    assert "face-recognition models the patch is optimised against" in text
    assert "dodging" in text


def test_audit_short_o_is_out_like_every_other_command():
    group = get_command(app)
    audit = group.commands["audit"]
    by_opt = {o: p.name for p in audit.params for o in getattr(p, "opts", [])}
    assert by_opt["-o"] == "out" and by_opt["--out"] == "out"
    assert by_opt["--original"] == "original"
    assert not [o for o, name in by_opt.items() if name == "original" and not o.startswith("--")]
    deid = group.commands["deid"]
    assert {o: p.name for p in deid.params for o in getattr(p, "opts", [])}["-o"] == "out"
    assert "dodging" in _help("audit").lower()


# ----------------------------------------------------------------------------- --quiet
def test_quiet_deid_prints_nothing_when_all_went_well(tmp_path, photo_dir, fake_deid):
    (photo_dir / "anim.gif").write_bytes(b"GIF89a")  # a skipped-file warning, normally
    loud = invoke("deid", photo_dir, "--method", "blur", "--out", tmp_path / "o")
    assert loud.exit_code == 0 and "skipped 1 file" in said(loud) and "processed" in said(loud)
    quiet = invoke("-q", "deid", photo_dir, "--method", "blur", "--out", tmp_path / "o2")
    assert quiet.exit_code == 0 and quiet.output.strip() == ""


def test_quiet_deid_still_prints_the_failures_as_errors(tmp_path, photo_dir, fake_deid):
    fake_deid["summary"] = _fake_summary(tmp_path, [(str(photo_dir / "bad.jpg"), "cannot decode it\ndetail")])
    r = invoke("deid", photo_dir, "--out", tmp_path / "o", "-q")
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines == [f"error: {photo_dir / 'bad.jpg'}: cannot decode it"]


def test_quiet_patch_apply_prints_nothing_when_all_went_well(tmp_path, photo_dir, monkeypatch):
    import facepriv.patch as patch_pkg

    warned = []

    def run(*a, warn=True, **k):
        warned.append(warn)  # the generator's "will probably not protect" warning
        return _fake_summary(tmp_path)

    monkeypatch.setattr(patch_pkg, "run_patch_apply", run)
    args = ("patch", "apply", photo_dir, "--generator", tmp_path, "--out", tmp_path / "o")
    loud = invoke(*args)
    assert loud.exit_code == 0 and "no --target" in loud.output and "processed" in loud.output
    quiet = invoke("-q", *args)
    assert quiet.exit_code == 0 and quiet.output.strip() == ""
    assert warned == [True, False]


def test_quiet_audit_prints_only_errors(tmp_path, photo_dir, monkeypatch):
    import facepriv.audit as audit_pkg
    import facepriv.cli.audit as audit_cli

    report = {"errors": [{"file": "x.jpg", "error": "no match"}], "outputs": {"html": str(tmp_path / "r.html")}}
    monkeypatch.setattr(audit_pkg, "run_audit", lambda cfg: report)
    monkeypatch.setattr(audit_pkg, "summarize", lambda rep: {})
    monkeypatch.setattr(audit_cli, "print_summary", lambda rep: audit_cli.out_console.print("SUMMARY"))
    args = ("audit", "--protected", photo_dir, "--original", photo_dir, "-o", tmp_path / "r")
    assert "SUMMARY" in invoke(*args).output
    r = invoke("-q", *args)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines == ["error: x.jpg: no match"]


def test_global_quiet_help_says_errors_only():
    assert "Errors only: no progress bars, notes, warnings or summaries" in _help()
