"""facepriv patch apply: every patched face is verified against the generator's surrogates, and the
manifest rows carry the ``attack`` records the batch summary turns into per-face lines and a verdict."""

from __future__ import annotations

import dataclasses
import json
import shutil

import torch

from conftest import fixture_path
from facepriv.attacks import SurrogateEnsemble
from facepriv.cli.common import _far_of, _verified_faces
from facepriv.models import get_spec
from facepriv.models.recognition import FaceRecognizer
from test_patch import _noisy_generator, _TinyFR
from test_patch_apply_batch import _rows, _run, photos  # noqa: F401 - photos is a fixture

NAMES = ("tiny-pass", "tiny-match", "tiny-none")


def _ensemble(calls):
    """Three tiny recognisers: one whose threshold every face passes, one no face passes, one with
    no threshold. ``calls`` counts each model's forward passes."""
    torch.manual_seed(0)
    base = get_spec("sface")
    models = []
    for name, th in zip(NAMES, ({"1e-2": 1.01}, {"1e-2": -1.01}, {})):
        spec = dataclasses.replace(base, name=name, thresholds=th, threshold_kind="protocol")
        net = _TinyFR()
        net.register_forward_hook(lambda *_a, n=name: calls.append(n))
        models.append(FaceRecognizer(spec, net, lambda x: x * 2 - 1))
    return SurrogateEnsemble([], models=models)


def _name_surrogates(gen_dir):
    """The surrogates a trained generator names in its validation record."""
    meta = json.loads((gen_dir / "config.json").read_text())
    meta["validation"] = {"evasion_rate": 0.9, "far": "1e-2", "faces": 10, "judged_by": list(NAMES[:2]),
                          "surrogates": {n: {} for n in NAMES}}
    (gen_dir / "config.json").write_text(json.dumps(meta))


def test_applied_batch_rows_carry_a_verdict_for_every_surrogate(tmp_path, photos, monkeypatch):  # noqa: F811
    from facepriv.patch import apply as apply_mod

    gen_dir = _noisy_generator(tmp_path)
    _name_surrogates(gen_dir)
    calls, loaded = [], []

    def load(names, device):
        loaded.append(list(names))
        return _ensemble(calls)

    monkeypatch.setattr(apply_mod, "_load_surrogates", load)
    s = _run(photos, tmp_path / "out", gen_dir, 16, warn=False)
    assert loaded == [list(NAMES)]  # once per run, the names the generator's config gives
    assert s.counts == {"ok": 4, "error": 1, "copied": 1}
    assert s.details["far"] == "1e-2" and s.to_json()["details"]["surrogates"] == list(NAMES)
    # one batched forward per model per photo (clean and patched faces together)
    assert sorted(calls) == sorted(list(NAMES) * 4)

    rows = _rows(tmp_path / "out")
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == 4
    for r in ok:
        assert [a["face"] for a in r["attack"]] == list(range(r["faces"]))
        for a in r["attack"]:
            assert a["status"] == "attacked" and a["mode"] == "dodging"
            assert a["passed"] == {"tiny-pass": True, "tiny-match": False, "tiny-none": None}
        assert "verify_s" in r["timings"]
    assert all("attack" not in r for r in rows.values() if r["status"] != "ok")

    # what print_batch_summary reads: 8 faces, still matched by tiny-match, at FAR 1e-2
    faces = _verified_faces(s)
    assert len(faces) == 8 and {f.outcome for f in faces} == {"matches"}
    assert _far_of(s, faces) == "1e-2"

    # verify=False: no surrogates loaded, nothing recorded; the settings hash is unchanged (resume works)
    loaded.clear()
    s2 = _run(photos, tmp_path / "off", gen_dir, 16, warn=False, cfg={"verify": False})
    assert loaded == [] and s2.details == {}
    assert all("attack" not in r for r in _rows(tmp_path / "off").values())
    again = _run(photos, tmp_path / "out", gen_dir, 16, warn=False, resume=True, cfg={"verify": False})
    assert again.resumed == 5


def test_impersonation_is_judged_against_the_target(tmp_path, photos):  # noqa: F811
    gen_dir = _noisy_generator(tmp_path)  # names no surrogates: they are given here
    target = tmp_path / "target.jpg"
    shutil.copy(fixture_path("biden.jpg"), target)
    (photos / "c_broken.jpg").unlink()
    calls = []
    s = _run(photos, tmp_path / "imp", gen_dir, 8, warn=False, cfg={"target": str(target)},
             surrogates=_ensemble(calls))
    assert s.counts == {"ok": 4, "copied": 1}
    assert sorted(calls) == sorted(list(NAMES) * 5)  # the target once, then one pass per photo
    for r in _rows(tmp_path / "imp").values():
        for a in r.get("attack", []):
            assert a["mode"] == "impersonation"
            # similarity >= threshold: everything reaches -1.01, nothing 1.01
            assert a["passed"] == {"tiny-pass": False, "tiny-match": True, "tiny-none": None}
    assert len(_verified_faces(s)) == 8


def test_a_generator_naming_no_surrogates_is_not_verified(tmp_path, photos, capsys):  # noqa: F811
    gen_dir = _noisy_generator(tmp_path)
    s = _run(photos, tmp_path / "out", gen_dir, 16)
    assert s.details == {} and s.counts["ok"] == 4
    assert "names no surrogates: the patched faces are not verified" in capsys.readouterr().err
    assert all("attack" not in r for r in _rows(tmp_path / "out").values())
