"""The `facepriv audit` command line: terminal tables that fit 80 columns, notes printed
verbatim, error messages with their brackets intact and secrets redacted, usage errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from facepriv.audit import FARS, calibrate_scores
from facepriv.core.errors import ConfigError

from .helpers import render_text, solid


def _failing_app(exc: Exception) -> typer.Typer:
    from facepriv.cli.common import handle_errors

    app = typer.Typer()

    @app.command()
    @handle_errors
    def run():
        raise exc

    return app


@pytest.mark.parametrize("exc, code, shown", [
    (ConfigError("AWS Rekognition needs boto3: pip install 'facepriv[aws]'; or the [facepp] section of the file"),
     2, "AWS Rekognition needs boto3: pip install 'facepriv[aws]'; or the [facepp] section of the file"),
    (RuntimeError("[bold]not markup[/bold] :smile: [/]"), 1, "RuntimeError: [bold]not markup[/bold] :smile: [/]"),
])
def test_error_messages_print_brackets_verbatim(exc, code, shown):
    res = CliRunner().invoke(_failing_app(exc), [])
    assert res.exit_code == code
    assert f"error: {shown}" in res.output


def test_batch_summary_failures_print_brackets_verbatim(capsys, monkeypatch):
    from types import SimpleNamespace

    from facepriv.cli import common

    monkeypatch.setattr(common.out_console, "width", 300)
    summary = SimpleNamespace(counts={"error": 1}, no_face={}, resumed=0, elapsed=1.0,
                              failures=[("in/[x] photo.jpg", "cannot read [red]this[/red] file\nsecond line")],
                              manifest=Path("out/[run]/manifest.jsonl"))
    common.print_batch_summary(summary, "t")
    out = capsys.readouterr().out
    assert "in/[x] photo.jpg: cannot read [red]this[/red] file" in out and "second line" not in out
    assert "manifest: out/[run]/manifest.jsonl" in out


def test_cli_error_messages_and_tracebacks_are_redacted(capsys, monkeypatch):
    from facepriv.core.secrets import register_secret
    from facepriv.cli import common
    from facepriv.core.errors import ConfigError

    secret = "sk-review-7f3a9c1e5b"
    register_secret(secret)

    def boom():
        try:
            raise OSError(f"connect failed for key {secret}")
        except OSError as exc:
            raise RuntimeError(f"request https://x/compare?api_key=plainvalue99&sig={secret} failed") from exc

    for verbose in (False, True):
        monkeypatch.setattr(common.state, "verbose", verbose)
        with pytest.raises(typer.Exit) as info:
            common.handle_errors(boom)()
        assert info.value.exit_code == common.FAILURE_EXIT
        err = capsys.readouterr().err
        assert secret not in err and "plainvalue99" not in err
        assert "RuntimeError" in err and "api_key=***" in err and "sig=***" in err
        if verbose:  # the traceback is printed, chained cause included, with its message redacted
            assert "Traceback" in err and "OSError" in err and "connect failed for key ***" in err

    def bad_option():
        raise ConfigError(f"--api-endpoint https://user:{secret}@host is not allowed")

    monkeypatch.setattr(common.state, "verbose", False)
    with pytest.raises(typer.Exit) as info:
        common.handle_errors(bad_option)()
    assert info.value.exit_code == common.USAGE_EXIT
    err = capsys.readouterr().err
    assert secret not in err and "https://user:***@host" in err


def test_cli_missing_protected_folder(tmp_path, monkeypatch):
    from facepriv.cli import app

    monkeypatch.chdir(tmp_path)
    solid(tmp_path / "o" / "a.png", (1, 2, 3))
    res = CliRunner().invoke(app, ["-q", "audit", "--protected", "nope", "--original", "o", "--models", "sface",
                                   "--out", "rep"])
    assert res.exit_code == 2 and "error: --protected folder nope does not exist" in res.output


# ------------------------------------------------------------------------------ terminal output
def test_psr_table_fits_80_columns_with_one_protocol():
    from rich.console import Console

    from facepriv.cli.audit import psr_table

    rates = {"1e-1": 0.0, "1e-2": 0.0, "1e-3": 0.0}
    for proto in ("self", "other-photos"):
        sub = {"n": 1, "psr": rates, "psr_faces": {"1e-3": 0.0}, "mean_similarity": 0.99}
        d = {**sub, "n_faces": 1, "before": {"psr": {"1e-3": 0.0}},
             "by_protocol": {"other-photos": {"n": 0}, "self": {"n": 0}} | {proto: sub}}
        rep = {"models": {"facenet-casia": {"dodging": d, "impersonation": {**sub, "n": 3, "before": {"psr": rates}}}}}
        console = Console(width=80, record=True)
        console.print(psr_table(rep))
        text = console.export_text()
        assert "…" not in text and "before" in text and max(len(line) for line in text.splitlines()) <= 80


def test_calibrate_tables_fit_80_columns():
    from facepriv.cli.audit import calibration_tables

    rng = np.random.default_rng(0)
    result = {}
    for name, shift in (("facenet-vggface2", 0.0), ("dlib-resnet", -1.0)):  # longest name; negative distances
        rec = calibrate_scores(rng.normal(0.6 + shift, 0.1, 300), rng.normal(0.1 + shift, 0.1, 2700),
                               default_threshold=0.5 + shift)
        rec.update(n_genuine=300, n_impostor=2700)
        result[name] = rec
    text = "".join(render_text(t, 80) for t in calibration_tables(result, "deepface-pairs.csv"))
    assert "…" not in text and max(len(ln) for ln in text.splitlines()) <= 80
    for name, rec in result.items():
        assert name in text and f"{rec['auc']:.4f}" in text and f"{100 * rec['eer']:.2f}%" in text
        for far in FARS:
            assert f"{rec['thresholds'][far]:.4f} ({100 * rec['tar_at_far'][far]:.1f}%)" in text
    assert "300/2700" in text and "FAR 1e-3" in text


def test_terminal_prints_the_quality_notes_verbatim(capsys, monkeypatch):
    from facepriv.cli import audit as cli_audit
    from facepriv.cli import common

    rep = {"models": {}, "thresholds": {}, "faces": {},
           "quality": {"psnr": 31.0, "n_identical": 1, "psnr_note": "1 of 2 protected image(s) are [bold]identical[/bold]",
                       "fid": 12.5, "fid_note": "FID over 2 images is strongly biased [x]", "unavailable": {}}}
    monkeypatch.setattr(common.out_console, "width", 300)
    cli_audit.print_summary(rep)
    out = capsys.readouterr().out
    assert "PSNR: 1 of 2 protected image(s) are [bold]identical[/bold]" in out
    assert "FID: FID over 2 images is strongly biased [x]" in out
