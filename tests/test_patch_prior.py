"""Natural mode's latent prior with a text-conditional UNet (UNet2DConditionModel, a fixed null
conditioning), loaded from a hub id through the registry's hub source (a faked hub cache)."""

from __future__ import annotations

import pytest
import torch

from facepriv.core.errors import ConfigError
from facepriv.patch import GeneratorConfig, PatchGenerator
from facepriv.patch.losses import load_latent_prior
from test_patch import TINY, _faces, _tiny_taesd

CROSS_DIM = 8


def _tiny_cond_unet(**kw):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    args = dict(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 16),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS_DIM,
                attention_head_dim=4, norm_num_groups=8)
    args.update(kw)
    unet = UNet2DConditionModel(**args)
    with torch.no_grad():  # a freshly made UNet zeroes its output conv; give it a real output
        unet.conv_out.weight.normal_(0, 0.2)
    return unet


def _fake_hub(tmp_path, monkeypatch, repo: str):
    cache = tmp_path / "hf"
    owner, name = repo.split("/")
    base = cache / f"models--{owner}--{name}"
    snap = base / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snap


def test_conditional_unet_prior_from_a_hub_id_uses_a_null_conditioning(tmp_path, monkeypatch):
    from diffusers import DDPMScheduler

    snap = _fake_hub(tmp_path, monkeypatch, "someone/tiny-ldm")
    unet = _tiny_cond_unet()
    unet.save_pretrained(snap / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(snap / "scheduler")
    _tiny_taesd(tmp_path / "taesd")

    prior = load_latent_prior("someone/tiny-ldm")
    assert prior.in_channels == 4
    assert torch.equal(prior.score.null_embedding, torch.zeros(1, CROSS_DIM))
    # the score model is the UNet called with the null conditioning (zeros, one token)
    z = torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 400])
    with torch.no_grad():
        got = prior.score(z, t)
        want = unet.eval()(z, t, encoder_hidden_states=torch.zeros(2, 1, CROSS_DIM)).sample
        other = unet(z, t, encoder_hidden_states=torch.ones(2, 1, CROSS_DIM)).sample
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, other, atol=1e-3)

    # in training: the SDS gradient reaches the generator's latent, never the UNet, and it is
    # w(t) * (eps_hat(z_t, t) - eps) as score distillation prescribes
    gen = PatchGenerator(GeneratorConfig(natural=True, autoencoder=str(tmp_path / "taesd"), **TINY))
    _, latent = gen(_faces(2), return_latent=True)
    zl = latent.detach().requires_grad_(True)
    torch.manual_seed(5)
    loss = prior(zl)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.sum().backward()
    torch.manual_seed(5)  # the same draws again, by hand
    ac = prior.score.alphas_cumprod
    T = ac.shape[0]
    tt = torch.randint(int(0.02 * T), int(0.5 * T), (2,))
    eps = torch.randn_like(zl)
    a = ac[tt].view(-1, 1, 1, 1)
    with torch.no_grad():
        eps_hat = unet(a.sqrt() * zl + (1 - a).sqrt() * eps, tt, encoder_hidden_states=torch.zeros(2, 1, CROSS_DIM)).sample
    expected = (1 - a) * (eps_hat - eps) / zl[0].numel()
    assert torch.allclose(zl.grad, expected, atol=1e-6)
    assert all(p.grad is None for p in prior.parameters())
    prior(latent).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in gen.named_parameters()
               if not n.startswith("latent."))


def test_conditional_unet_prior_with_a_precomputed_null_embedding_and_refusals(tmp_path):
    from safetensors.torch import save_file

    unet = _tiny_cond_unet()
    unet.save_pretrained(tmp_path / "ldm" / "unet")  # no scheduler folder: Stable Diffusion's schedule
    emb = torch.randn(3, CROSS_DIM)
    save_file({"embedding": emb[None].contiguous()}, str(tmp_path / "ldm" / "null_embedding.safetensors"))
    prior = load_latent_prior(str(tmp_path / "ldm"))
    z, t = torch.randn(1, 4, 4, 4), torch.tensor([100])
    with torch.no_grad():
        assert torch.allclose(prior.score(z, t), unet.eval()(z, t, encoder_hidden_states=emb[None]).sample, atol=1e-6)
    betas = prior.score.scheduler.betas
    assert float(betas[0]) == pytest.approx(0.00085) and float(betas[-1]) == pytest.approx(0.012, rel=1e-4)

    save_file({"embedding": torch.zeros(2, CROSS_DIM + 1)}, str(tmp_path / "ldm" / "null_embedding.safetensors"))
    with pytest.raises(ConfigError, match="null_embedding"):
        load_latent_prior(str(tmp_path / "ldm"))
    # UNets needing more than a text embedding (SDXL's added time ids, class labels) are refused
    _tiny_cond_unet(class_embed_type="timestep").save_pretrained(tmp_path / "cls" / "unet")
    with pytest.raises(ConfigError, match="class_embed_type"):
        load_latent_prior(str(tmp_path / "cls"))
