"""MAP building blocks: gradient projection, Laplacian smoothness, score matching, DDIM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import fixture_path
from facepriv.core.errors import ConfigError
from facepriv.protect.map import (
    ConflictStats,
    EMAGradients,
    MAPConfig,
    align_for_score_model,
    ddim_generate,
    ddim_invert,
    ddim_reconstruct,
    laplacian_smoothness,
    load_base_score_model,
    pcgrad_combine,
    score_matching_loss,
    timestep_grid,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def tiny_unet_dir(path, size: int = 32, seed: int = 0):
    """A tiny self-made DDPM (random weights) saved in diffusers layout."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    unet.save_pretrained(path / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(path / "scheduler")
    return path


@pytest.fixture(scope="module")
def tiny_score(tmp_path_factory):
    from facepriv.models import create_model

    d = tiny_unet_dir(tmp_path_factory.mktemp("tiny-ddpm"))
    return d, create_model("ddpm-celebahq-256", weights=d)


def _dot(a, b):
    return sum(float((x * y).sum()) for x, y in zip(a, b))


# ------------------------------------------------------------------ gradient projection
def test_conflicting_gradients_become_non_conflicting():
    g = torch.Generator().manual_seed(1)
    a = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    b = [-x + 0.3 * torch.randn(x.shape, generator=g) for x in a]  # strongly opposed
    assert _dot(a, b) < 0
    combined, info = pcgrad_combine(a, b, "global")
    assert info["conflict"] and info["cosine"] < -0.5 and info["projected"]
    # the projected gradients, recomputed by hand from the rule
    dot, na, nb = _dot(a, b), _dot(a, a), _dot(b, b)
    a2 = [x - dot / nb * y for x, y in zip(a, b)]
    b2 = [y - dot / na * x for x, y in zip(a, b)]
    assert abs(_dot(a2, b)) < 1e-4 and abs(_dot(b2, a)) < 1e-4  # each is orthogonal to the other's original
    assert _dot(a2, b2) >= 0  # and they no longer conflict with each other
    for c, x, y in zip(combined, a2, b2):
        torch.testing.assert_close(c, x + y, rtol=1e-5, atol=1e-5)
    # the combined step does not increase either objective to first order
    assert _dot(combined, a) >= -1e-5 and _dot(combined, b) >= -1e-5
    assert info["removed"] == pytest.approx(-info["cosine"], abs=1e-6)


def test_non_conflicting_gradients_are_untouched():
    g = torch.Generator().manual_seed(2)
    a = [torch.randn(4, 4, generator=g), torch.randn(3, generator=g)]
    b = [x + 0.5 * torch.randn(x.shape, generator=g) for x in a]
    assert _dot(a, b) > 0
    for mode in ("global", "layerwise"):
        combined, info = pcgrad_combine(a, b, mode)
        assert not info["conflict"] and info["layers_conflicting"] == 0
        for c, x, y in zip(combined, a, b):
            assert torch.equal(c, x + y)


def test_layerwise_projection_only_touches_conflicting_layers():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 2.0, 3.0])]
    b = [torch.tensor([-1.0, 1.0]), torch.tensor([10.0, 20.0, 30.0])]  # layer 0 conflicts, layer 1 agrees
    assert _dot(a, b) > 0  # globally they agree, so global mode leaves them alone
    glob, ginfo = pcgrad_combine(a, b, "global")
    assert not ginfo["conflict"] and torch.equal(glob[0], a[0] + b[0])
    lw, info = pcgrad_combine(a, b, "layerwise")
    assert info["conflict"] and info["layers_conflicting"] == 1 and info["layers"] == 2
    assert torch.equal(lw[1], a[1] + b[1])
    # layer 0 by hand: a.b = -1, |a|^2 = 1, |b|^2 = 2
    a0 = a[0] - (-1 / 2) * b[0]
    b0 = b[0] - (-1 / 1) * a[0]
    torch.testing.assert_close(lw[0], a0 + b0)
    assert float(a0 @ b[0]) == pytest.approx(0.0) and float(b0 @ a[0]) == pytest.approx(0.0)


def test_projection_handles_unused_parameters_and_none_mode():
    a = [torch.ones(3), None]
    b = [-torch.ones(3), torch.ones(2)]
    combined, info = pcgrad_combine(a, b, "none")
    assert info["conflict"] and not info["projected"]
    assert torch.equal(combined[0], torch.zeros(3)) and torch.equal(combined[1], torch.ones(2))
    with pytest.raises(ConfigError):
        pcgrad_combine(a, b, "sideways")


def test_ema_gradients_and_conflict_stats():
    ema = EMAGradients(0.9)
    g = [torch.full((2,), 3.0)]
    for _ in range(3):  # a constant gradient stays exact thanks to the bias correction
        out = ema.update("id", g)
        ema.step()
        torch.testing.assert_close(out[0], g[0])
    out = ema.update("id", [torch.zeros(2)])  # a sudden zero gradient is smoothed, not followed
    assert float(out[0][0]) > 1.0
    assert EMAGradients(0.0).update("x", g)[0] is g[0]
    with pytest.raises(ConfigError):
        EMAGradients(1.0)
    stats = ConflictStats()
    stats.record({"conflict": True, "cosine": -0.5, "removed": 0.5, "layers": 4, "layers_conflicting": 4})
    stats.record({"conflict": False, "cosine": 0.25, "layers": 4, "layers_conflicting": 0})
    s = stats.summary()
    assert s["conflict_steps"] == 1 and s["conflict_rate"] == 0.5 and s["min_cosine"] == -0.5
    assert s["mean_cosine"] == pytest.approx(-0.125) and s["mean_removed_fraction"] == 0.5


# ------------------------------------------------------------------ Laplacian smoothness
def test_laplacian_smoothness_prefers_smooth_edits():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    assert torch.all(laplacian_smoothness(x, x) == 0)
    assert torch.all(laplacian_smoothness(x + 0.1, x) < 1e-12)  # a uniform shift has no curvature
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    smooth = (0.1 * torch.exp(-(xx**2 + yy**2) / 0.3)).expand(2, 3, 32, 32)
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 2 - 1).float()
    noise = checker.expand(2, 3, 32, 32) * smooth.pow(2).mean().sqrt()  # same energy as `smooth`
    ls, ln = laplacian_smoothness(x + smooth, x), laplacian_smoothness(x + noise, x)
    assert ls.shape == (2,) and torch.all(ln > 1000 * ls)
    # interior values match a hand-written 3x3 Laplacian (kornia normalises the kernel by 16)
    d = torch.zeros(1, 1, 9, 9)
    d[0, 0, 4, 4] = 1.0
    k = np.ones((3, 3))
    k[1, 1] = -8
    expected = (k.flatten() ** 2).sum() / 16**2 / 81
    assert float(laplacian_smoothness(d, torch.zeros_like(d))) == pytest.approx(expected, rel=1e-5)
    # and it is differentiable in x_hat
    xh = (x + noise).requires_grad_(True)
    laplacian_smoothness(xh, x).sum().backward()
    assert xh.grad is not None and xh.grad.abs().sum() > 0


# ------------------------------------------------------------------ score matching
def test_score_matching_loss_matches_its_definition(tiny_score):
    from diffusers import DDPMScheduler

    _, sm = tiny_score
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    abar = sched.alphas_cumprod
    torch.manual_seed(0)
    x0 = torch.rand(3, 3, 32, 32) * 2 - 1
    t = torch.tensor([5, 400, 900])
    eps = torch.randn_like(x0)

    class Oracle(torch.nn.Module):  # knows x0, so it predicts the true noise exactly
        def forward(self, xt, tt):
            a = abar[tt].view(-1, 1, 1, 1)
            return (xt - a.sqrt() * x0) / (1 - a).sqrt()

    class Zero(torch.nn.Module):
        def forward(self, xt, tt):
            return torch.zeros_like(xt)

    assert float(score_matching_loss(Oracle(), x0, sched, t=t, noise=eps)) < 1e-8
    assert float(score_matching_loss(Zero(), x0, sched, t=t, noise=eps)) == pytest.approx(float(eps.pow(2).mean()))
    # the real (tiny) UNet: same value as writing the formula out, and gradients reach its weights
    unet = sm.unet
    a = abar[t].view(-1, 1, 1, 1)
    manual = ((unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample - eps) ** 2).mean()
    loss = score_matching_loss(unet, x0, sched, t=t, noise=eps)
    assert float(loss) == pytest.approx(float(manual), rel=1e-5)
    p = unet.conv_out.weight
    p.requires_grad_(True)
    try:
        (g,) = torch.autograd.grad(score_matching_loss(unet, x0, sched, t=t, noise=eps), [p])
        assert g.abs().sum() > 0
    finally:
        p.requires_grad_(False)
    # random t / noise come from the generator: reproducible
    l1 = score_matching_loss(unet, x0, sched, generator=torch.Generator().manual_seed(3))
    l2 = score_matching_loss(unet, x0, sched, generator=torch.Generator().manual_seed(3))
    assert float(l1) == float(l2)


# ------------------------------------------------------------------ DDIM
def test_timestep_grid():
    assert timestep_grid(100, 4, 1000) == [0, 25, 50, 75, 100]
    assert timestep_grid(3, 10, 1000) == [0, 1, 2, 3]  # rounding duplicates dropped
    for bad in ((0, 4), (1000, 4), (100, 0)):
        with pytest.raises(ConfigError):
            timestep_grid(*bad, 1000)


@pytest.mark.realmodels
def test_ddim_inversion_and_regeneration_reconstruct_a_real_face(tiny_score, mtcnn):
    from facepriv.core.align import landmarks_tensor
    from facepriv.core.io import load_image

    path, sm = tiny_score
    assert sm.resolution == 32 and sm.template == "celebahq-256"
    img = load_image(fixture_path("obama.jpg"))
    faces = mtcnn.detect(img.rgb)
    crop = align_for_score_model(sm, img.to_tensor(), landmarks_tensor(faces[:1])).crops
    x0 = crop * 2 - 1
    with torch.no_grad():
        xt = ddim_invert(sm.unet, x0, sm.scheduler, 100, 10)
        rec = ddim_generate(sm.unet, xt, sm.scheduler, 100, 10)
        rec2 = ddim_reconstruct(sm, x0, sm.scheduler, 100, 10, 10)  # the ScoreModel itself works too
    assert (xt - x0).abs().mean() > 0.05  # inversion really moved to a noisy latent
    err = ((rec - x0) / 2).abs()  # in [0, 1] units
    assert float(err.mean()) < 0.005 and float(err.max()) < 0.05
    torch.testing.assert_close(rec, rec2)
    # a network loaded back from disk gives the same latents
    sm2 = load_base_score_model(path)
    with torch.no_grad():
        torch.testing.assert_close(ddim_invert(sm2.unet, x0, sm2.scheduler, 100, 10), xt)


def test_ddim_generation_is_differentiable_with_checkpointing(tiny_score):
    _, sm = tiny_score
    torch.manual_seed(0)
    xt = torch.randn(2, 3, 32, 32)
    params = [sm.unet.conv_in.weight, sm.unet.conv_out.weight]
    for p in params:
        p.requires_grad_(True)
    try:
        grads = []
        for ckpt in (True, False):
            out = ddim_generate(sm.unet, xt, sm.scheduler, 200, 3, checkpoint=ckpt)
            grads.append(torch.autograd.grad(out.pow(2).mean(), params))
        for a, b in zip(*grads):
            assert a.abs().sum() > 0
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        x0 = torch.rand(1, 3, 32, 32, requires_grad=True)
        ddim_invert(sm.unet, x0, sm.scheduler, 100, 2).sum().backward()  # and w.r.t. the input
        assert x0.grad.abs().sum() > 0
    finally:
        for p in params:
            p.requires_grad_(False)


def test_map_config_validation():
    assert MAPConfig(expression="none").expression is None
    for bad in ({"projection": "diagonal"}, {"optimizer": "lbfgs"}, {"lr": 0}, {"ema": 1.0}, {"n_gen": 0},
                {"w_exp": -1}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            MAPConfig(**bad)
    assert MAPConfig.from_dict({"steps": 3}).steps == 3
    with pytest.raises(ConfigError, match="unknown"):  # a typo in a saved config is an error
        MAPConfig.from_dict({"steps": 3, "unknown": 1})


def test_score_model_loading_by_path_name_and_hub_id(tiny_score, tmp_path, monkeypatch):
    path, _ = tiny_score
    assert load_base_score_model(path).resolution == 32
    cache = tmp_path / "hf"
    repo = cache / "models--google--ddpm-celebahq-256"
    snap = repo / "snapshots" / ("0" * 40)
    tiny_unet_dir(snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_base_score_model("ddpm-celebahq-256").resolution == 32
    assert load_base_score_model("google/ddpm-celebahq-256").resolution == 32
    with pytest.raises(ConfigError):
        load_base_score_model("dlib-resnet")
    with pytest.raises(ConfigError):
        load_base_score_model("not a model")
