"""Audits with online APIs: each provider at its own endpoint with its own threshold, keys
checked before any model loads, a provider that stops or fails on every pair makes the CLI
exit 1 with the reason, and the key is never printed or written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facepriv.audit import run_audit
from facepriv.core.errors import ConfigError

from .api_mocks import KEY, SECRET, MockAzure, MockFacePP, digest, photo_dirs
from .helpers import MeanColour, audit_cfg


def test_audit_sends_each_api_to_its_own_endpoint_and_shows_thresholds(facepp_server, tmp_path, monkeypatch, capsys):
    from facepriv.audit import AuditConfig, run_audit
    from facepriv.audit.report import thresholds_seen_text
    from facepriv.cli import audit as cli_audit
    from facepriv.cli import common

    azure = MockAzure()
    try:
        orig, prot = tmp_path / "orig", tmp_path / "prot"
        orig.mkdir()
        prot.mkdir()
        for person, colour in (("ann", (200, 60, 40)), ("ben", (40, 60, 200))):
            for folder, shift in ((orig, 0), (prot, 9)):
                arr = np.full((112, 112, 3), colour, dtype=np.uint8) + shift
                Image.fromarray(arr).save(folder / f"{person}.png")
                d = digest((folder / f"{person}.png").read_bytes())
                facepp_server.identity[d] = person
                azure.identity[d] = person
        monkeypatch.setenv("FACEPP_API_KEY", KEY)
        monkeypatch.setenv("FACEPP_API_SECRET", SECRET)
        monkeypatch.setenv("AZURE_FACE_KEY", MockAzure.key)
        for var in ("AZURE_FACE_ENDPOINT", "FACEPP_ENDPOINT", "FACEPRIV_API_CONFIG"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
        monkeypatch.setenv("FACEPRIV_THRESHOLDS_DIR", str(tmp_path / "thresholds"))
        cfg = AuditConfig(protected=prot, original=orig, models=["mean-colour"], aligned=True, quality=False,
                          progress=False, device="cpu", out=tmp_path / "rep", apis=["facepp", "azure"],
                          api_endpoint=[f"facepp={facepp_server.url}", f"azure={azure.url}"],
                          api_threshold=["azure=0.9"], api_timeout=7, api_retries=1, api_rate=None,
                          api_cache=tmp_path / "cache")
        rep = run_audit(cfg, recognizers={"mean-colour": MeanColour(thresholds={"default": 0.5})})
        a = rep["apis"]
        # each provider went to its own server
        assert a["facepp"]["provider"]["endpoint"] == facepp_server.url and facepp_server.calls == 2
        assert a["azure"]["provider"]["endpoint"] == azure.url
        assert sum(c.endswith("/verify") for c in azure.calls) == 2
        for name in ("facepp", "azure"):
            assert a[name]["provider"]["timeout_s"] == 7 and a[name]["provider"]["retries"] == 1
        # Azure: same person at confidence 0.87, below the user's 0.9 -> "protected" (0.5 would say not)
        assert a["azure"]["dodging"]["psr"] == {"default": 1.0}
        assert a["azure"]["dodging"]["thresholds_seen"] == {"default": [0.9, 0.9]}
        # Face++: the thresholds of every response, min-max, in the HTML and in the terminal
        seen = a["facepp"]["dodging"]["thresholds_seen"]
        per_row = [c["thresholds"]["1e-3"] for r in rep["images"] for c in r["apis"]["facepp"]]
        assert seen["1e-3"] == [min(per_row), max(per_row)] and min(per_row) < max(per_row)
        text = thresholds_seen_text(seen)
        assert f"1e-3: {min(per_row):.2f}–{max(per_row):.2f}" in text
        html = (tmp_path / "rep" / "report.html").read_text()
        assert "thresholds used (min–max seen)" in html and text in html
        monkeypatch.setattr(common.out_console, "width", 400)
        capsys.readouterr()
        cli_audit.print_summary(rep)
        out = capsys.readouterr().out
        assert "facepp dodging: 2 pairs" in out and f"(thresholds {text})" in out
        assert "(thresholds default: 0.90)" in out
    finally:
        azure.close()


@pytest.mark.realmodels
def test_cli_audit_with_facepp_mock_never_prints_the_key(facepp_server, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from facepriv.cli import app
    from conftest import fixture_path

    orig, prot = tmp_path / "orig", tmp_path / "prot"
    orig.mkdir()
    prot.mkdir()
    for n in ("obama.jpg", "biden.jpg"):
        (orig / n).write_bytes(fixture_path(n).read_bytes())
        Image.open(orig / n).save(prot / n, quality=97)  # a "protected" copy: other bytes, same face
    # the mock says protected obama vs clean obama match; the service finds no face in protected biden
    facepp_server.identity[digest((orig / "obama.jpg").read_bytes())] = "obama"
    facepp_server.identity[digest((prot / "obama.jpg").read_bytes())] = "obama"
    facepp_server.no_face.add(digest((prot / "biden.jpg").read_bytes()))
    facepp_server.fail_first = [(403, "CONCURRENCY_LIMIT_EXCEEDED")]
    monkeypatch.setenv("FACEPP_API_KEY", KEY)
    monkeypatch.setenv("FACEPP_API_SECRET", SECRET)
    monkeypatch.setenv("FACEPRIV_OFFLINE", "1")
    monkeypatch.setenv("FACEPRIV_THRESHOLDS_DIR", str(tmp_path / "thresholds"))
    out = tmp_path / "report"
    args = ["--json", "audit", "--protected", str(prot), "--original", str(orig), "--models", "sface",
            "--out", str(out), "--api", "facepp", "--api-endpoint", facepp_server.url, "--api-cache",
            str(tmp_path / "cache"), "--api-rate", "0", "--no-fid", "--lpips", "none", "--api-timeout", "9",
            "--api-retries", "3"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    provider = json.loads((out / "report.json").read_text())["apis"]["facepp"]["provider"]
    assert provider["timeout_s"] == 9 and provider["retries"] == 3
    dod = summary["apis"]["facepp"]["dodging"]
    # obama: same person, verified -> not protected; biden: no face in the protected photo -> protected
    assert dod["n"] == 2 and dod["no_face_protected"] == 1
    assert dod["psr"]["1e-3"] == pytest.approx(0.5) and set(dod["psr"]) == {"1e-3", "1e-4", "1e-5"}
    assert summary["apis"]["facepp"]["retries"] == 1
    # the human output too
    res_h = CliRunner().invoke(app, args[1:])
    assert res_h.exit_code == 0
    assert "facepp dodging" in res_h.stdout and "cache hits" in res_h.stdout and "(thresholds" in res_h.stdout
    assert facepp_server.calls == 3  # 1 rate-limited + 2; the second run was served from the cache
    texts = [res.output, res_h.output, getattr(res, "stderr", "") or "", getattr(res_h, "stderr", "") or ""]
    texts += [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file()]
    texts += [p.read_text() for p in (tmp_path / "cache").rglob("*.json")]
    assert len(texts) >= 7
    for t in texts:
        assert KEY not in t and SECRET not in t
    # a bad key: clear error, no retry storm, key never shown
    monkeypatch.setenv("FACEPP_API_KEY", "bad-key-5555aaaa")
    res_bad = CliRunner().invoke(app, args[1:] + ["--out", str(tmp_path / "bad"), "--api-cache", str(tmp_path / "c2")],
                                 catch_exceptions=False)
    assert "AUTHENTICATION_ERROR" in res_bad.output or "AUTHENTICATION_ERROR" in (tmp_path / "bad/report.json").read_text()
    for p in [*(tmp_path / "bad").rglob("*")]:
        if p.is_file():
            assert "bad-key-5555aaaa" not in p.read_text(errors="replace")
    assert "bad-key-5555aaaa" not in res_bad.output


def test_missing_api_key_fails_before_any_model_or_embedding(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from facepriv.audit import runner
    from facepriv.cli import app

    work: list[str] = []

    def no_models(*a, **k):
        work.append("models loaded")
        raise AssertionError("recognition models were loaded before the API keys were checked")

    def no_embedding(self, *a, **k):
        work.append("embedding")
        raise AssertionError("images were embedded before the API keys were checked")

    monkeypatch.setattr(runner, "load_recognizers", no_models)
    monkeypatch.setattr(runner.FaceEmbeddingCache, "process", no_embedding)
    orig, prot = photo_dirs(tmp_path)
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["audit", "-p", str(prot), "--original", str(orig), "-m", "sface", "--out", str(out),
                                   "--api", "facepp", "--no-quality"])
    assert res.exit_code == 2, res.output
    assert "FACEPP_API_KEY" in res.output
    assert work == [] and not out.exists()
    # the library raises the same usage error, before the injected models are used
    with pytest.raises(ConfigError, match="FACEPP_API_KEY"):
        run_audit(audit_cfg(prot, orig, apis=["facepp"], out=tmp_path / "lib"), recognizers={"mean-colour": MeanColour()})
    assert work == [] and not (tmp_path / "lib").exists()


@pytest.mark.realmodels
def test_bad_key_exits_1_with_the_reason_and_never_the_key(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from facepriv.cli import app

    server = MockFacePP()
    try:
        orig, prot = photo_dirs(tmp_path)
        bad = "bad-key-7f3e9a1c55"
        monkeypatch.setenv("FACEPP_API_KEY", bad)
        monkeypatch.setenv("FACEPP_API_SECRET", SECRET)
        out = tmp_path / "report"

        def args(out: Path, cache: str = "cache", retries: str = "2") -> list[str]:
            return ["audit", "-p", str(prot), "--original", str(orig), "-m", "sface", "--out", str(out), "--api", "facepp",
                    "--api-endpoint", server.url, "--api-cache", str(tmp_path / cache), "--api-rate", "0",
                    "--api-retries", retries, "--no-quality"]

        res = CliRunner().invoke(app, args(out))
        assert res.exit_code == 1, res.output
        assert server.calls <= 2  # rejected credentials are not retried; the other pair is not even sent
        assert "error: facepp stopped: Face++ rejected the credentials (HTTP 401 AUTHENTICATION_ERROR)" in res.stdout
        rep = json.loads((out / "report.json").read_text())
        a = rep["apis"]["facepp"]
        assert a["status"] == "stopped" and "AUTHENTICATION_ERROR" in a["stopped"]
        assert a["pairs"] == a["failed_pairs"] == 2 and rep["errors"] == []  # the local audit itself was fine
        html = (out / "report.html").read_text()
        assert "facepp stopped: Face++ rejected the credentials" in html
        # --json: the summary says it too, the reason goes to stderr, exit 1
        res_j = CliRunner().invoke(app, ["--json", *args(tmp_path / "report_j")])
        assert res_j.exit_code == 1
        summary = json.loads(res_j.stdout)
        assert summary["apis"]["facepp"]["status"] == "stopped"
        assert summary["api_problems"] and "AUTHENTICATION_ERROR" in summary["api_problems"][0]
        assert "facepp stopped" in res_j.stderr
        texts = [res.output, res_j.output, res_j.stderr]
        texts += [p.read_text(errors="replace") for d in (out, tmp_path / "report_j") for p in d.rglob("*")]
        assert len(texts) == 9
        for t in texts:
            assert bad not in t and SECRET not in t
        # a good key whose every pair fails (the service keeps erroring, no retries left): exit 1 too
        monkeypatch.setenv("FACEPP_API_KEY", KEY)
        server.fail_first = [(500, "INTERNAL_ERROR")] * 4
        res_f = CliRunner().invoke(app, args(tmp_path / "report_f", cache="cache_f", retries="0"))
        assert res_f.exit_code == 1, res_f.output
        assert "error: facepp: all 2 pair(s) failed: Face++ HTTP 500 INTERNAL_ERROR" in res_f.stdout
        assert json.loads((tmp_path / "report_f" / "report.json").read_text())["apis"]["facepp"]["status"] == "failed"
    finally:
        server.close()
