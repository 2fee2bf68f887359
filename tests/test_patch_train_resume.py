"""facepriv patch training: the push weight on evasion rows, mid-epoch checkpoints and resume,
per-rank random draws."""

from __future__ import annotations

import json

import pytest
import torch

from facepriv.patch import PlacementEOT, PatchGenerator, PatchLossWeights, get_region, patch_objective
from facepriv.patch.placement import random_placement_jitter
from facepriv.patch.train import PatchTrainer, step_seed
from test_patch import _fake_detector, _tiny_ensemble, _train_cfg, photo_dirs  # noqa: F401 - fixture


# ============================================================================ push weight (evasion rows)
def test_push_weight_scales_the_evasion_loss():
    emb = {"m": torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])}
    src = {"m": torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])}
    tgt = {"m": torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])}
    patch = torch.full((3, 3, 8, 8), 0.5)
    cos_src = torch.tensor([1.0, 0.6, 0.0])
    for push in (0.0, 1.0, 3.0):
        w = PatchLossWeights(pull=1.0, push=push, tv=0.0)
        # no targets at all (evasion-only training): push * cos(x, source)
        t = patch_objective(emb, src, None, None, patch, w)
        assert torch.allclose(t["identity"], push * cos_src)
        # mixed batch: rows without a target get push * cos(x, source), rows with one the dual loss
        t = patch_objective(emb, src, tgt, torch.tensor([False, True, False]), patch, w)
        want = torch.stack([push * cos_src[0], (1 - 0.8) + push * cos_src[1], push * cos_src[2]])
        assert torch.allclose(t["identity"], want)
        # --pull 0 with targets: the evasion term for every row
        t = patch_objective(emb, src, tgt, torch.tensor([True, True, True]), patch,
                            PatchLossWeights(pull=0.0, push=push, tv=0.0))
        assert torch.allclose(t["identity"], push * cos_src)


def test_push_weight_reaches_the_trainer_loss_without_targets(tmp_path, photo_dirs):  # noqa: F811
    """Evasion-only training: the loss the optimiser sees is push times the cosine to the source."""
    losses = {}
    for push in (1.0, 3.0):
        torch.manual_seed(0)
        cfg = _train_cfg(tmp_path, photo_dirs, out=str(tmp_path / f"g{push}"), targets=None,
                         weights=PatchLossWeights(push=push, tv=0.0))
        tr = PatchTrainer(cfg, device="cpu", progress=False, surrogates=_tiny_ensemble(), detector=_fake_detector())
        torch.manual_seed(1)
        with torch.no_grad():
            terms = tr.batch_loss(torch.arange(len(tr.faces)))
        losses[push] = terms
    assert torch.allclose(losses[3.0]["cos_source"], losses[1.0]["cos_source"])  # same draws, same patches
    assert torch.allclose(losses[1.0]["identity"], losses[1.0]["cos_source"], atol=1e-6)
    assert torch.allclose(losses[3.0]["identity"], 3.0 * losses[1.0]["identity"], atol=1e-5)


# ============================================================================ mid-epoch checkpoints
class _Crash(RuntimeError):
    pass


def _trainer(tmp_path, photo_dirs, out, epochs=2, **kw):  # noqa: F811
    cfg = _train_cfg(tmp_path, photo_dirs, out=str(out), epochs=epochs, batch_size=1, evasion_prob=0.5, **kw)
    torch.manual_seed(0)
    return PatchTrainer(cfg, device="cpu", progress=False, surrogates=_tiny_ensemble(), detector=_fake_detector())


def test_checkpoint_every_n_steps_and_resume_mid_epoch_reproduce_a_straight_run(tmp_path, photo_dirs):  # noqa: F811
    # 2 faces, batch 1: 2 steps per epoch, 4 steps in all
    straight = _trainer(tmp_path, photo_dirs, tmp_path / "a").fit()
    assert straight.steps == 4 and [h["epoch"] for h in straight.history] == [1, 2]

    # the same run checkpointing every step, killed during step 4 (the second step of epoch 2)
    tr = _trainer(tmp_path, photo_dirs, tmp_path / "b", checkpoint_every=1)
    calls = {"n": 0}
    inner = tr.batch_loss

    def crashing(idx, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Crash("simulated crash")
        return inner(idx, **kw)

    tr.batch_loss = crashing
    with pytest.raises(_Crash):
        tr.fit()
    meta = json.loads((tmp_path / "b" / "train_state.json").read_text())
    assert (meta["epoch"], meta["batch"], meta["step"]) == (1, 1, 3)  # one batch into epoch 2
    assert meta["partial"]["counts"] and len(meta["history"]) == 1

    resumed = _trainer(tmp_path, photo_dirs, tmp_path / "b", checkpoint_every=1).fit(resume=True)
    assert resumed.resumed_from == 1 and resumed.resumed_from_step == 3 and resumed.steps == 4
    assert resumed.history == straight.history  # the interrupted epoch's averages include its first batch
    ga = PatchGenerator.from_pretrained(tmp_path / "a")
    gb = PatchGenerator.from_pretrained(tmp_path / "b")
    for (k, va), vb in zip(ga.trainable_state_dict().items(), gb.trainable_state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k
    done = json.loads((tmp_path / "b" / "train_state.json").read_text())
    assert (done["epoch"], done["batch"], done["step"]) == (2, 0, 4)


def test_max_steps_per_epoch_and_checkpoint_every_from_the_cli(tmp_path, photo_dirs, monkeypatch):  # noqa: F811
    """The CLI passes --max-steps-per-epoch / --checkpoint-every through to the training config."""
    from typer.testing import CliRunner

    import facepriv.patch as patch_mod
    from facepriv.cli import app

    from facepriv.patch.train import TrainResult

    seen = {}

    def record(cfg, **kw):  # the training itself is covered above; here only what the CLI builds
        seen["cfg"] = cfg
        return TrainResult(tmp_path / "g", cfg.epochs, 0, 0, 0, [], 0.0)

    monkeypatch.setattr(patch_mod, "train_patch_generator", record)
    r = CliRunner().invoke(app, ["--json", "patch", "train", "--data", str(photo_dirs / "data"), "--out",
                                 str(tmp_path / "g"), "--max-steps-per-epoch", "5", "--checkpoint-every", "2"])
    assert r.exit_code == 0, r.output
    assert seen["cfg"].max_steps_per_epoch == 5 and seen["cfg"].checkpoint_every == 2
    from facepriv.core.errors import ConfigError

    with pytest.raises(ConfigError):
        _train_cfg(tmp_path, photo_dirs, checkpoint_every=-1)


# ============================================================================ per-rank random draws
def test_step_seed_differs_across_ranks_and_reproduces_per_rank():
    reg = get_region("forehead")

    def jitter(rank, step):
        torch.manual_seed(step_seed(0, rank, step))
        return random_placement_jitter(8, reg, PlacementEOT())

    assert torch.equal(jitter(0, 5), jitter(0, 5))
    assert not torch.allclose(jitter(0, 5), jitter(1, 5))  # another process draws other jitter
    assert not torch.allclose(jitter(0, 5), jitter(0, 6))
    assert step_seed(1, 0, 5) != step_seed(0, 0, 5)


def test_training_steps_draw_per_process_jitter(tmp_path, photo_dirs, monkeypatch):  # noqa: F811
    """Inside fit, each step's draws come from step_seed(seed, process index, step)."""
    from accelerate import Accelerator

    seeds = {}
    for rank in (0, 1):
        tr = _trainer(tmp_path, photo_dirs, tmp_path / f"r{rank}", epochs=1)
        monkeypatch.setattr(Accelerator, "process_index", property(lambda self, r=rank: r))
        drawn = []
        inner = tr.batch_loss

        def spy(idx, drawn=drawn, inner=inner, **kw):
            drawn.append(torch.rand(1).item())  # what the step's RNG gives first
            return inner(idx, **kw)

        tr.batch_loss = spy
        tr.fit()
        seeds[rank] = drawn
        monkeypatch.undo()
    assert len(seeds[0]) == 2 and seeds[0] != seeds[1]
    for step, v in enumerate(seeds[1]):
        torch.manual_seed(step_seed(0, 1, step))
        assert torch.rand(1).item() == v
