"""Bugs that came from the same rule written twice, each pinned to the one shared definition:

* output levels of the L-inf noise: ``deid --method adversarial`` keeps a 16-bit file's
  levels like ``protect`` does (``attacks.config.levels_for``);
* the photos a ``--target`` folder names: the same for MAP and the noise baselines
  (``attacks.reference.target_images``);
* sharding under accelerate / torchrun / MPI: deid and patch apply use protect's rule
  (``core.distributed.distributed_context``);
* saved configs: an unknown key is an error in MAP's and the patch generator's configs too.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from facepriv.core.errors import ConfigError
from facepriv.core.faces import Face, FaceDetector

_DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE",
              "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture
def no_launcher(monkeypatch):
    """No launcher variables from the environment the tests run in."""
    for v in _DIST_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def _face(cx=128.0, cy=128.0, s=140.0) -> Face:
    pts = np.array([[-0.2, -0.12], [0.2, -0.12], [0.0, 0.05], [-0.16, 0.22], [0.16, 0.22]]) * s + [cx, cy]
    box = np.array([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], np.float32)
    return Face(box=box, landmarks=pts.astype(np.float32), score=0.99)


class _Fixed(FaceDetector):
    """One face at a fixed place in every photo (no model)."""

    name = "fixed"

    def detect(self, image):
        return [_face()] if min(image.shape[:2]) >= 200 else []


def _smooth(seed: int, size: int = 256) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, 12, 12, generator=g)
    x = torch.nn.functional.interpolate(small, size=(size, size), mode="bicubic", align_corners=False)[0]
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def _fake_accelerate(monkeypatch, *, processes: int, index: int):
    """accelerate's PartialState as a launcher would set it up (no process group is started)."""

    class PartialState:
        def __init__(self, cpu: bool = False):
            self.num_processes, self.process_index, self.device = processes, index, torch.device("cpu")

    monkeypatch.setitem(sys.modules, "accelerate", types.SimpleNamespace(PartialState=PartialState))


def _manifest_inputs(out: Path, name: str) -> list[str]:
    return [Path(json.loads(r)["input"]).name for r in (out / name).read_text().splitlines()]


# ----------------------------------------------------------------------------- 1: 16-bit levels
def _tiny_ensemble():
    from facepriv.attacks import SurrogateEnsemble
    from facepriv.models import ModelSpec
    from facepriv.models.recognition import FaceRecognizer

    torch.manual_seed(0)
    spec = ModelSpec(name="tiny", task="recognition", architecture="tiny cnn", description="test", license="MIT",
                     sources=(), loader=lambda ctx: None, input_size=(56, 56), template="arcface-112",
                     metric="cosine")
    net = nn.Sequential(nn.Conv2d(3, 8, 5, 2, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 16))
    return SurrogateEnsemble([], models=[FaceRecognizer(spec, net, lambda x: x).eval().requires_grad_(False)])


def test_deid_adversarial_keeps_the_levels_of_a_16_bit_photo(tmp_path, no_launcher):
    import cv2

    import facepriv.attacks.editor as editor  # deid adversarial's attack runs there, as protect's
    from facepriv.deid import DeidConfig, run_deid

    no_launcher.setattr(editor, "SurrogateEnsemble", lambda names, device="cpu": _tiny_ensemble())
    src = tmp_path / "in"
    src.mkdir()
    arr16 = (_smooth(1) * 65000).astype(np.uint16) + 100  # most values off the 8-bit grid (multiples of 257)
    cv2.imwrite(str(src / "deep16.png"), arr16[..., ::-1])
    out = tmp_path / "out"
    cfg = DeidConfig(methods=["adversarial"], options={"adversarial": {"steps": 2, "surrogates": ["tiny"]}})
    summary = run_deid([src], out, cfg, progress=False, detector=_Fixed())
    assert summary.counts == {"ok": 1}, summary.failures
    got = cv2.imread(str(out / "deep16.png"), cv2.IMREAD_UNCHANGED)[..., ::-1].astype(np.int64)
    changed = got != arr16
    assert changed.any()
    assert np.abs(got - arr16).max() <= round(8 / 255 * 65535)  # the budget holds at 16 bit
    # quantised to 65535 levels, not 255: the changed values are not all on the 8-bit grid
    assert (got[changed] % 257 != 0).mean() > 0.5
    # the rule protect uses, in one place
    from facepriv.attacks.config import levels_for

    assert levels_for(None) == 255
    assert levels_for(types.SimpleNamespace(bit_depth=16)) == 65535
    assert levels_for(types.SimpleNamespace(bit_depth=8)) == 255


# ----------------------------------------------------------------------------- 2: --target folders
def test_a_target_folder_names_the_same_photos_for_map_and_the_noise_baselines(tmp_path, monkeypatch):
    import facepriv.attacks.reference as reference
    import facepriv.attacks.editor as editor
    from facepriv.attacks import AttackConfig
    from facepriv.attacks.reference import target_images
    from facepriv.protect.pipeline import target_reference

    t = tmp_path / "target"
    (t / "sub").mkdir(parents=True)
    (t / ".thumbs").mkdir()
    for rel in ("b.jpg", "sub/a.png", "sub/.hidden.jpg", ".dot.jpg", ".thumbs/c.jpg", "notes.txt", "Z.JPEG"):
        (t / rel).write_bytes(b"x")
    want = sorted([t / "Z.JPEG", t / "b.jpg", t / "sub" / "a.png"])
    assert target_images(t) == want

    # MAP (and transfer): target_reference
    seen: dict[str, list[Path]] = {}

    def fake_refs(ensemble, images, detector):
        seen.setdefault("map", []).extend(Path(str(p)) for p in images)
        return {"m": torch.ones(len(images), 4)}

    monkeypatch.setattr(reference, "reference_from_images", fake_refs)
    target_reference(t, None, None)

    # pgd / mifgsm / tidim / tipim (protect) and deid adversarial: the AttackEditor
    monkeypatch.setattr(editor, "SurrogateEnsemble", lambda names, device="cpu": None)
    monkeypatch.setattr(editor, "load_image", lambda p: seen.setdefault("pgd", []).append(Path(p))
                        or types.SimpleNamespace(rgb=None))
    monkeypatch.setattr(editor, "reference_from_images", lambda ensemble, images, detector: {})
    editor.AttackEditor(AttackConfig(method="pgd"), target=t, detector=object()).setup("cpu")
    assert seen["map"] == seen["pgd"] == want

    (tmp_path / "only_hidden" / ".x").mkdir(parents=True)
    (tmp_path / "only_hidden" / ".x" / "a.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="no images"):
        target_images(tmp_path / "only_hidden")
    with pytest.raises(ConfigError, match="does not exist"):
        target_images(tmp_path / "missing.jpg")


# ----------------------------------------------------------------------------- 3: sharding
def _photos(folder: Path, n: int, size: int = 256) -> list[str]:
    folder.mkdir(parents=True)
    names = [f"p{i}.png" for i in range(n)]
    for i, name in enumerate(names):
        Image.fromarray((_smooth(10 + i, size) * 255).round().astype(np.uint8)).save(folder / name)
    return names


def test_deid_takes_only_its_shard_under_torchrun(tmp_path, no_launcher):
    from facepriv.deid import DeidConfig, run_deid

    names = _photos(tmp_path / "in", 5)
    no_launcher.setenv("WORLD_SIZE", "2")
    no_launcher.setenv("RANK", "1")
    _fake_accelerate(no_launcher, processes=2, index=1)
    out = tmp_path / "out"
    summary = run_deid([tmp_path / "in"], out, DeidConfig(methods=["blur"]), progress=False, detector=_Fixed())
    assert summary.counts == {"ok": 2}, summary.failures
    assert sorted(p.name for p in out.glob("manifest*.jsonl")) == ["manifest.rank1.jsonl"]
    assert _manifest_inputs(out, "manifest.rank1.jsonl") == names[1::2]
    assert sorted(p.name for p in out.glob("*.png")) == names[1::2]


def test_deid_explicit_rank_and_world_win(tmp_path, no_launcher):
    from facepriv.deid import DeidConfig, run_deid

    names = _photos(tmp_path / "in", 3)
    out = tmp_path / "out"
    run_deid([tmp_path / "in"], out, DeidConfig(methods=["blur"]), progress=False, detector=_Fixed(),
             rank=0, world_size=2)
    assert _manifest_inputs(out, "manifest.rank0.jsonl") == names[0::2]


def test_patch_apply_honours_mpi_rank_variables(tmp_path, no_launcher):
    from facepriv.patch import GeneratorConfig, PatchApplyConfig, PatchGenerator, run_patch_apply

    torch.manual_seed(0)
    gen_dir = PatchGenerator(GeneratorConfig(patch_size=32, input_size=64, base_channels=8, levels=3)).eval() \
        .save_pretrained(tmp_path / "gen")
    names = _photos(tmp_path / "in", 5, size=64)  # too small for _Fixed: no face, copied through
    no_launcher.setenv("PMI_SIZE", "2")  # mpirun (MPICH / Intel MPI)
    no_launcher.setenv("PMI_RANK", "1")
    _fake_accelerate(no_launcher, processes=1, index=0)  # accelerate not set up: the launcher's variables decide
    out = tmp_path / "out"
    summary = run_patch_apply([tmp_path / "in"], out, PatchApplyConfig(generator=str(gen_dir)), progress=False,
                              detector=_Fixed(), warn=False)
    assert sum(summary.counts.values()) == 2, summary.counts
    assert sorted(p.name for p in out.glob("manifest*.jsonl")) == ["manifest.rank1.jsonl"]
    assert _manifest_inputs(out, "manifest.rank1.jsonl") == names[1::2]


def test_distributed_context_has_one_home_and_the_old_import_still_works():
    from facepriv.core.distributed import distributed_context
    from facepriv.protect.pipeline import distributed_context as via_protect

    assert via_protect is distributed_context


# ----------------------------------------------------------------------------- 4: unknown config keys
def test_map_config_refuses_an_unknown_key_and_reads_what_it_saves():
    from facepriv.protect import ProtectConfig
    from facepriv.protect.map.tuner import MAPConfig

    with pytest.raises(ConfigError, match=r"stpes.*known:.*steps"):
        MAPConfig.from_dict({"stpes": 3})
    saved = asdict(MAPConfig(steps=3, expression=None))  # what MAPTuner.save writes under "map"
    assert MAPConfig.from_dict(json.loads(json.dumps(saved))) == MAPConfig(steps=3, expression=None)
    with pytest.raises(ConfigError, match="w_ide"):
        ProtectConfig(map={"w_ide": 1.0})  # checked when the config is made, before any work


def test_generator_config_refuses_an_unknown_key_and_reads_what_it_saves(tmp_path):
    from facepriv.patch import GeneratorConfig, PatchGenerator
    from facepriv.patch.generator import write_validation

    cfg = GeneratorConfig(patch_size=32, input_size=64, base_channels=8, levels=3, fusion="attention")
    with pytest.raises(ConfigError, match=r"patch_szie.*known:.*patch_size"):
        GeneratorConfig.from_dict({**asdict(cfg), "patch_szie": 16})
    gen_dir = PatchGenerator(cfg).save_pretrained(tmp_path / "gen")
    write_validation(gen_dir, {"far": "1e-2", "faces": 3, "evasion_rate": 0.5})  # format/version/validation beside it
    assert PatchGenerator.from_pretrained(gen_dir).config == cfg
    meta = json.loads((gen_dir / "config.json").read_text())
    meta["config"]["fusoin"] = "concat"  # a typo in a hand-edited config
    (gen_dir / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="fusoin"):
        PatchGenerator.from_pretrained(gen_dir)
