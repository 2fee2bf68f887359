"""MAP fine-tuning: teach a score network to regenerate faces with a new identity and expression.

:class:`MAPTuner` holds two copies of a pixel-space DDPM score network: the pretrained one
(frozen, ``base``) and a trainable copy (``tuned``). For a set of aligned faces ``x``:

1. ``x_t0 = DDIM-invert_base(x)`` to timestep ``t0`` in ``n_inv`` steps, once, without
   gradients (as DiffusionCLIP / DiffAM do: the latent stays anchored to the pretrained model);
2. every step regenerates ``x_hat = DDIM-generate_tuned(x_t0)`` in ``n_gen`` steps with
   gradients (each UNet call checkpointed), computes ``L_id``, ``L_exp``, ``L_smooth`` and
   ``L_sm`` (:mod:`.losses`), takes the parameter gradients of ``w_id L_id`` and
   ``w_exp L_exp`` separately, projects them where they conflict (:mod:`.projection`,
   optionally on EMA-smoothed gradients), adds the gradient of
   ``w_smooth L_smooth + w_sm L_sm`` and applies one optimiser step.

Inversion with the frozen network and generation with the tuned one is what makes the edit:
the same network both ways would give (nearly) the input back. The tuned network is saved with
:meth:`MAPTuner.save` (diffusers layout, safetensors, plus the settings and which base network
it came from) and reused by :class:`MAPEditor` to protect new faces in one pass.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...attacks.identity import IdentityReference, SurrogateEnsemble
from ...core.align import AlignedFaces, align_faces, paste_back
from ...core.config import ConfigBase, read_json
from ...core.device import autocast
from ...core.errors import ConfigError
from ...core.progress import make_progress
from ...core.saving import SaveFormat, read_settings, save_network
from ...core.saving import read_metadata as read_saved_metadata
from .ddim import ddim_generate, ddim_invert, timestep_grid
from .loading import score_model_reference
from .losses import aligned_identity_loss, embed_crops, expression_loss, laplacian_smoothness, score_matching_loss
from .projection import PROJECTION_MODES, ConflictStats, EMAGradients, pcgrad_combine

OPTIMIZERS = ("adam", "adamw", "sgd")
#: a saved MAP model: diffusers ``unet/`` + ``scheduler/`` and ``facepriv.json`` with the settings
#: under ``"map"`` (a top-level ``config.json`` would read as a diffusers model config)
MAP_FORMAT = SaveFormat("facepriv-map", 1, "MAP model (facepriv protect --save-model)",
                        meta_file="facepriv.json", config_key="map")


@dataclass
class MAPConfig(ConfigBase):
    """Every MAP hyper-parameter. Defaults are for a 256 px CelebA-HQ DDPM (see docs/protect.md).
    :meth:`MAPTuner.save` stores exactly the fields (under ``"map"`` in ``facepriv.json``)."""

    config_name = "MAP setting"

    steps: int = 30  # optimiser steps of fine-tuning (each on ``batch_size`` faces)
    lr: float = 4e-6  # learning rate (DiffusionCLIP / DiffAM range for the 256 px DDPM)
    optimizer: str = "adam"  # adam | adamw | sgd
    weight_decay: float = 0.0
    t0: int = 300  # inversion depth (of 1000 training timesteps): larger = bigger edits
    n_inv: int = 40  # DDIM inversion steps (no gradients, done once per face)
    n_gen: int = 6  # DDIM generation steps (differentiable; memory/time grow with it)
    w_id: float = 1.0  # identity (adversarial) objective
    w_exp: float = 0.5  # expression objective
    w_smooth: float = 10.0  # Laplacian smoothness of the edit
    w_sm: float = 1.0  # score matching on the source faces
    projection: str = "global"  # global | layerwise | none
    ema: float = 0.0  # EMA factor for the objectives' gradients before projection (0 = off)
    batch_size: int = 4  # faces per fine-tuning step
    expression: str | None = "happy"  # target expression label (None: only --expression-ref)
    train_layers: str = "all"  # "all" or comma-separated fnmatch patterns on UNet parameter names
    grad_clip: float | None = 1.0  # clip the combined gradient's norm (None: off)
    checkpointing: bool = True  # gradient checkpointing per UNet call
    mixed_precision: bool = True  # bf16 autocast on CUDA when supported
    seed: int = 0  # minibatch order and score-matching noise

    def __post_init__(self):
        if self.steps < 0:
            raise ConfigError("steps must be >= 0")
        if self.lr <= 0:
            raise ConfigError("lr must be > 0")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.projection not in PROJECTION_MODES:
            raise ConfigError(f"projection must be one of {', '.join(PROJECTION_MODES)}, not {self.projection!r}")
        if self.n_inv < 1 or self.n_gen < 1:
            raise ConfigError("n_inv and n_gen must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError("ema must be in [0, 1)")
        for w in ("w_id", "w_exp", "w_smooth", "w_sm"):
            if getattr(self, w) < 0:
                raise ConfigError(f"{w} must be >= 0")
        if self.expression is not None and self.expression.strip().lower() in ("", "none"):
            self.expression = None


def _tuning_autocast(device: torch.device, enabled: bool):
    # Only bf16 for training (fp16 would need loss scaling through three autograd.grad calls).
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _progress(enabled: bool):
    """A progress bar, or none when another live display cannot be nested (old rich)."""
    bar = make_progress(enabled=enabled)
    try:
        bar.__enter__()
    except Exception:  # noqa: BLE001 - rich < 14 refuses nested live displays
        bar = make_progress(enabled=False)
        bar.__enter__()
    try:
        yield bar
    finally:
        bar.__exit__(None, None, None)


def align_for_score_model(score_model, image: torch.Tensor, landmarks: torch.Tensor,
                          image_index: torch.Tensor | None = None) -> AlignedFaces:
    """Faces of ``image`` aligned to the score network's template at its resolution."""
    res = score_model.resolution
    return align_faces(image, landmarks, score_model.template, size=(res, res), image_index=image_index)


def paste_protected(image: torch.Tensor, x_hat: torch.Tensor, aligned: AlignedFaces, feather: float = 0.12) -> torch.Tensor:
    """Add the edit ``x_hat - crop`` back into the photo (residual paste-back)."""
    out = paste_back(image, x_hat.to(image), aligned.matrices, reference=aligned.crops.to(image),
                     feather=feather, shape="ellipse")
    return out.clamp(0, 1)


class _Regenerator:
    """Invert faces with the frozen ``base`` network and regenerate them with the ``tuned`` one
    (what :class:`MAPTuner` and :class:`MAPEditor` share)."""

    base: torch.nn.Module
    tuned: torch.nn.Module
    cfg: MAPConfig
    device: torch.device

    @property
    def template(self) -> str:
        return self.base.template

    @property
    def resolution(self) -> int:
        return self.base.resolution

    @torch.no_grad()
    def invert(self, crops: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """``x_t0`` of aligned crops ([0, 1]) with the frozen network, in full precision."""
        chunk = chunk or max(1, self.cfg.batch_size)
        out = []
        for i in range(0, crops.shape[0], chunk):
            x = crops[i: i + chunk].to(self.device, torch.float32) * 2 - 1
            out.append(ddim_invert(self.base.unet, x, self.base.scheduler, self.cfg.t0, self.cfg.n_inv,
                                   checkpoint=False).cpu())
        return torch.cat(out) if out else crops.new_zeros(0, *crops.shape[1:])

    def generate(self, latents: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """``x_hat`` in [0, 1] (not clamped) regenerated by the tuned network."""
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx:
            x = ddim_generate(self.tuned.unet, latents.to(self.device), self.base.scheduler, self.cfg.t0,
                              self.cfg.n_gen, checkpoint=grad and self.cfg.checkpointing)
        return (x.float() + 1) / 2

    @torch.no_grad()
    def protect(self, crops: torch.Tensor | None = None, latents: torch.Tensor | None = None,
                chunk: int | None = None) -> torch.Tensor:
        """Protected crops ([0, 1], clamped) from aligned ``crops`` or their ``latents``."""
        if latents is None:
            if crops is None:
                raise ValueError("protect needs crops or latents")
            latents = self.invert(crops)
        chunk = chunk or max(1, self.cfg.batch_size)
        out = []
        for i in range(0, latents.shape[0], chunk):
            with autocast(self.device, self.cfg.mixed_precision):
                out.append(self.generate(latents[i: i + chunk]).clamp(0, 1).cpu())
        return torch.cat(out) if out else latents.new_zeros(0, *latents.shape[1:])

    def edit(self, image: torch.Tensor, landmarks: torch.Tensor, feather: float = 0.12) -> torch.Tensor:
        """Protect every face of one photo (3, H, W) [0, 1]: align, invert, regenerate, paste."""
        if landmarks.shape[0] == 0:
            return image
        al = align_for_score_model(self.base, image, landmarks.to(image.device))
        x_hat = self.protect(al.crops)
        return paste_protected(image, x_hat, al, feather)


class MAPTuner(_Regenerator):
    """Fine-tune a score network for MAP on a set of aligned faces, then protect them.

        >>> tuner = MAPTuner(create_model("ddpm-celebahq-256"), ensemble=SurrogateEnsemble(["dlib-resnet"]),
        ...                  expression_model=create_model("expr-fer7"), config=MAPConfig(expression="happy"))
        >>> crops = align_for_score_model(tuner.base, image, landmarks).crops
        >>> history = tuner.fit(crops)                  # dodging; pass reference= for a target
        >>> protected = tuner.protect(crops)            # (N, 3, R, R) in [0, 1]
        >>> tuner.save("my-map-model")
    """

    def __init__(self, score_model, *, ensemble: SurrogateEnsemble, expression_model=None,
                 config: MAPConfig | None = None, device: str | torch.device = "cpu", base_ref: str | None = None,
                 progress: bool = True):
        self.cfg = config or MAPConfig()
        self.device = torch.device(device)
        self.base = score_model.to(self.device).eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        n_train = int(self.base.scheduler.config.num_train_timesteps)
        timestep_grid(self.cfg.t0, self.cfg.n_inv, n_train)  # validates t0 early
        self.tuned = copy.deepcopy(self.base).eval()
        self.ensemble = ensemble.to(self.device).eval()
        for p in self.ensemble.parameters():
            p.requires_grad_(False)
        self.expression_model = expression_model.to(self.device).eval() if expression_model is not None else None
        if self.expression_model is not None:
            for p in self.expression_model.parameters():
                p.requires_grad_(False)
        # a relative folder is recorded absolute, so that a saved model works from any directory
        self.base_ref = score_model_reference(base_ref) if base_ref else None
        self.progress = progress
        self.names, self.params = self._select_parameters()
        self.optimizer = self._make_optimizer()
        self.ema = EMAGradients(self.cfg.ema)
        self.stats = ConflictStats()
        self.history: list[dict] = []
        self.rng = torch.Generator().manual_seed(self.cfg.seed)  # minibatch order, score-matching noise
        self._cursor = 0
        self._order: torch.Tensor | None = None

    # ------------------------------------------------------------------ set-up
    def _select_parameters(self) -> tuple[list[str], list[torch.nn.Parameter]]:
        patterns = [p.strip() for p in self.cfg.train_layers.split(",") if p.strip()]
        names, params = [], []
        for name, p in self.tuned.unet.named_parameters():
            keep = patterns == ["all"] or any(fnmatch.fnmatch(name, pat) for pat in patterns)
            p.requires_grad_(keep)
            if keep:
                names.append(name)
                params.append(p)
        if not params:
            raise ConfigError(f"train_layers {self.cfg.train_layers!r} matches no UNet parameter")
        return names, params

    def _make_optimizer(self) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "adam":
            return torch.optim.Adam(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if self.cfg.optimizer == "adamw":
            return torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        return torch.optim.SGD(self.params, lr=self.cfg.lr, momentum=0.9, weight_decay=self.cfg.weight_decay)

    def expression_label(self) -> int | None:
        if self.expression_model is None or self.cfg.expression is None:
            return None
        try:
            return self.expression_model.label_index(self.cfg.expression)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @torch.no_grad()
    def source_reference(self, crops: torch.Tensor) -> IdentityReference:
        """Dodging reference: each face's own embeddings (from its aligned crop)."""
        emb = embed_crops(self.ensemble, crops.to(self.device), self.template)
        return IdentityReference(source={k: v.detach() for k, v in emb.items()})

    # ------------------------------------------------------------------ fine-tuning
    def _next_batch(self, n: int) -> torch.Tensor:
        b = min(self.cfg.batch_size, n)
        if self._order is None or self._order.numel() != n:
            self._order, self._cursor = torch.randperm(n, generator=self.rng), 0
        if self._cursor + b > n:
            self._order, self._cursor = torch.randperm(n, generator=self.rng), 0
        idx = self._order[self._cursor: self._cursor + b]
        self._cursor += b
        return idx

    @staticmethod
    def _slice_ref(ref: IdentityReference, idx: torch.Tensor, device) -> IdentityReference:
        src = None
        if ref.source is not None:
            src = {k: (v[idx.to(v.device)] if v.shape[0] > 1 else v).to(device) for k, v in ref.source.items()}
        tgt = {k: v.to(device) for k, v in ref.target.items()} if ref.target is not None else None
        return IdentityReference(source=src, target=tgt)

    def step(self, crops: torch.Tensor, latents: torch.Tensor, reference: IdentityReference, *,
             expression_ref: torch.Tensor | None = None, idx: torch.Tensor | None = None) -> dict:
        """One fine-tuning step on a minibatch of faces; returns the logged values."""
        cfg = self.cfg
        t_start = time.perf_counter()
        idx = self._next_batch(crops.shape[0]) if idx is None else idx
        x = crops[idx].to(self.device, torch.float32)
        z = latents[idx].to(self.device, torch.float32)
        ref = self._slice_ref(reference, idx, self.device)
        label = self.expression_label()
        use_exp = self.expression_model is not None and cfg.w_exp > 0 and (label is not None or expression_ref is not None)
        with _tuning_autocast(self.device, cfg.mixed_precision):
            x_hat = self.generate(z, grad=True)
            x_in = x_hat.clamp(0, 1)
            l_id = aligned_identity_loss(self.ensemble, x_in, self.template, ref).mean()
            l_exp = (expression_loss(self.expression_model, x_in, self.template, label=label,
                                     ref_features=expression_ref).mean() if use_exp else None)
            l_smooth = laplacian_smoothness(x_hat, x).mean()
            l_sm = (score_matching_loss(self.tuned.unet, x * 2 - 1, self.base.scheduler, generator=self.rng)
                    if cfg.w_sm > 0 else x.new_zeros(()))
        params = self.params
        g_id = torch.autograd.grad(cfg.w_id * l_id, params, retain_graph=True, allow_unused=True)
        g_id = [g if g is not None else torch.zeros_like(p) for g, p in zip(g_id, params)]
        info = {"conflict": False, "cosine": 0.0, "removed": 0.0, "layers": len(params), "layers_conflicting": 0}
        if use_exp:
            g_exp = torch.autograd.grad(cfg.w_exp * l_exp, params, retain_graph=True, allow_unused=True)
            g_exp = [g if g is not None else torch.zeros_like(p) for g, p in zip(g_exp, params)]
            g_id = self.ema.update("id", g_id)
            g_exp = self.ema.update("exp", g_exp)
            combined, info = pcgrad_combine(g_id, g_exp, cfg.projection)
        else:
            combined = self.ema.update("id", g_id)
        self.ema.step()
        # L_smooth and L_sm are added after the projection (they regularise, they do not compete).
        rest_terms = [w * term for w, term in ((cfg.w_smooth, l_smooth), (cfg.w_sm, l_sm)) if w > 0]
        rest = sum(rest_terms) if rest_terms else l_smooth.detach() * 0
        if rest_terms:
            g_rest = torch.autograd.grad(rest, params, allow_unused=True)
            combined = [c + g if g is not None else c for c, g in zip(combined, g_rest)]
        for p, g in zip(params, combined):
            p.grad = g.to(p.dtype)
        grad_norm = None
        if cfg.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.stats.record(info)
        rec = {
            "step": len(self.history) + 1, "faces": int(idx.numel()),
            "L_id": float(l_id.detach()), "L_exp": float(l_exp.detach()) if l_exp is not None else None,
            "L_smooth": float(l_smooth.detach()), "L_sm": float(l_sm.detach()),
            "L_total": float((cfg.w_id * l_id + (cfg.w_exp * l_exp if l_exp is not None else 0.0) + rest).detach()),
            "conflict": bool(info["conflict"]), "cosine": round(float(info["cosine"]), 5),
            "removed": round(float(info.get("removed", 0.0)), 5),
            "layers_conflicting": int(info.get("layers_conflicting", 0)),
            "grad_norm": grad_norm, "seconds": round(time.perf_counter() - t_start, 4),
        }
        self.history.append(rec)
        return rec

    def fit(self, crops: torch.Tensor, *, reference: IdentityReference | None = None,
            latents: torch.Tensor | None = None, expression_ref: torch.Tensor | None = None,
            steps: int | None = None, callback=None) -> list[dict]:
        """Fine-tune on aligned ``crops`` (N, 3, R, R) in [0, 1]; returns the per-step log.

        ``reference``: identity references (default: dodging, from the crops themselves);
        ``latents``: their inversions (computed when missing); ``expression_ref``: expression
        features (1, D) to match instead of the configured label.
        """
        if crops.ndim != 4 or crops.shape[0] == 0:
            raise ValueError("fit needs a non-empty batch of aligned faces (N, 3, R, R)")
        if tuple(crops.shape[-2:]) != (self.resolution, self.resolution):
            raise ValueError(f"faces must be aligned at the score network's resolution {self.resolution}")
        reference = reference or self.source_reference(crops)
        if latents is None:
            latents = self.invert(crops)
        steps = self.cfg.steps if steps is None else steps
        with _progress(self.progress) as bar:
            task = bar.add_task("MAP fine-tuning", total=steps)
            for _ in range(steps):
                rec = self.step(crops, latents, reference, expression_ref=expression_ref)
                if callback is not None:
                    callback(rec)
                exp = f" L_exp {rec['L_exp']:.3f}" if rec["L_exp"] is not None else ""
                bar.update(task, advance=1, description=(
                    f"MAP fine-tuning  L_id {rec['L_id']:.3f}{exp} L_smooth {rec['L_smooth']:.2e} "
                    f"L_sm {rec['L_sm']:.3f}{' conflict' if rec['conflict'] else ''}"))
        return self.history

    def summary(self) -> dict:
        """Losses at the start and end of fine-tuning and the gradient-conflict statistics."""
        h = self.history
        k = max(1, min(3, len(h) // 3)) if h else 0

        def mean(key, rows):
            vals = [r[key] for r in rows if r.get(key) is not None]
            return round(sum(vals) / len(vals), 5) if vals else None

        return {
            "steps": len(h),
            "trainable_parameters": int(sum(p.numel() for p in self.params)),
            "first": {key: mean(key, h[:k]) for key in ("L_id", "L_exp", "L_smooth", "L_sm")} if h else {},
            "last": {key: mean(key, h[-k:]) for key in ("L_id", "L_exp", "L_smooth", "L_sm")} if h else {},
            "seconds_per_step": mean("seconds", h),
            "conflicts": self.stats.summary(),
        }

    # ------------------------------------------------------------------ save / reuse
    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write the tuned network (diffusers ``unet/`` + ``scheduler/``, safetensors) and, in
        ``facepriv.json``, the settings used and where it came from (:data:`MAP_FORMAT`, atomically)."""
        def meta(tmp: Path) -> dict:  # beside the score network's own facepriv.json entries
            own = tmp / MAP_FORMAT.meta_file
            return {**(read_json(own, what="score network") if own.is_file() else {}), "method": "map",
                    "base": self.base_ref, "surrogates": list(self.ensemble.names),
                    "expression_model": getattr(self.expression_model, "name", None),
                    "summary": self.summary(), **(extra or {})}

        return save_network(path, MAP_FORMAT, self.cfg, extra=meta, write=self.tuned.save_pretrained)

    def editor(self, feather: float = 0.12) -> MAPEditor:
        return MAPEditor(self.tuned, self.base, config=self.cfg, device=self.device, feather=feather)


class MAPEditor(_Regenerator):
    """Protect photos with an already fine-tuned network: one inversion + generation per face.

    ``tuned`` regenerates; ``base`` (the network it was fine-tuned from) inverts.
    """

    def __init__(self, tuned, base, *, config: MAPConfig | None = None, device: str | torch.device = "cpu",
                 feather: float = 0.12):
        self.cfg = config or MAPConfig()
        self.device = torch.device(device)
        self.base = base.to(self.device).eval()
        self.tuned = tuned.to(self.device).eval()
        self.feather = feather
        if self.base.resolution != self.tuned.resolution:
            raise ConfigError(f"the tuned network ({self.tuned.resolution} px) and its base "
                              f"({self.base.resolution} px) differ in resolution")

    @staticmethod
    def read_metadata(path: str | Path) -> dict:
        """The checked ``facepriv.json`` of a saved MAP model (also one saved before it was stamped
        with a format: those carry ``"method": "map"``)."""
        return read_saved_metadata(path, MAP_FORMAT, legacy=lambda meta: meta.get("method") == "map")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, base: str | None = None, device: str | torch.device = "cpu",
                        overrides: dict | None = None, feather: float = 0.12) -> MAPEditor:
        """Load a ``--save-model`` folder; ``base`` overrides the recorded base network."""
        from ...models.diffusion import load_score_model
        from .loading import load_base_score_model

        meta = cls.read_metadata(path)
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        cfg = MAPConfig.from_dict({**read_settings(meta, MAP_FORMAT), **given})
        base_ref = base or meta.get("base")
        if not base_ref:
            raise ConfigError(f"{path}: the base score network is not recorded; pass it with --score-model")
        tuned = load_score_model(path, device=device)
        return cls(tuned, load_base_score_model(base_ref, device=device), config=cfg, device=device, feather=feather)

    def edit_faces(self, image: torch.Tensor, faces, _loaded=None) -> torch.Tensor:
        """An ``EditFn`` for :func:`facepriv.core.photo.process_photo`."""
        from ...core.align import landmarks_tensor

        return self.edit(image, landmarks_tensor(faces, image.device), self.feather)
