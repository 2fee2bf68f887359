"""The conditional patch generator: aligned source face (+ target face) -> patch, in one pass.

Architecture (:class:`PatchGenerator`)
    * **Encoder**: a small trainable CNN, shared between the source and the target face
      (both aligned to the ArcFace template at ``input_size``), giving ``levels`` feature maps
      at 1/2, 1/4, 1/8, ... resolution. A frozen face-recognition backbone was the other
      option; we use a small CNN because (a) the surrogates that judge the patch already are
      FR networks, so the identity signal reaches the generator through the loss; (b) each
      registry backbone has its own template, input size and normalisation, and several are
      large (FaceNet 23 M parameters) - as an encoder they would dominate the apply time the
      generator exists to make small; (c) GroupNorm everywhere keeps each face's patch
      independent of the other faces in a batch.
    * **Fusion** at every scale: ``concat`` (source features, target features, their product
      -> 1x1 + 3x3 convolutions) or ``attention`` (source positions attend to target positions,
      multi-head cross-attention, plus the concat path). Without a target (evasion) the target
      features are replaced by learned "no target" embeddings, so one generator serves both
      impersonation and evasion.
    * **Decoder**: from a 4x4 seed up to the patch (or latent) resolution, each step fed with
      the fused features of the matching scale (resized), ending in ``tanh`` -> [0, 1] RGB.
    * **Natural mode**: the decoder ends in a latent of a pretrained latent-diffusion
      autoencoder (diffusers ``AutoencoderTiny`` / ``AutoencoderKL`` from the registry; default
      ``taesd`` = ``madebyollin/taesd``), which is decoded (frozen) into the patch, so patches
      are made of what the autoencoder can draw.

Persistence
    :meth:`PatchGenerator.save_pretrained` writes ``config.json`` and ``generator.safetensors``
    (and the autoencoder in diffusers layout under ``autoencoder/``, and a user region mask as
    ``region_mask.png``) in facepriv's one save format (:mod:`facepriv.core.saving`: written
    atomically, format and version checked on loading), so a generator folder is self-contained;
    :meth:`PatchGenerator.from_pretrained` reads it back (the autoencoder through
    ``facepriv.models.create_model``). ``config.json`` also carries the generator's
    ``validation`` record when training measured one (its evasion rate on held-out faces,
    see :func:`facepriv.patch.train.validate_generator`), tied to the weights it was measured
    on by their sha256; :func:`read_validation` reads it without loading the network.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ConfigBase
from ..core.errors import ConfigError
from ..core.saving import SaveFormat, load_weights, read_metadata, rewrite_metadata, save_network

FORMAT_VERSION = 1
#: how a generator folder is saved: ``config.json`` + ``generator.safetensors`` (see core.saving)
GENERATOR_FORMAT = SaveFormat("facepriv-patch-generator", FORMAT_VERSION, "patch generator")
GENERATOR_WEIGHTS = "generator.safetensors"
FUSIONS = ("concat", "attention")


@dataclass
class GeneratorConfig(ConfigBase):
    """The architecture of a :class:`PatchGenerator`: the ``"config"`` of its ``config.json``
    (saved fields exactly; an unknown key is a :class:`ConfigError`, never a silent default)."""

    config_name = "patch generator setting"

    patch_size: int = 64
    input_size: int = 112  # aligned faces (ArcFace template) fed to the encoder
    base_channels: int = 16
    levels: int = 4
    fusion: str = "concat"
    attention_heads: int = 4
    region: str = "forehead"  # placement region the generator is trained for
    region_feather: float = 1.0
    natural: bool = False
    autoencoder: str | None = None  # registry name / hub id / path (natural mode)
    autoencoder_model: str | None = None  # registry entry used to load it (set automatically)
    latent_channels: int = 0  # set from the autoencoder
    latent_factor: int = 1  # spatial downscaling of the autoencoder (8 for taesd)
    latent_scale: float = 3.0  # latents are latent_scale * tanh(.) before unscaling
    latent_scaling_factor: float = 1.0  # diffusers vae.config.scaling_factor
    latent_shift_factor: float = 0.0

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ConfigError(f"fusion must be one of {FUSIONS}, not {self.fusion!r}")
        if self.patch_size < 8 or self.patch_size & (self.patch_size - 1):
            raise ConfigError(f"patch size must be a power of two >= 8, not {self.patch_size}")
        if self.input_size < 2 ** self.levels * 2:
            raise ConfigError(f"input size {self.input_size} too small for {self.levels} levels")
        if self.levels < 1 or self.base_channels < 4:
            raise ConfigError("levels must be >= 1 and base_channels >= 4")

    @property
    def output_resolution(self) -> int:
        """Side of what the decoder produces: the patch, or its latent in natural mode."""
        if self.natural:
            if self.patch_size % self.latent_factor:
                raise ConfigError(f"patch size {self.patch_size} is not a multiple of the autoencoder's "
                                  f"downscaling factor {self.latent_factor}")
            return self.patch_size // self.latent_factor
        return self.patch_size


# ----------------------------------------------------------------------------- blocks
def _groups(c: int) -> int:
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


class ConvBlock(nn.Module):
    """conv3x3 - GroupNorm - SiLU, twice, with a residual connection."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.norm1 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.skip = nn.Identity() if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride=stride)

    def forward(self, x):
        h = F.silu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.silu(h + self.skip(x))


class Encoder(nn.Module):
    def __init__(self, base: int, levels: int):
        super().__init__()
        self.stem = nn.Conv2d(3, base, 3, padding=1)
        chans = [base * min(2 ** i, 8) for i in range(levels)]
        blocks, cin = [], base
        for c in chans:
            blocks.append(ConvBlock(cin, c, stride=2))
            cin = c
        self.blocks = nn.ModuleList(blocks)
        self.channels = chans

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = F.silu(self.stem(x * 2 - 1))
        feats = []
        for b in self.blocks:
            h = b(h)
            feats.append(h)
        return feats


class Fusion(nn.Module):
    """Fuse source and target features of one scale."""

    def __init__(self, c: int, mode: str, heads: int):
        super().__init__()
        self.mode = mode
        self.mix = nn.Sequential(nn.Conv2d(3 * c, c, 1), nn.GroupNorm(_groups(c), c), nn.SiLU(),
                                 nn.Conv2d(c, c, 3, padding=1))
        self.null = nn.Parameter(torch.zeros(1, c, 1, 1))  # "no target" (evasion) embedding
        if mode == "attention":
            h = max(1, min(heads, c // 8))
            while c % h:
                h -= 1
            self.norm_q = nn.GroupNorm(1, c)
            self.norm_kv = nn.GroupNorm(1, c)
            self.attn = nn.MultiheadAttention(c, h, batch_first=True)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor | None, has_target: torch.Tensor | None) -> torch.Tensor:
        null = self.null.expand_as(src)
        if tgt is None:
            tgt = null
        elif has_target is not None:
            tgt = torch.where(has_target.view(-1, 1, 1, 1), tgt, null)
        out = src + self.mix(torch.cat([src, tgt, src * tgt], 1))
        if self.mode == "attention":
            b, c, h, w = src.shape
            q = self.norm_q(out).flatten(2).transpose(1, 2)
            kv = self.norm_kv(tgt).flatten(2).transpose(1, 2)
            a, _ = self.attn(q, kv, kv, need_weights=False)
            out = out + a.transpose(1, 2).reshape(b, c, h, w)
        return out


class Decoder(nn.Module):
    def __init__(self, enc_channels: list[int], out_res: int, out_channels: int, base: int):
        super().__init__()
        self.start = min(4, out_res)
        steps = int(round(math.log2(out_res / self.start)))
        self.steps = steps
        deep = enc_channels[-1]
        self.seed = nn.Sequential(nn.Conv2d(deep, deep, 1), nn.SiLU())
        ups, skips, cin = [], [], deep
        levels = len(enc_channels)
        self.skip_level = []
        for k in range(steps):
            lvl = max(0, levels - 2 - k)
            c_skip = enc_channels[lvl]
            c_out = max(base, cin // 2)
            skips.append(nn.Conv2d(c_skip, c_skip, 1))
            ups.append(ConvBlock(cin + c_skip, c_out))
            self.skip_level.append(lvl)
            cin = c_out
        self.ups = nn.ModuleList(ups)
        self.skips = nn.ModuleList(skips)
        self.head = nn.Conv2d(cin, out_channels, 3, padding=1)
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)

    def forward(self, fused: list[torch.Tensor]) -> torch.Tensor:
        h = self.seed(F.adaptive_avg_pool2d(fused[-1], self.start))
        for up, skip, lvl in zip(self.ups, self.skips, self.skip_level):
            h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
            s = fused[lvl]
            s = F.adaptive_avg_pool2d(s, h.shape[-2:]) if s.shape[-1] >= h.shape[-1] else \
                F.interpolate(s, size=h.shape[-2:], mode="bilinear", align_corners=False)
            h = up(torch.cat([h, skip(s)], 1))
        return self.head(h)


# ----------------------------------------------------------------------------- autoencoder
class LatentDecoder(nn.Module):
    """A frozen latent autoencoder's decoder: normalised latent -> RGB [0, 1].

    Wraps diffusers ``AutoencoderTiny`` / ``AutoencoderKL`` (``decode(z).sample`` in [-1, 1]);
    any other decoder module (``decode(z)`` or ``module(z)``) can be wrapped directly, with
    ``output_range="01"`` when it returns [0, 1] (e.g. the taesd repository's raw decoders).
    """

    def __init__(self, vae: nn.Module, *, latent_channels: int, factor: int, scaling_factor: float = 1.0,
                 shift_factor: float = 0.0, output_range: str = "pm1", encoder: nn.Module | None = None):
        super().__init__()
        self.vae = vae
        self.encoder = encoder  # optional raw encoder (images in [0, 1] -> latent), for the initial latent
        self.latent_channels = int(latent_channels)
        self.factor = int(factor)
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.output_range = output_range
        for p in self.vae.parameters():
            p.requires_grad_(False)
        self.vae.eval()

    @classmethod
    def from_diffusers(cls, vae: nn.Module) -> LatentDecoder:
        cfg = vae.config
        name = type(vae).__name__
        if name == "AutoencoderTiny":
            factor = int(cfg.upsampling_scaling_factor) ** (len(cfg.decoder_block_out_channels) - 1)
        elif name == "AutoencoderKL":
            factor = 2 ** (len(cfg.block_out_channels) - 1)
        else:
            raise ConfigError(f"unsupported autoencoder {name} (AutoencoderTiny or AutoencoderKL)")
        return cls(vae, latent_channels=cfg.latent_channels, factor=factor,
                   scaling_factor=getattr(cfg, "scaling_factor", 1.0) or 1.0,
                   shift_factor=getattr(cfg, "shift_factor", 0.0) or 0.0)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor | None:
        """Normalised latent of images in [0, 1], or None when no encoder is known."""
        if self.encoder is not None:
            raw = self.encoder(x)
        elif hasattr(self.vae, "encode"):
            enc = self.vae.encode(x * 2 - 1)
            raw = enc.latents if hasattr(enc, "latents") else enc.latent_dist.mean
        else:
            return None
        return (raw - self.shift_factor) * self.scaling_factor

    def train(self, mode: bool = True):  # always frozen / eval
        super().train(mode)
        self.vae.eval()
        return self

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        raw = z / self.scaling_factor + self.shift_factor
        out = self.vae.decode(raw) if hasattr(self.vae, "decode") else self.vae(raw)
        out = getattr(out, "sample", out)
        if self.output_range == "pm1":
            out = (out + 1) / 2
        return out.clamp(0.0, 1.0)


def resolve_autoencoder(spec: str | None, device="cpu") -> tuple[nn.Module, str]:
    """Load an autoencoder by registry name, Hugging Face hub id or local folder (as
    :func:`facepriv.models.resolve_pretrained` classifies it; default ``taesd``).

    Returns (diffusers model, registry entry used). Everything goes through
    :func:`facepriv.models.create_model` (a folder / a hub snapshot is passed as ``weights``).
    """
    from ..models import create_model, resolve_pretrained

    resolved = resolve_pretrained(spec or "taesd", task="autoencoder", what="autoencoder")
    if resolved.kind == "registry":
        return create_model(resolved.name, device=device), resolved.name
    path = resolved.local_path()
    name = _registry_name_for(path)
    return create_model(name, device=device, weights=path), name


def _registry_name_for(folder: Path) -> str:
    cfg = None
    for c in (folder / "config.json", folder / "vae" / "config.json"):
        if c.is_file():
            cfg = json.loads(c.read_text())
            break
    return "sd-vae-ft-mse" if cfg and cfg.get("_class_name") == "AutoencoderKL" else "taesd"


# ----------------------------------------------------------------------------- generator
class PatchGenerator(nn.Module):
    """Conditional encoder-decoder: ``forward(source, target=None) -> patch (N, 3, P, P)``.

    ``source`` / ``target``: faces aligned to the ArcFace template at ``config.input_size``,
    RGB in [0, 1]. ``target`` None (or ``has_target`` False for a row) = evasion.
    """

    def __init__(self, config: GeneratorConfig | None = None, *, autoencoder: nn.Module | None = None, **kwargs):
        super().__init__()
        config = config or GeneratorConfig(**kwargs)
        self.latent: LatentDecoder | None = None
        if config.natural:
            if autoencoder is None:
                vae, reg = resolve_autoencoder(config.autoencoder)
                config.autoencoder_model = reg
                autoencoder = vae
            self.latent = autoencoder if isinstance(autoencoder, LatentDecoder) else LatentDecoder.from_diffusers(autoencoder)
            config.latent_channels = self.latent.latent_channels
            config.latent_factor = self.latent.factor
            config.latent_scaling_factor = self.latent.scaling_factor
            config.latent_shift_factor = self.latent.shift_factor
        self.config = config
        if config.natural:
            # The generator starts from the latent of a mid-grey patch (an all-zero latent decodes
            # to black in some latent spaces); stored with the weights.
            P = config.patch_size
            base = self.latent.encode(torch.full((1, 3, P, P), 0.5))
            r = config.output_resolution
            if base is None or tuple(base.shape[-2:]) != (r, r):
                base = torch.zeros(1, config.latent_channels, r, r)
            base = torch.atanh((base / config.latent_scale).clamp(-0.95, 0.95))
            self.register_buffer("latent_base", base.detach().float())
        self.encoder = Encoder(config.base_channels, config.levels)
        self.fusions = nn.ModuleList(Fusion(c, config.fusion, config.attention_heads) for c in self.encoder.channels)
        out_ch = config.latent_channels if config.natural else 3
        self.decoder = Decoder(self.encoder.channels, config.output_resolution, out_ch, config.base_channels)
        self._region = None
        # what training measured on held-out faces (written to config.json by save_pretrained)
        self.validation: dict | None = None

    # -- forward
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        s = self.config.input_size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return x

    def encode_target(self, target: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features of target faces (compute once, reuse for many sources)."""
        return self.encoder(self._prepare(target))

    def encode(self, source: torch.Tensor, target: torch.Tensor | None = None,
               has_target: torch.Tensor | None = None, *,
               target_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The decoder's output: RGB logits (pixel mode) or the normalised latent (natural)."""
        src = self.encoder(self._prepare(source))
        tgt = target_features
        if tgt is None and target is not None:
            tgt = self.encode_target(target)
        if tgt is not None and tgt[0].shape[0] == 1 and source.shape[0] > 1:
            tgt = [t.expand(source.shape[0], -1, -1, -1) for t in tgt]
        if has_target is not None:
            has_target = has_target.to(source.device, torch.bool)
        fused = [f(s, None if tgt is None else tgt[i], has_target) for i, (f, s) in enumerate(zip(self.fusions, src))]
        out = self.decoder(fused)
        if self.config.natural:
            return self.config.latent_scale * torch.tanh(out + self.latent_base)
        return out

    def decode(self, out: torch.Tensor) -> torch.Tensor:
        if self.config.natural:
            patch = self.latent(out)
            P = self.config.patch_size
            if tuple(patch.shape[-2:]) != (P, P):
                patch = F.interpolate(patch, size=(P, P), mode="bilinear", align_corners=False, antialias=True)
            return patch
        return (torch.tanh(out) + 1) / 2

    def forward(self, source: torch.Tensor, target: torch.Tensor | None = None,
                has_target: torch.Tensor | None = None, *, target_features: list[torch.Tensor] | None = None,
                return_latent: bool = False):
        out = self.encode(source, target, has_target, target_features=target_features)
        patch = self.decode(out)
        if return_latent:
            return patch, (out if self.config.natural else None)
        return patch

    # -- region
    @property
    def region(self):
        """The :class:`~facepriv.patch.placement.PatchRegion` this generator is trained for."""
        if self._region is None:
            from .placement import get_region

            self._region = get_region(self.config.region, feather=self.config.region_feather)
        return self._region

    def patch_mask(self, device=None) -> torch.Tensor:
        return self.region.patch_mask(self.config.patch_size, device=device)

    # -- persistence
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("latent.")}

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the generator folder (:data:`GENERATOR_FORMAT`, atomically; see the module docstring)."""
        path = Path(path)
        cfg = self.config.to_json()
        region_src = self.region.source
        copy_region = region_src is not None and Path(region_src).resolve() != (path / "region_mask.png").resolve()
        if region_src is not None:
            cfg["region"] = "region_mask.png"
        save_ae = (self.config.natural and hasattr(self.latent.vae, "save_pretrained")
                   and not (path / "autoencoder").is_dir())
        if self.config.natural and (save_ae or (path / "autoencoder").is_dir()):
            cfg["autoencoder"] = "autoencoder"

        def write(tmp: Path) -> None:
            if copy_region:
                shutil.copyfile(region_src, tmp / "region_mask.png")
            if save_ae:
                self.latent.vae.save_pretrained(str(tmp / "autoencoder"), safe_serialization=True)

        def extra(tmp: Path) -> dict:
            if self.validation is None:
                return {}
            return {"validation": {**self.validation, "weights_sha256": weights_digest(tmp)}}

        return save_network(path, GENERATOR_FORMAT, cfg, weights={GENERATOR_WEIGHTS: self.trainable_state_dict()},
                            extra=extra, write=write)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        autoencoder: nn.Module | None = None) -> PatchGenerator:
        """Load a generator folder written by :meth:`save_pretrained` (eval mode)."""
        path = Path(path).expanduser()
        meta = read_metadata(path, GENERATOR_FORMAT)
        d = dict(meta.get("config") or {})
        if d.get("region") == "region_mask.png":
            d["region"] = str(path / "region_mask.png")
        cfg = GeneratorConfig.from_dict(d)
        if cfg.natural and autoencoder is None:
            from ..models import create_model

            ae = path / "autoencoder"
            if ae.is_dir():
                autoencoder = create_model(cfg.autoencoder_model or _registry_name_for(ae), weights=ae)
            elif cfg.autoencoder in (None, "autoencoder"):
                raise ConfigError(f"{path}: natural-mode generator without its autoencoder; pass autoencoder=")
        gen = cls(cfg, autoencoder=autoencoder)
        state = load_weights(path, GENERATOR_WEIGHTS, GENERATOR_FORMAT)
        missing, unexpected = gen.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("latent.")]
        if missing or unexpected:
            raise ConfigError(f"{path / GENERATOR_WEIGHTS} does not match the config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
        gen = gen.to(device).eval()
        for p in gen.parameters():
            p.requires_grad_(False)
        gen.validation = read_validation(path, meta=meta)
        return gen

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(v.numel() for k, v in self.named_parameters() if not (trainable_only and k.startswith("latent.")))


# ----------------------------------------------------------------------------- validation record
def weights_digest(path: str | os.PathLike) -> str | None:
    """sha256 of a generator folder's ``generator.safetensors`` (None when it is missing)."""
    import hashlib

    f = Path(path) / GENERATOR_WEIGHTS
    if not f.is_file():
        return None
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_validation(path: str | os.PathLike, *, meta: dict | None = None) -> dict | None:
    """The ``validation`` record of a generator folder's ``config.json``, or None when there is
    none, it is unreadable, or it was measured on other weights than the folder now holds (a
    checkpoint written after it, a generator fine-tuned elsewhere)."""
    path = Path(path).expanduser()
    if meta is None:
        try:
            meta = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return None
    v = meta.get("validation") if isinstance(meta, dict) else None
    if not isinstance(v, dict):
        return None
    want = v.get("weights_sha256")
    if want is not None and want != weights_digest(path):
        return None
    return v


def write_validation(path: str | os.PathLike, validation: dict | None) -> None:
    """Store (or, with None, remove) the validation record in a generator folder's
    ``config.json`` (atomically), tied to the weights the folder holds now."""
    path = Path(path).expanduser()
    meta = read_metadata(path, GENERATOR_FORMAT)
    if validation is None:
        meta.pop("validation", None)
    else:
        meta["validation"] = {**validation, "weights_sha256": weights_digest(path)}
    rewrite_metadata(path, GENERATOR_FORMAT, meta)
