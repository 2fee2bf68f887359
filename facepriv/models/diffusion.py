"""Diffusion score networks and latent autoencoders (diffusers, ``from_pretrained``).

* task ``score``: a pixel-space DDPM ``UNet2DModel`` with its noise schedule, returned as a
  :class:`ScoreModel` (the UNet plus a ``DDIMScheduler`` built from the checkpoint's own
  scheduler config). Default ``ddpm-celebahq-256`` = ``google/ddpm-celebahq-256``.
* task ``autoencoder``: ``AutoencoderKL`` / ``AutoencoderTiny`` (class read from the config).
* :func:`load_latent_score_model`: a latent-space UNet for ``facepriv patch``'s prior -
  ``UNet2DModel``, or ``UNet2DConditionModel`` run with a fixed null conditioning.

A hub id, a local diffusers folder (``save_pretrained`` layout, the UNet at the root or in
``unet/``) or an imported folder all go through the same code path; weights are loaded from
safetensors when present (diffusers' ``use_safetensors``), never by unpickling.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ConfigError
from .registry import LoadContext, ModelSpec, register
from .sources import HubRepo


def _subfolder(root: Path, name: str) -> Path:
    return root / name if (root / name / "config.json").is_file() else root


class ScoreModel(nn.Module):
    """A DDPM noise-prediction UNet ``eps_theta(x_t, t)`` and its DDIM scheduler.

    ``template`` names the face alignment the model was trained on (for face crops).
    """

    def __init__(self, unet: nn.Module, scheduler, template: str = "celebahq-256"):
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        self.template = template

    @property
    def resolution(self) -> int:
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.tensor([t], device=x.device)
        return self.unet(x, t.to(x.device).expand(x.shape[0])).sample

    def save_pretrained(self, path: str | Path) -> None:
        """diffusers layout: ``unet/`` (safetensors) + ``scheduler/``."""
        path = Path(path)
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(path / "scheduler")
        (path / "facepriv.json").write_text(json.dumps({"template": self.template, "task": "score"}))


def load_score_model(path: str | Path, device="cpu") -> ScoreModel:
    from diffusers import DDIMScheduler, UNet2DModel

    root = Path(path)
    unet_dir = _subfolder(root, "unet")
    if not (unet_dir / "config.json").is_file():
        raise ConfigError(f"{root} is not a diffusers UNet2DModel folder (no config.json)")
    cfg = json.loads((unet_dir / "config.json").read_text())
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConfigError(f"{root}: expected a UNet2DModel, found {cfg.get('_class_name')}")
    safetensors = any(unet_dir.glob("*.safetensors"))
    unet = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=safetensors)
    sched_dir = _subfolder(root, "scheduler")
    sched_cfg = sched_dir / "scheduler_config.json"
    if sched_cfg.is_file():
        scheduler = DDIMScheduler.from_pretrained(str(sched_dir))
    else:  # DDPM default schedule (Ho et al.): linear betas 1e-4 .. 0.02 over 1000 steps
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    meta = root / "facepriv.json"
    template = json.loads(meta.read_text()).get("template", "celebahq-256") if meta.is_file() else "celebahq-256"
    return ScoreModel(unet, scheduler, template).to(device)


class ConditionalScoreModel(ScoreModel):
    """A text-conditional latent UNet (diffusers ``UNet2DConditionModel``, e.g. Stable
    Diffusion's) used as an *unconditional* score model: every call gets the same fixed null
    conditioning ``null_embedding`` (L, cross_attention_dim) as ``encoder_hidden_states``.
    """

    def __init__(self, unet: nn.Module, scheduler, null_embedding: torch.Tensor, template: str = "latent"):
        super().__init__(unet, scheduler, template)
        self.register_buffer("null_embedding", null_embedding.float(), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.tensor([t], device=x.device)
        cond = self.null_embedding.to(x.device, x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.unet(x, t.to(x.device).expand(x.shape[0]), encoder_hidden_states=cond).sample


NULL_EMBEDDING_FILE = "null_embedding.safetensors"


def load_latent_score_model(path: str | Path, device="cpu") -> ScoreModel:
    """A latent diffusion UNet as a score model: ``UNet2DModel`` (unconditional, as
    :func:`load_score_model`) or ``UNet2DConditionModel`` with a fixed null conditioning.

    The null conditioning is the tensor ``embedding`` (shape (L, D) or (1, L, D)) of
    ``null_embedding.safetensors`` in the folder when present (e.g. the text encoder's output
    for the empty prompt, precomputed elsewhere), otherwise zeros of shape
    (1, ``cross_attention_dim``). UNets that need more conditioning than text (class labels,
    SDXL's ``addition_embed_type``, an ``encoder_hid_dim`` projection) are refused.
    """
    root = Path(path)
    unet_dir = _subfolder(root, "unet")
    cfg_file = unet_dir / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{root} is not a diffusers UNet folder (no config.json)")
    cfg = json.loads(cfg_file.read_text())
    name = cfg.get("_class_name", "UNet2DModel")
    if name == "UNet2DModel":
        model = load_score_model(root, device=device)
        model.template = "latent"
        return model
    if name != "UNet2DConditionModel":
        raise ConfigError(f"{root}: expected a UNet2DModel or UNet2DConditionModel, found {name}")
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type", "encoder_hid_dim"):
        if cfg.get(key) is not None:
            raise ConfigError(f"{root}: a UNet2DConditionModel with {key}={cfg[key]!r} needs conditioning beyond a "
                              "text embedding; only text-conditional UNets can be used with a null conditioning")
    if cfg.get("num_class_embeds"):
        raise ConfigError(f"{root}: a class-conditional UNet (num_class_embeds) is not supported")
    dim = cfg.get("cross_attention_dim", 1280)
    if isinstance(dim, (list, tuple)):
        if len(set(dim)) != 1:
            raise ConfigError(f"{root}: per-block cross_attention_dim {dim} is not supported")
        dim = dim[0]
    from diffusers import DDIMScheduler, UNet2DConditionModel

    safetensors = any(unet_dir.glob("*.safetensors"))
    unet = UNet2DConditionModel.from_pretrained(str(unet_dir), use_safetensors=safetensors)
    null_file = root / NULL_EMBEDDING_FILE
    if null_file.is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(null_file))
        if "embedding" not in tensors:
            raise ConfigError(f"{null_file}: expected a tensor named 'embedding'")
        null = tensors["embedding"]
        if null.dim() == 3 and null.shape[0] == 1:
            null = null[0]
        if null.dim() != 2 or null.shape[-1] != int(dim):
            raise ConfigError(f"{null_file}: expected an embedding of shape (L, {dim}), got {tuple(null.shape)}")
    else:
        null = torch.zeros(1, int(dim))
    sched_dir = _subfolder(root, "scheduler")
    if (sched_dir / "scheduler_config.json").is_file():
        scheduler = DDIMScheduler.from_pretrained(str(sched_dir))
    else:  # Stable Diffusion's training schedule
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear")
    return ConditionalScoreModel(unet, scheduler, null).to(device)


def load_autoencoder(path: str | Path):
    from diffusers import AutoencoderKL, AutoencoderTiny

    root = Path(path)
    vae_dir = _subfolder(root, "vae")
    cfg_file = vae_dir / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{root} is not a diffusers autoencoder folder (no config.json)")
    name = json.loads(cfg_file.read_text()).get("_class_name")
    classes = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}
    if name not in classes:
        raise ConfigError(f"{root}: unsupported autoencoder class {name!r} (AutoencoderKL or AutoencoderTiny)")
    safetensors = any(vae_dir.glob("*.safetensors"))
    return classes[name].from_pretrained(str(vae_dir), use_safetensors=safetensors)


def _score_loader(ctx: LoadContext) -> ScoreModel:
    return load_score_model(ctx.path, device=ctx.device)


for _name, _repo, _desc in [
    ("ddpm-celebahq-256", "google/ddpm-celebahq-256", "DDPM (Ho et al. 2020) trained on CelebA-HQ 256x256 faces."),
    ("ddpm-ema-celebahq-256", "google/ddpm-ema-celebahq-256", "DDPM with EMA weights, CelebA-HQ 256x256 faces."),
]:
    register(ModelSpec(
        name=_name, task="score", architecture="unet2d-ddpm", description=_desc, license="Apache-2.0",
        sources=(HubRepo(_repo),), loader=_score_loader, input_size=(256, 256), template="celebahq-256",
        normalization="x*2-1",
        reference="Ho et al., Denoising Diffusion Probabilistic Models, NeurIPS 2020",
    ))

register(ModelSpec(
    name="taesd", task="autoencoder", architecture="autoencoder-tiny",
    description="Tiny AutoEncoder for Stable Diffusion (SD 1.x/2.x latent space, 4 channels, 8x).",
    license="MIT", sources=(HubRepo("madebyollin/taesd"),), loader=lambda ctx: load_autoencoder(ctx.path),
    normalization="x in [0,1]", reference="madebyollin/taesd",
))
register(ModelSpec(
    name="sd-vae-ft-mse", task="autoencoder", architecture="autoencoder-kl",
    description="Stable Diffusion VAE fine-tuned with MSE (4 latent channels, 8x).",
    license="MIT", sources=(HubRepo("stabilityai/sd-vae-ft-mse"),), loader=lambda ctx: load_autoencoder(ctx.path),
    normalization="x*2-1", reference="Rombach et al., High-Resolution Image Synthesis with Latent Diffusion Models, CVPR 2022",
))
