"""The terminal summary after protect / deid: per face, whether each model still matches it, and a
one-line verdict, read from the run's manifest rows (fake summaries, no models)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from facepriv.cli import common

RUN = "run1"


@pytest.fixture(autouse=True)
def _plain_console(monkeypatch):
    monkeypatch.setattr(common.out_console, "width", 300)
    monkeypatch.setattr(common.state, "quiet", False)
    monkeypatch.setattr(common.state, "json", False)


def _sim(**passed):
    return {m: {"before": 1.0, "after": 0.2, "threshold": None if p is None else 0.4, "passed": p, "metric": "cosine"}
            for m, p in passed.items()}


def _deid_row(name: str, faces: list[dict], run_id: str = RUN, status: str = "ok") -> dict:
    return {"input": f"/in/{name}", "status": status, "run_id": run_id,
            "deid": {"adversarial": {"attack": "pgd", "linf": 0.03, "far": "1e-2", "faces": faces}}}


def _face(i: int, status: str = "attacked", reason: str | None = None, **passed) -> dict:
    row = {"face": i, "status": status, "mode": "dodging", "steps": 20,
           "similarity": _sim(**{k.replace("_", "-"): v for k, v in passed.items()})}
    if reason:
        row["reason"] = reason
    return row


def _summary(tmp_path: Path, rows: list[dict], details: dict | None = None, failures=()) -> SimpleNamespace:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts: dict[str, int] = {}
    for r in rows:
        if r.get("run_id") == RUN:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
    s = SimpleNamespace(counts=counts, no_face={}, resumed=0, elapsed=1.0, failures=list(failures),
                        manifest=manifest, run_id=RUN, total=sum(counts.values()))
    if details is not None:
        s.details = details
    s.to_json = lambda: {"total": s.total, "counts": s.counts, "manifest": str(manifest), "run_id": RUN}
    return s


def test_each_face_says_which_models_still_match_and_a_model_without_threshold_says_so(tmp_path, capsys):
    rows = [_deid_row(f"p{k}.jpg", [_face(0, dlib_resnet=True, facenet_casia=None)]) for k in range(4)]
    rows.append(_deid_row("b.jpg", [_face(0, dlib_resnet=False, facenet_casia=None)]))
    common.print_batch_summary(_summary(tmp_path, rows), "deid (adversarial)")
    out = capsys.readouterr().out
    assert "p0.jpg face 0: dlib-resnet no longer matches; facenet-casia no threshold" in out
    assert "b.jpg face 0: dlib-resnet still matches; facenet-casia no threshold" in out
    assert ("4 of 5 faces no longer match dlib-resnet at FAR 1e-2; 1 still matches: b.jpg face 0 "
            "(facenet-casia: no threshold)") in out
    verdict_lines = [ln for ln in out.splitlines() if "facenet-casia" in ln]
    assert not any(" - " in ln or "False" in ln or "false" in ln for ln in verdict_lines)


def test_protect_rows_with_passed_flags_and_the_far_from_the_run_details(tmp_path, capsys):
    rows = [{"input": "/in/a.jpg", "status": "ok", "run_id": RUN, "attack": [
        {"face": 0, "status": "attacked", "mode": "dodging", "passed": {"dlib-resnet": True, "facenet-casia": True}},
        {"face": 1, "status": "attacked", "mode": "dodging", "passed": {"dlib-resnet": True, "facenet-casia": True}},
    ]}]
    common.print_batch_summary(_summary(tmp_path, rows, details={"attack": {"far": "1e-3"}}), "protect (pgd)")
    out = capsys.readouterr().out
    assert "a.jpg face 1: dlib-resnet no longer matches; facenet-casia no longer matches" in out
    assert "2 of 2 faces no longer match dlib-resnet, facenet-casia at FAR 1e-3" in out
    assert "still match" not in out


def test_a_failed_face_is_shown_as_not_protected_and_counted_as_still_matching(tmp_path, capsys):
    rows = [_deid_row("ok.jpg", [_face(0, dlib_resnet=True)]),
            _deid_row("bad.jpg", [_face(0, "failed", "the attack changed no pixel", dlib_resnet=False)],
                      status="error")]
    common.print_batch_summary(_summary(tmp_path, rows, failures=[("/in/bad.jpg", "left unprotected")]), "deid")
    out = capsys.readouterr().out
    assert "bad.jpg face 0: not protected (the attack changed no pixel)" in out
    assert "1 of 2 faces no longer matches dlib-resnet at FAR 1e-2; 1 still matches: bad.jpg face 0" in out
    assert "(1 not protected at all)" in out


def test_big_batches_list_ten_faces_then_a_count(tmp_path, capsys):
    rows = [_deid_row(f"p{k:02d}.jpg", [_face(0, dlib_resnet=k % 5 != 0)]) for k in range(25)]
    common.print_batch_summary(_summary(tmp_path, rows), "deid")
    out = capsys.readouterr().out
    assert sum(" face 0: " in ln for ln in out.splitlines()) == 10
    assert "... and 15 more face(s) (3 still matching)" in out
    assert "20 of 25 faces no longer match dlib-resnet" in out
    assert "5 still match: p00.jpg face 0, p05.jpg face 0, p10.jpg face 0, p15.jpg face 0, p20.jpg face 0" in out


def test_only_this_runs_rows_are_judged(tmp_path, capsys):
    rows = [_deid_row("old.jpg", [_face(0, dlib_resnet=False)], run_id="earlier"),
            _deid_row("new.jpg", [_face(0, dlib_resnet=True)])]
    common.print_batch_summary(_summary(tmp_path, rows), "deid")
    out = capsys.readouterr().out
    assert "old.jpg" not in out and "1 of 1 face no longer matches dlib-resnet" in out


def test_no_threshold_at_all_is_said_plainly(tmp_path, capsys):
    rows = [_deid_row("a.jpg", [_face(0, facenet_casia=None)])]
    common.print_batch_summary(_summary(tmp_path, rows), "deid")
    out = capsys.readouterr().out
    assert "a.jpg face 0: facenet-casia no threshold" in out
    assert "1 face: no model with a threshold to judge by (facenet-casia: no threshold)" in out


def test_methods_without_verification_print_no_verdict(tmp_path, capsys):
    rows = [{"input": "/in/a.jpg", "status": "ok", "run_id": RUN, "deid": {"k-same": {"k": 3, "faces": [{"pool": 1}]}}},
            {"input": "/in/b.jpg", "status": "ok", "run_id": RUN, "mode": "evasion", "boxes": [[0, 0, 9, 9]]}]
    common.print_batch_summary(_summary(tmp_path, rows), "deid")
    out = capsys.readouterr().out
    assert "face 0" not in out and "match" not in out and "2 processed" in out


def test_quiet_keeps_the_verdict_line_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common.state, "quiet", True)
    rows = [_deid_row("a.jpg", [_face(0, dlib_resnet=True)]), _deid_row("b.jpg", [_face(0, dlib_resnet=False)])]
    common.print_batch_summary(_summary(tmp_path, rows), "deid")
    out = capsys.readouterr().out
    assert "a.jpg face 0:" not in out
    assert "1 of 2 faces no longer matches dlib-resnet at FAR 1e-2; 1 still matches: b.jpg face 0" in out


def test_json_carries_the_verdict_and_prints_nothing_else(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common.state, "json", True)
    rows = [_deid_row("a.jpg", [_face(0, dlib_resnet=True, facenet_casia=None)]),
            _deid_row("b.jpg", [_face(0, dlib_resnet=False, facenet_casia=None)])]
    common.print_batch_summary(_summary(tmp_path, rows), "deid")
    payload = json.loads(capsys.readouterr().out)
    prot = payload["protection"]
    assert prot["faces"] == 2 and prot["protected"] == 1 and prot["far"] == "1e-2"
    assert prot["still_matching"] == [{"file": "b.jpg", "face": 0, "status": "attacked", "reason": None,
                                       "matches": ["dlib-resnet"]}]
    assert prot["no_threshold"] == ["facenet-casia"]
    assert payload["counts"] == {"ok": 2}
