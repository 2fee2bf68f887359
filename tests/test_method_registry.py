"""The method tables: the L-inf attacks' traits (facepriv.attacks.config.METHODS) and the
protect registry (facepriv.protect.registry), checked against the code and the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import typer
from conftest import fixture_path
from PIL import Image

from facepriv.attacks.config import METHOD_NAMES, METHODS, AttackConfig, MethodTraits, method_traits
from facepriv.cli import app
from facepriv.core.errors import ConfigError
from facepriv.core.faces import Face, FaceDetector
from facepriv.protect import ProtectConfig, run_protect
from facepriv.protect.pipeline import BASELINE_METHODS, method_names
from facepriv.protect.registry import (PROTECT_METHODS, ProtectRun, get_protect_method, photo_job,
                                       register_protect_method, unregister_protect_method)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def _option_help(command: str, option: str) -> str:
    cmd = typer.main.get_command(app).commands[command]
    (param,) = [p for p in cmd.params if option in getattr(p, "opts", ())]
    return param.help


# --- attack traits -----------------------------------------------------------------------------

def test_every_attack_method_has_traits():
    assert METHOD_NAMES == ("pgd", "mifgsm", "tidim", "tipim") == tuple(METHODS)
    for name, t in METHODS.items():
        assert isinstance(t, MethodTraits) and t.name == name and method_traits(name) is t
        assert t.help
        with pytest.raises(dataclasses.FrozenInstanceError):
            t.needs_target = not t.needs_target  # type: ignore[misc]
        # the descriptive traits agree with the defaults the method sets
        assert t.momentum == (t.defaults["momentum"] > 0)
        assert t.diversity == (t.defaults["diversity_prob"] > 0)
        cfg = AttackConfig(method=name).resolved()
        assert {k: getattr(cfg, k) for k in t.defaults} == dict(t.defaults)
    assert method_traits("blur") is None


def test_tipim_is_the_only_multi_target_method_and_needs_a_target():
    assert [n for n, t in METHODS.items() if t.multi_target] == ["tipim"]
    assert [n for n, t in METHODS.items() if t.needs_target] == ["tipim"]
    with pytest.raises(ConfigError, match="tipim is a targeted method: give --target"):
        ProtectConfig(method="tipim")
    for name in METHOD_NAMES:
        if not METHODS[name].needs_target:
            ProtectConfig(method=name)  # dodging is fine


def test_adversarial_deid_reads_the_table():
    from facepriv.deid import create_method

    with pytest.raises(ConfigError, match="adversarial: the tipim attack needs a target image"):
        create_method("adversarial", attack="tipim")
    with pytest.raises(ConfigError, match="adversarial: unknown attack 'blur'; use one of pgd, mifgsm, tidim, tipim"):
        create_method("adversarial", attack="blur")


def test_deid_attack_help_describes_each_method_as_the_table_does():
    text = _option_help("deid", "--attack")
    for t in METHODS.values():
        assert f"{t.name} ({t.help})" in text


# --- protect registry ---------------------------------------------------------------------------

def test_protect_registry_lists_exactly_the_cli_methods():
    text = _option_help("protect", "--method")
    offered = [m.strip() for m in text.split(" (", 1)[0].split("|")]
    assert set(offered) == {"auto", *PROTECT_METHODS}
    assert method_names() == ("auto", "map", "transfer", *BASELINE_METHODS)
    assert BASELINE_METHODS == METHOD_NAMES
    assert [n for n, m in PROTECT_METHODS.items() if m.options == "baseline"] == list(METHOD_NAMES)
    assert PROTECT_METHODS["map"].needs_gpu and not PROTECT_METHODS["transfer"].needs_gpu
    assert [n for n, m in PROTECT_METHODS.items() if m.needs_target] == ["tipim"]
    with pytest.raises(ConfigError, match="unknown method 'nope'; use one of auto, map, transfer, pgd"):
        get_protect_method("nope")
    with pytest.raises(ConfigError, match="unknown method 'nope'; use one of auto, map, transfer, pgd"):
        ProtectConfig(method="nope")


class _OneFace(FaceDetector):
    name = "one-face"

    def detect(self, image):
        h, w = image.shape[:2]
        cx, cy, s = w / 2, h / 2, min(h, w) / 2
        pts = np.array([[-0.2, -0.12], [0.2, -0.12], [0.0, 0.05], [-0.16, 0.22], [0.16, 0.22]]) * s + [cx, cy]
        box = np.array([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], np.float32)
        return [Face(box=box, landmarks=pts.astype(np.float32), score=0.99)]


@pytest.fixture
def fake_method():
    calls: list[ProtectRun] = []

    @register_protect_method("fake-invert", help="invert the face box (test only)")
    def _build(run: ProtectRun):
        calls.append(run)
        run.details["fake"] = True

        def edit(x, faces, _loaded):
            out = x.clone()
            for f in faces:
                x1, y1, x2, y2 = (int(v) for v in f.box)
                out[:, y1:y2, x1:x2] = 1 - out[:, y1:y2, x1:x2]
            return out

        return photo_job(run, edit, _OneFace(), description="protect fake-invert")

    yield calls
    unregister_protect_method("fake-invert")


def test_a_registered_method_is_what_run_protect_runs(tmp_path, fake_method):
    src = tmp_path / "in"
    src.mkdir()
    Image.open(fixture_path("obama.jpg")).convert("RGB").resize((96, 96)).save(src / "small.png")
    cfg = ProtectConfig(method="fake-invert")
    assert "fake-invert" in method_names() and get_protect_method("fake-invert").help
    s = run_protect([src], tmp_path / "out", cfg, output_suffix=".png", progress=False)
    assert len(fake_method) == 1 and fake_method[0].cfg.method == "fake-invert"
    assert s.exit_code == 0 and s.details["method"] == "fake-invert" and s.details["fake"] is True
    assert s.details["chosen_because"] == "--method fake-invert"
    before = np.asarray(Image.open(src / "small.png")).astype(int)
    after = np.asarray(Image.open(tmp_path / "out" / "small.png")).astype(int)
    assert np.array_equal(after[48, 48], 255 - before[48, 48]) and np.array_equal(after[0, 0], before[0, 0])
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert row["status"] == "ok"


def test_an_unregistered_method_is_refused_again(fake_method):
    unregister_protect_method("fake-invert")
    with pytest.raises(ConfigError, match="unknown method 'fake-invert'"):
        ProtectConfig(method="fake-invert")
