"""Generative de-identification: repaint the inner face with a diffusion model.

Each face is aligned to the generator's face template (``celebahq-256``, the CelebA-HQ crop:
whole head, some background), the **inner face** (brows, eyes, nose, mouth: an ellipse placed from the
template's five points; ``strength`` scales it, 1.0 = brows to below the lower lip) is masked
out and regenerated, and everything else in the crop (face outline, jaw, cheeks, hair, ears,
background) is kept as context. ``score_model`` picks one of two generators:

* **RePaint** (Lugmayr et al., CVPR 2022; diffusers' ``RePaintPipeline`` + ``RePaintScheduler``)
  with a pixel-space unconditional DDPM ``UNet2DModel`` (default ``ddpm-celebahq-256`` =
  ``google/ddpm-celebahq-256``; a registry name, a diffusers folder or a hub id). The crop is the
  model's own size and template; RePaint's resampling (``jump_length`` / ``jump_n_sample``) makes
  the new inner face agree with the kept context.
* **a diffusers inpainting pipeline** (e.g. Stable Diffusion inpainting): a folder or hub id whose
  ``model_index.json`` names an inpainting pipeline class (``StableDiffusionInpaintPipeline``,
  ``StableDiffusionXLInpaintPipeline``, ...) or whose UNet has 9 input channels, loaded with
  diffusers' ``AutoPipelineForInpainting`` (safetensors only; needs ``transformers`` for the text
  encoder) exactly as its repository ships it. The crop is the pipeline's default size
  (``unet.sample_size x vae_scale_factor``, e.g. 512); the model is given the same mask, a
  neutral ``prompt`` (``negative_prompt``, ``guidance_scale``), ``steps`` denoising steps and
  full denoising strength.

Either way only the pixels inside the ellipse are taken from the generator; nothing conditions
the model on pose or expression other than this kept context (and the prompt). Two guards then
decide whether a generated face is accepted (up to ``guard_tries`` tries per face, the seed
advancing each time; faces that pass are not generated again):

* **identity guard**: a face-recognition model from the registry (default dlib-resnet) must
  find the new face (in the photo, after paste-back, aligned from the original landmarks) to
  be *below* its match threshold against the original face;
* **expression guard** (on by default): the 7-class expression model ``expr-fer7`` must give
  the new face the same expression label as the original, so a smile stays a smile.

When no try passes both, the try that passes the identity guard with the most probable
original expression is kept. When **no try passes the identity guard**, the generated face is
never published: ``guard_fallback`` decides what happens to that face instead.

* ``"blur"`` (default), ``"pixelate"``, ``"mask"``: the face is left as in the input (no
  generated pixel is pasted) and treated with that classical method from
  :mod:`facepriv.deid.classical` (``fallback_strength``, default 2.0 = twice the method's
  default strength; the method's own default feathering; this method's ``region``). The guard
  then checks the result; a blurred or pixelated face that still matches is masked on top.
* ``"error"``: :class:`IdentityGuardError` is raised, so the batch marks the file failed (no
  output, exit code 1).

The manifest records per face the tries, similarity and whether the guards passed, and, for a
fallback, the methods applied (``fallback``), why (``fallback_reason``) and the guard's
similarity after it. The result is warped back into the photo with a mask that is 1 over the
regenerated ellipse and fades out just outside it, so pixels beyond it are exactly the input's.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..core.align import Template, align_faces, get_template, landmarks_tensor, paste_back
from ..core.errors import ConfigError, FaceprivError
from ..core.faces import Face
from .base import DeidMethod, create_method, register_method

#: what to do with a face no generation try gets below the identity guard's threshold
GUARD_FALLBACKS = ("blur", "pixelate", "mask", "error")
#: the prompt given to text-conditioned inpainting pipelines (a neutral description)
DEFAULT_PROMPT = "a photo of a face"
#: the face template the crops of an inpainting pipeline are aligned to
PIPELINE_TEMPLATE = "celebahq-256"


class IdentityGuardError(FaceprivError):
    """A face still matched its owner after every generation try (``guard_fallback="error"``)."""


def inner_face_ellipse(template: Template, size: int, *, scale: float = 1.0) -> tuple[float, float, float, float]:
    """Centre x, y and semi-axes (a across, b along) of the inner-face ellipse in a ``size``
    crop aligned to ``template``: from above the brows to below the lower lip."""
    p = np.asarray(template.points, dtype=np.float64) * (size / template.size[1])
    eye_y, mouth_y = p[:2, 1].mean(), p[3:, 1].mean()
    em = mouth_y - eye_y
    eye_d = float(np.hypot(*(p[1] - p[0])))
    top, bottom = eye_y - 0.6 * em, mouth_y + 0.35 * em
    cx, cy = (p[0, 0] + p[1, 0] + p[3, 0] + p[4, 0]) / 4, (top + bottom) / 2
    return cx, cy, 0.95 * eye_d * scale, (bottom - top) / 2 * scale


def ellipse_masks(template: Template, size: int, *, scale: float = 1.0, feather: float = 0.1,
                  device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(known, paste): the binary keep-mask (1 = keep, 0 = regenerate) and the paste-back
    mask (1 inside the ellipse, fading to 0 at ``1 + 2 x feather`` of its radius), (1, 1, s, s)."""
    cx, cy, a, b = inner_face_ellipse(template, size, scale=scale)
    ys = torch.arange(size, device=device, dtype=torch.float32)[:, None]
    xs = torch.arange(size, device=device, dtype=torch.float32)[None, :]
    r = torch.sqrt(((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2)
    known = (r > 1).float()
    if feather > 0:
        m = ((1 + 2 * feather - r) / (2 * feather)).clamp(0, 1)
        paste = m * m * (3 - 2 * m)
    else:
        paste = 1 - known
    return known[None, None], paste[None, None]


def resolve_score_model(spec: str | os.PathLike, weights: str | os.PathLike | None = None, device="cpu"):
    """A :class:`~facepriv.models.diffusion.ScoreModel` from a registry name, a local diffusers
    folder, or a Hugging Face hub id (``org/name``; the offline switch is respected), as
    :func:`facepriv.models.resolve_pretrained` classifies it."""
    from ..models import create_model, resolve_pretrained

    if weights is not None:
        return create_model(str(spec), device=device, weights=weights)
    return _load_score(resolve_pretrained(spec, task="score", what="--score-model"), device)


def _load_score(resolved, device):
    from ..models import create_model
    from ..models.diffusion import load_score_model

    if resolved.kind == "registry":
        return create_model(resolved.name, device=device)
    return load_score_model(resolved.local_path(), device=device)


# ---------------------------------------------------------------------- inpainting pipelines
def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    return data if isinstance(data, dict) else None


def inpaint_pipeline_class(root: str | os.PathLike) -> str | None:
    """The pipeline class named by a diffusers folder's ``model_index.json`` when it is an
    inpainting pipeline (the class name says so, or its UNet takes 9 input channels: latent,
    mask, masked-image latent), else None."""
    root = Path(root)
    index = _read_json(root / "model_index.json")
    if index is None:
        return None
    cls = str(index.get("_class_name") or "")
    if "inpaint" in cls.lower():
        return cls
    unet = _read_json(root / "unet" / "config.json")
    if unet is not None and unet.get("in_channels") == 9:
        return cls or "StableDiffusionInpaintPipeline"
    return None


def _refuse_other_pipeline(root: Path, name: str) -> None:
    """A diffusers pipeline that is neither an inpainting one nor a pixel-space DDPM: say so."""
    index = _read_json(root / "model_index.json")
    if index is None:
        return
    unet = _read_json(root / "unet" / "config.json") or _read_json(root / "config.json")
    unet_cls = (unet or {}).get("_class_name")
    if unet_cls is not None and unet_cls != "UNet2DModel":
        raise ConfigError(
            f"--score-model {name}: a {index.get('_class_name', 'diffusers pipeline')} ({unet_cls}), which is neither an "
            "inpainting pipeline (e.g. StableDiffusionInpaintPipeline) nor a pixel-space DDPM (UNet2DModel)")


def load_inpaint_pipeline(ref: str, device="cpu", *, from_hub: bool = False):
    """A diffusers inpainting pipeline (``AutoPipelineForInpainting``) from a folder or, with
    ``from_hub``, a hub id (the offline switch and ``HF_HUB_CACHE`` are respected). Weights are
    read from safetensors only, never unpickled."""
    try:
        import transformers  # noqa: F401 - the pipelines' text encoders and tokenizers
        from diffusers import AutoPipelineForInpainting
    except ImportError as exc:
        raise ConfigError(f"--score-model {ref}: an inpainting pipeline needs the `transformers` package ({exc})") from None
    kwargs: dict = {"use_safetensors": True}
    if from_hub:
        from ..models import hub

        kwargs["local_files_only"] = hub.is_offline()
        if os.environ.get("HF_HUB_CACHE"):
            kwargs["cache_dir"] = os.environ["HF_HUB_CACHE"]
    try:
        pipe = AutoPipelineForInpainting.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--score-model {ref}: cannot load the inpainting pipeline: {exc}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _pipeline_resolution(pipe) -> int:
    """The pipeline's default output size: its sample size (latent) x the VAE's scale factor."""
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    size = getattr(pipe, "default_sample_size", None)
    if size is None:
        net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        size = getattr(getattr(net, "config", None), "sample_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) * scale if size else 512


class RePaintGenerator:
    """RePaint with a pixel-space DDPM :class:`~facepriv.models.diffusion.ScoreModel`."""

    kind = "repaint"

    def __init__(self, score):
        from diffusers import RePaintPipeline, RePaintScheduler

        self.score = score
        scheduler = RePaintScheduler.from_config(dict(score.scheduler.config))
        self.pipe = RePaintPipeline(unet=score.unet, scheduler=scheduler)
        self.pipe.set_progress_bar_config(disable=True)
        self.template = score.template
        self.resolution = score.resolution

    def run(self, crops: torch.Tensor, known: torch.Tensor, generator: torch.Generator, m: DiffusionInpaint) -> np.ndarray:
        with warnings.catch_warnings():  # diffusers deprecates RePaint's own preprocessing
            warnings.simplefilter("ignore", FutureWarning)
            return self.pipe(image=crops * 2 - 1, mask_image=known, num_inference_steps=m.steps, eta=m.eta,
                             jump_length=m.jump_length, jump_n_sample=m.jump_n_sample, generator=generator,
                             output_type="np").images

    def describe(self) -> dict:
        return {"backend": self.kind}


class PipelineGenerator:
    """A diffusers inpainting pipeline (Stable Diffusion inpainting and the like)."""

    kind = "inpaint-pipeline"

    def __init__(self, pipe, pipeline_class: str):
        self.pipe = pipe
        self.pipeline_class = pipeline_class
        self.template = PIPELINE_TEMPLATE
        self.resolution = _pipeline_resolution(pipe)
        self.params = set(inspect.signature(pipe.__call__).parameters)

    def run(self, crops: torch.Tensor, known: torch.Tensor, generator: torch.Generator, m: DiffusionInpaint) -> np.ndarray:
        n, r = crops.shape[0], self.resolution
        kwargs = {"prompt": [m.prompt] * n, "image": crops, "mask_image": 1 - known, "height": r, "width": r,
                  "num_inference_steps": m.steps, "guidance_scale": m.guidance_scale, "strength": 1.0,
                  "generator": generator, "output_type": "np"}
        if m.negative_prompt:
            kwargs["negative_prompt"] = [m.negative_prompt] * n
        missing = {"prompt", "image", "mask_image"} - self.params
        if missing:
            raise ConfigError(f"{self.pipeline_class}: no {', '.join(sorted(missing))} argument; not an inpainting pipeline")
        return self.pipe(**{k: v for k, v in kwargs.items() if k in self.params}).images

    def describe(self) -> dict:
        return {"backend": self.kind, "pipeline": self.pipeline_class}


#: the files that tell a hub repository's pipeline class (fetched before the weights)
PIPELINE_CONFIGS = ("model_index.json", "config.json", "unet/config.json")


def resolve_generator(spec: str | os.PathLike, weights: str | os.PathLike | None = None, device="cpu"):
    """The generator ``spec`` names: a :class:`PipelineGenerator` for a diffusers inpainting
    pipeline (folder or hub id), else a :class:`RePaintGenerator` (see :func:`resolve_score_model`).
    A hub id that is not a registered model is first fetched as its configs only
    (:data:`PIPELINE_CONFIGS`), to tell an inpainting pipeline from a DDPM."""
    from ..models import resolve_pretrained

    name = str(spec)
    if weights is not None:
        return RePaintGenerator(resolve_score_model(name, weights, device=device))
    resolved = resolve_pretrained(name, task="score", what="--score-model")
    root = resolved.local_path(allow_patterns=PIPELINE_CONFIGS) if resolved.kind != "registry" else None
    if root is not None:
        cls = inpaint_pipeline_class(root)
        if cls is not None:
            ref = str(resolved.path) if resolved.kind == "local" else name
            return PipelineGenerator(load_inpaint_pipeline(ref, device, from_hub=resolved.kind == "hub"), cls)
        _refuse_other_pipeline(root, name)
    return RePaintGenerator(_load_score(resolved, device))


@register_method(aliases=("generative", "diffusion", "repaint"))
class DiffusionInpaint(DeidMethod):
    """Regenerate the inner face (RePaint or an inpainting pipeline), guarded by identity and
    expression models, with a classical fallback for faces that keep their identity."""

    name = "inpaint"
    default_feather = 0.1
    #: the regenerated area is always the inner-face ellipse of the aligned crop (``strength``
    #: scales it), so head and box are not applied to the generation (the classical fallback
    #: of the identity guard does cover the requested region)
    regions = ("face",)

    def __init__(self, *, score_model: str = "ddpm-celebahq-256", weights: str | os.PathLike | None = None,
                 steps: int = 100, jump_length: int = 10, jump_n_sample: int = 3, eta: float = 1.0,
                 prompt: str = DEFAULT_PROMPT, negative_prompt: str | None = None, guidance_scale: float = 7.5,
                 guard_model: str | None = "dlib-resnet", guard_threshold: float | None = None, guard_tries: int = 3,
                 guard_fallback: str = "blur", fallback_strength: float = 2.0,
                 expression_guard: bool = True, seed: int = 0, batch_size: int = 8, **kw):
        super().__init__(**kw)
        if steps < 1 or jump_length < 1 or jump_n_sample < 1:
            raise ConfigError("inpaint: steps, jump_length and jump_n_sample must be >= 1")
        if guard_tries < 1:
            raise ConfigError("inpaint: guard_tries must be >= 1")
        fallback = str(guard_fallback).strip().lower()
        if fallback not in GUARD_FALLBACKS:
            raise ConfigError(f"inpaint: guard_fallback must be one of {', '.join(GUARD_FALLBACKS)}, not {guard_fallback!r}")
        if fallback_strength <= 0:
            raise ConfigError("inpaint: fallback_strength must be > 0")
        self.score_name, self.weights = score_model, weights
        self.steps, self.jump_length, self.jump_n_sample, self.eta = int(steps), int(jump_length), int(jump_n_sample), float(eta)
        self.prompt, self.negative_prompt, self.guidance_scale = str(prompt), negative_prompt or None, float(guidance_scale)
        self.guard_name = guard_model if guard_model and str(guard_model).lower() != "none" else None
        self.guard_threshold = guard_threshold
        self.guard_tries = int(guard_tries)
        self.guard_fallback, self.fallback_strength = fallback, float(fallback_strength)
        self.fallback_methods: list[DeidMethod] = []
        if fallback != "error":  # the classical method, then the mask when it does not defeat the guard
            self.fallback_methods.append(create_method(fallback, strength=self.fallback_strength, region=self.region))
            if fallback != "mask":
                self.fallback_methods.append(create_method("mask", region=self.region))
        self.use_expression = bool(expression_guard)
        self.seed, self.batch_size = int(seed), max(1, int(batch_size))
        self.backend = self.score = self.pipe = self.guard = self.expr = None

    # ------------------------------------------------------------------ setup
    def setup(self, device="cpu") -> DiffusionInpaint:
        super().setup(device)
        from ..models import create_model, get_spec

        if self.backend is None:
            self.backend = resolve_generator(self.score_name, self.weights, device=self.device)
            self.pipe = self.backend.pipe
            self.score = getattr(self.backend, "score", None)
        for fb in self.fallback_methods:
            fb.setup(self.device)
        if self.guard_name and self.guard is None:
            spec = get_spec(self.guard_name)
            if spec.task != "recognition":
                raise ConfigError(f"--guard-model {self.guard_name}: a {spec.task} model, not face recognition")
            if self.guard_threshold is None:
                th = spec.thresholds
                self.guard_threshold = th.get("default", th.get("1e-3"))
                if self.guard_threshold is None:
                    raise ConfigError(f"--guard-model {self.guard_name} has no calibrated threshold; give --guard-threshold")
            self.guard = create_model(self.guard_name, device=self.device)
        if self.use_expression and self.expr is None:
            self.expr = create_model("expr-fer7", device=self.device)
        return self

    @property
    def template(self) -> Template:
        return get_template(self.backend.template)

    @property
    def resolution(self) -> int:
        return self.backend.resolution

    # ------------------------------------------------------------------ pieces
    def masks(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return ellipse_masks(self.template, self.resolution, scale=self.strength, feather=self.feather, device=device)

    @torch.no_grad()
    def generate(self, crops: torch.Tensor, known: torch.Tensor, seed: int) -> torch.Tensor:
        """Regenerate ``crops`` (n, 3, r, r) in [0, 1] where ``known`` is 0; returns (n, 3, r, r)
        equal to ``crops`` where ``known`` is 1."""
        outs = []
        for start in range(0, crops.shape[0], self.batch_size):
            c = crops[start:start + self.batch_size].to(self.device)
            gen = torch.Generator(device=self.device).manual_seed(seed + start)
            res = self.backend.run(c, known.expand(c.shape[0], -1, -1, -1).to(self.device), gen, self)
            outs.append(torch.from_numpy(np.asarray(res, dtype=np.float32)).permute(0, 3, 1, 2).to(crops))
        gen_crops = torch.cat(outs, 0)
        return known * crops + (1 - known) * gen_crops

    @torch.no_grad()
    def identity_similarity(self, original: torch.Tensor, candidate: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Guard model's similarity (higher = same) between the faces at ``landmarks`` of two images."""
        from ..models.recognition import embed_faces, similarity

        a = embed_faces(self.guard, original, landmarks)
        b = embed_faces(self.guard, candidate, landmarks)
        return similarity(a, b, self.guard.metric).float().cpu()

    @torch.no_grad()
    def expression_probs(self, image: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        al = align_faces(image, landmarks, self.expr.template, size=tuple(self.expr.input_size))
        return self.expr.probs(al.crops).float().cpu()

    # ------------------------------------------------------------------ apply
    def apply(self, image: torch.Tensor, faces: list[Face]) -> torch.Tensor:
        self.last_info = {}
        if not faces:
            return image.clone()
        if self.backend is None:
            self.setup(image.device)
        n = len(faces)
        r = self.resolution
        lm = landmarks_tensor(faces, device=image.device)
        aligned = align_faces(image, lm, self.template, size=(r, r))
        crops = aligned.crops.float()
        known, paste = self.masks(device=image.device)
        paste = paste.expand(n, 1, r, r).clone()
        expr0 = self.expression_probs(image, lm) if self.expr is not None else None
        label0 = expr0.argmax(1) if expr0 is not None else None

        best = crops.clone()
        best_key = [(-1, -1.0, -float("inf"))] * n  # (guards passed, expression prob, -similarity)
        info = [{"tries": 0, "similarity": None, "identity_ok": None, "expression_ok": None, "fallback": None}
                for _ in range(n)]
        pending = list(range(n))
        for attempt in range(self.guard_tries):
            if not pending:
                break
            idx = torch.tensor(pending, device=crops.device)
            cand = self.generate(crops[idx], known, seed=self.seed + 7919 * attempt)
            trial = best.clone()
            trial[idx] = cand
            test = paste_back(image, trial, aligned.matrices, mask=paste)
            sims = self.identity_similarity(image, test, lm) if self.guard is not None else None
            probs = self.expression_probs(test, lm) if expr0 is not None else None
            still = []
            for j, i in enumerate(pending):
                info[i]["tries"] = attempt + 1
                sim = float(sims[i]) if sims is not None else None
                id_ok = sim is None or sim < self.guard_threshold
                ex_ok = probs is None or int(probs[i].argmax()) == int(label0[i])
                ex_p = float(probs[i, label0[i]]) if probs is not None else 0.0
                key = (int(id_ok) * 2 + int(ex_ok) if id_ok else 0, ex_p if id_ok else 0.0,
                       -sim if sim is not None else 0.0)
                if key > best_key[i]:
                    best_key[i] = key
                    best[i] = cand[j]
                    info[i].update(similarity=None if sim is None else round(sim, 4), identity_ok=id_ok,
                                   expression_ok=None if probs is None else ex_ok)
                if not (id_ok and ex_ok):
                    still.append(i)
            pending = still
        failed = [i for i in range(n) if info[i]["identity_ok"] is False]
        if failed and self.guard_fallback == "error":
            worst = ", ".join(f"face {i}: {info[i]['similarity']}" for i in failed)
            raise IdentityGuardError(
                f"inpaint: {len(failed)} face(s) still match their owner after {self.guard_tries} generation "
                f"tries ({self.guard_name} similarity {worst}; threshold {self.guard_threshold}); "
                "guard_fallback='error', so no output is written")
        paste[failed] = 0  # a face that still matches is never published: it gets the fallback instead
        out = paste_back(image, best, aligned.matrices, mask=paste)
        if failed:
            out = self._fall_back(image, out, faces, lm, failed, info)
        self.last_info = {"score_model": str(self.score_name), **self.backend.describe(), "guard": self.guard_name,
                          "threshold": self.guard_threshold, "guard_fallback": self.guard_fallback, "faces": info}
        return out

    def _fall_back(self, image: torch.Tensor, out: torch.Tensor, faces: list[Face], lm: torch.Tensor,
                   failed: list[int], info: list[dict]) -> torch.Tensor:
        """Treat the ``failed`` faces (left as in the input) with the fallback methods in turn,
        each face until the identity guard no longer matches it or the mask has been applied."""
        todo = list(failed)
        for i in todo:
            info[i]["fallback"] = []
            info[i]["fallback_reason"] = (
                f"identity guard: no try below the threshold; best of {info[i]['tries']} tries has "
                f"{self.guard_name} similarity {info[i]['similarity']} >= {self.guard_threshold}")
        for method in self.fallback_methods:
            if not todo:
                break
            out = method.apply(out, [faces[i] for i in todo])
            sims = self.identity_similarity(image, out, lm)
            still = []
            for i in todo:
                sim = float(sims[i])
                info[i]["fallback"].append(method.name)
                info[i].update(fallback_similarity=round(sim, 4), fallback_identity_ok=sim < self.guard_threshold)
                if sim >= self.guard_threshold:
                    still.append(i)
            todo = still
        return out

    def describe(self) -> dict:
        d = {**super().describe(), "score_model": str(self.score_name), "steps": self.steps,
             "jump_length": self.jump_length, "jump_n_sample": self.jump_n_sample, "eta": self.eta,
             "guard_model": self.guard_name, "guard_threshold": self.guard_threshold,
             "guard_tries": self.guard_tries, "guard_fallback": self.guard_fallback,
             "fallback_strength": self.fallback_strength, "expression_guard": self.use_expression, "seed": self.seed}
        if self.backend is not None:
            d.update(self.backend.describe())
        if self.backend is None or self.backend.kind != "repaint":
            d.update(prompt=self.prompt, negative_prompt=self.negative_prompt, guidance_scale=self.guidance_scale)
        return d
