"""core.saving: one save format for trained networks (MAP model, patch generator, k-same pool).

Each kind is written as a folder (metadata file {"format", "version", settings, ...} + safetensors)
atomically, read back with its format and version checked, and what earlier versions wrote
still loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from facepriv.core.config import ConfigBase
from facepriv.core.errors import ConfigError
from facepriv.core.saving import SaveFormat, load_weights, read_metadata, read_settings, rewrite_metadata, save_network

FMT = SaveFormat("facepriv-test-net", 2, "test network")


@dataclass
class _Net(ConfigBase):
    config_name = "test network setting"
    width: int = 4


def _weights():
    return {"net.safetensors": {"w": torch.arange(6.0).reshape(2, 3)}}


# ----------------------------------------------------------------------------- the format
def test_a_saved_network_is_one_folder_with_stamped_metadata_and_weights(tmp_path):
    out = save_network(tmp_path / "net", FMT, _Net(width=8), weights=_weights(), extra={"note": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]  # no temporary folder left beside it
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "net.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta == {"format": "facepriv-test-net", "version": 2, "config": {"width": 8}, "note": "x"}
    with safe_open(str(out / "net.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "facepriv-test-net", "version": "2"}
    assert _Net.from_dict(read_settings(read_metadata(out, FMT), FMT)).width == 8
    assert torch.equal(load_weights(out, "net.safetensors", FMT)["w"], torch.arange(6.0).reshape(2, 3))


def test_a_failed_save_leaves_nothing_behind(tmp_path):
    def boom(tmp):
        (tmp / "partial.bin").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_network(tmp_path / "net", FMT, _Net(), weights=_weights(), write=boom)
    assert list(tmp_path.iterdir()) == []


def test_saving_into_a_folder_keeps_its_other_files_and_replaces_the_networks(tmp_path):
    folder = tmp_path / "run"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "old.txt").write_text("old")
    (folder / "train_state.json").write_text("{}")
    save_network(folder, FMT, _Net(width=1), weights=_weights(), write=lambda t: (t / "sub").mkdir())
    save_network(folder, FMT, _Net(width=2), weights=_weights(), write=lambda t: (t / "sub").mkdir())
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "net.safetensors", "sub", "train_state.json"]
    assert list((folder / "sub").iterdir()) == []  # the saved sub-folder replaced the old one whole
    assert read_metadata(folder, FMT)["config"] == {"width": 2}


def test_reading_checks_the_format_and_the_version(tmp_path):
    with pytest.raises(ConfigError, match="not a saved test network"):
        read_metadata(tmp_path, FMT)
    out = save_network(tmp_path / "other", SaveFormat("facepriv-other", 1, "other"), _Net())
    with pytest.raises(ConfigError, match="not a facepriv test network"):
        read_metadata(out, FMT)
    newer = save_network(tmp_path / "newer", SaveFormat(FMT.kind, 3, "test network"), _Net())
    with pytest.raises(ConfigError, match="newer facepriv"):
        read_metadata(newer, FMT)
    with pytest.raises(ConfigError, match="net.safetensors missing"):
        load_weights(newer, "net.safetensors", FMT)
    with pytest.raises(ValueError, match="may not replace format"):
        save_network(tmp_path / "bad", FMT, _Net(), extra={"format": "x"})


def test_rewrite_metadata_replaces_only_the_metadata_file(tmp_path):
    out = save_network(tmp_path / "net", FMT, _Net(), weights=_weights())
    before = (out / "net.safetensors").read_bytes()
    rewrite_metadata(out, FMT, {**read_metadata(out, FMT), "validation": {"rate": 0.5}})
    assert read_metadata(out, FMT)["validation"] == {"rate": 0.5}
    assert (out / "net.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "net.safetensors"]


# ----------------------------------------------------------------------------- patch generator
def test_patch_generator_saves_in_the_format_and_a_hand_written_folder_still_loads(tmp_path):
    from facepriv.patch.generator import GeneratorConfig, PatchGenerator, read_validation, write_validation

    torch.manual_seed(0)
    gen = PatchGenerator(GeneratorConfig(patch_size=16, input_size=32, base_channels=4, levels=2))
    gen.validation = {"evasion_rate": 0.75}
    out = gen.save_pretrained(tmp_path / "gen")
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "facepriv-patch-generator" and meta["version"] == 1
    assert meta["config"]["patch_size"] == 16 and meta["validation"]["evasion_rate"] == 0.75
    again = PatchGenerator.from_pretrained(out)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(again(x), gen.eval()(x))
    assert again.validation["evasion_rate"] == 0.75  # tied to the weights that were written

    # the layout earlier versions wrote (config.json + generator.safetensors, plain writes)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"format": "facepriv-patch-generator", "version": 1,
                                                 "config": gen.config.to_json()}))
    save_file({k: v.contiguous() for k, v in gen.trainable_state_dict().items()}, str(old / "generator.safetensors"))
    torch.testing.assert_close(PatchGenerator.from_pretrained(old)(x), gen(x))
    write_validation(old, {"evasion_rate": 0.5})
    assert read_validation(old)["evasion_rate"] == 0.5
    with pytest.raises(ConfigError, match=r"unknown patch generator setting\(s\) widht"):
        (old / "config.json").write_text(json.dumps({"format": "facepriv-patch-generator", "version": 1,
                                                     "config": {"widht": 3}}))
        PatchGenerator.from_pretrained(old)


# ----------------------------------------------------------------------------- MAP model
class _FakeRecogniser(torch.nn.Module):
    spec = SimpleNamespace(name="fake-fr")


def test_map_model_saves_in_the_format_reloads_and_old_facepriv_json_still_loads(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    from facepriv.attacks.identity import SurrogateEnsemble
    from facepriv.models import create_model
    from facepriv.protect.map import MAPConfig, MAPEditor, MAPTuner

    torch.manual_seed(0)
    base_dir = tmp_path / "tiny"
    UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=8).save_pretrained(base_dir / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(base_dir / "scheduler")
    score = create_model("ddpm-celebahq-256", weights=base_dir)
    cfg = MAPConfig(steps=0, t0=100, n_inv=2, n_gen=2)
    tuner = MAPTuner(score, ensemble=SurrogateEnsemble(["fake-fr"], models=[_FakeRecogniser()]), config=cfg,
                     base_ref=str(base_dir), progress=False)
    with torch.no_grad():
        next(tuner.tuned.unet.parameters()).add_(0.01)  # tuned differs from its base
    saved = tuner.save(tmp_path / "saved", extra={"faces": 3})
    meta = json.loads((saved / "facepriv.json").read_text())
    assert meta["format"] == "facepriv-map" and meta["version"] == 1 and meta["method"] == "map"
    assert meta["map"]["t0"] == 100 and meta["faces"] == 3 and meta["template"] == score.template
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved", "tiny"]  # no temporary left
    editor = MAPEditor.from_pretrained(saved, overrides={"n_gen": 3})
    assert editor.cfg.t0 == 100 and editor.cfg.n_gen == 3
    torch.testing.assert_close(next(editor.tuned.unet.parameters()), next(tuner.tuned.unet.parameters()))

    # facepriv.json as earlier versions wrote it (no format stamp, "method": "map")
    legacy = {k: v for k, v in meta.items() if k not in ("format", "version")}
    (saved / "facepriv.json").write_text(json.dumps(legacy))
    assert MAPEditor.from_pretrained(saved).cfg.t0 == 100
    (saved / "facepriv.json").write_text(json.dumps({"template": score.template, "task": "score"}))
    with pytest.raises(ConfigError, match="not a facepriv MAP model"):
        MAPEditor.from_pretrained(saved)  # a plain score network is not a saved MAP model


# ----------------------------------------------------------------------------- k-same pool
def _pool():
    from facepriv.deid import FacePool

    pool = FacePool.empty(size=32)
    pool.crops = torch.rand(3, 3, 32, 32)
    pool.identities, pool.sources = ["a", "b", "b"], ["x#0", "y#0", "z#0"]
    pool.embeddings = {"dlib-resnet": torch.rand(3, 128)}
    pool.identity_mode = "folders"
    return pool


def _same_pool(a, b):
    assert torch.equal(a.crops, b.crops) and a.identities == b.identities and a.sources == b.sources
    assert a.template == b.template and a.identity_mode == b.identity_mode
    assert torch.equal(a.embeddings["dlib-resnet"], b.embeddings["dlib-resnet"])


def test_ksame_pool_saves_as_a_folder_and_a_single_file_pool_still_loads(tmp_path):
    from facepriv.deid import FacePool
    from facepriv.deid.ksame import is_saved_pool

    pool = _pool()
    folder = pool.save(tmp_path / "pool")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pool.safetensors"]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == "facepriv-face-pool" and meta["config"]["identity_mode"] == "folders"
    _same_pool(FacePool.load(folder), pool)

    # the one-file layout earlier versions wrote
    t = pool.template
    old = tmp_path / "old.safetensors"
    save_file({"crops": pool.crops, "emb.dlib-resnet": pool.embeddings["dlib-resnet"]}, str(old),
              metadata={"identities": json.dumps(pool.identities), "sources": json.dumps(pool.sources),
                        "template": json.dumps([t.name, list(t.size), list(t.points)]),
                        "identity_mode": "folders"})
    _same_pool(FacePool.load(old), pool)

    photos = tmp_path / "photos"
    photos.mkdir()
    assert is_saved_pool(folder) and is_saved_pool(old) and not is_saved_pool(photos)


def test_a_ksame_method_given_a_saved_pool_folder_loads_it_in_setup(tmp_path):
    from facepriv.deid import create_method

    pool = _pool()
    folder = pool.save(tmp_path / "pool")
    m = create_method("k-same-average", k=2, model=None, match_color=False, size=32, pool=folder)
    m.setup("cpu")
    assert m.pool is not None and len(m.pool) == 3 and m.pool.n_identities == 2


def test_patch_apply_refuses_a_folder_that_is_not_a_saved_generator_before_any_work(tmp_path):
    from facepriv.patch import PatchApplyConfig, run_patch_apply

    other = tmp_path / "pool"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"format": "facepriv-ksame-pool", "version": 1, "config": {}}))
    photos = tmp_path / "in"
    photos.mkdir()
    with pytest.raises(ConfigError, match=r"--generator: .*pool is not a facepriv patch generator"):
        run_patch_apply([photos], tmp_path / "out", PatchApplyConfig(generator=str(other)), progress=False)
    with pytest.raises(ConfigError, match=r"--generator: .*missing is not a saved patch generator"):
        run_patch_apply([photos], tmp_path / "out", PatchApplyConfig(generator=str(tmp_path / "missing")),
                        progress=False)
    assert not (tmp_path / "out").exists()
