"""Detect once, align per model, embed in batches: the audit's embedding pipeline.

:class:`FaceEmbeddingCache` reads every image once (in a small thread pool that overlaps
decoding, detection and alignment with the model forward passes), detects its faces with the
registry detector, aligns every face to each model's template at the model's input size, and
embeds the crops in batches of ``batch_size`` per model. Results are cached per image, so an
image used several times (an original that is also a reference, a gallery photo) costs one
pass.

With ``aligned=True`` inputs are pre-aligned crops: detection is skipped and each crop is
taken to be aligned to ``aligned_template`` (default ``arcface-112``, scaled to the crop's
size); it is re-aligned to every model's template through the template points.

Mixed precision (``amp``): on CUDA, batches run under autocast only where it is *safe*: the
first batch of every model is also run in float32, and the autocast dtypes are tried in order
(fp16 first: for inference it keeps more mantissa bits than bf16, and overflow shows up as
non-finite values; then bf16 where the GPU supports it). The first dtype whose embeddings are
all finite and within cosine 0.9999 of the float32 ones is kept for that model; when none is,
the model runs in float32. The decision is re-checked every ``amp_recheck`` batches (that
batch is also run in float32); a failed re-check turns autocast off for the model for the rest
of the run. :meth:`FaceEmbeddingCache.amp_report` says what was decided and why.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.align import align_faces, get_template, invert_affine, similarity_transform, transform_points
from ..core.errors import FaceprivError
from ..core.faces import Face
from ..core.io import load_image
from ..core.progress import make_progress

AMP_MIN_COSINE = 0.9999
AMP_RECHECK_EVERY = 50  # batches between two float32 re-checks of a model kept in autocast


def default_amp_dtypes(device_type: str, bf16_supported: bool = True) -> tuple[torch.dtype, ...]:
    """Autocast dtypes to try, in order, on ``device_type``: fp16 then bf16 on CUDA (bf16 only
    where ``bf16_supported``); bf16 elsewhere (CPU autocast)."""
    if device_type == "cuda":
        return (torch.float16, torch.bfloat16) if bf16_supported else (torch.float16,)
    return (torch.bfloat16,)


def _amp_check(emb_amp: torch.Tensor, emb: torch.Tensor) -> tuple[bool, str]:
    """(safe?, what was measured) for autocast embeddings against the float32 ones."""
    if not bool(torch.isfinite(emb_amp).all()):
        return False, "non-finite values"
    cos = float(F.cosine_similarity(emb_amp, emb, dim=-1).min())
    if math.isnan(cos):  # float32 itself non-finite: nothing to compare against
        return False, "min cosine nan"
    return cos >= AMP_MIN_COSINE, f"min cosine {cos:.6f}"


def model_template(model: nn.Module) -> str:
    spec = getattr(model, "spec", None)
    tpl = getattr(spec, "template", None) or getattr(model, "template", None)
    if tpl is None:
        raise ValueError(f"{type(model).__name__} has no alignment template")
    return tpl


def model_input_size(model: nn.Module) -> tuple[int, int]:
    spec = getattr(model, "spec", None)
    size = getattr(spec, "input_size", None) or getattr(model, "input_size", None)
    if size is None:
        return get_template(model_template(model)).size
    return tuple(int(s) for s in size)  # type: ignore[return-value]


def model_metric(model: nn.Module) -> str:
    spec = getattr(model, "spec", None)
    return getattr(spec, "metric", None) or getattr(model, "metric", None) or "cosine"


def source_region(landmarks: np.ndarray, groups: Iterable[tuple[str, tuple[int, int]]], size: tuple[int, int]
                  ) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1) that :func:`~facepriv.core.align.align_faces` reads to warp
    every face to every (template, size) in ``groups`` (same rule as its own source crop, plus
    2 px), so aligning from the box gives the same crops as aligning from the whole photo."""
    w_img, h_img = size
    lm = torch.from_numpy(np.asarray(landmarks, dtype=np.float32).reshape(-1, 5, 2))
    x0, y0, x1, y1 = w_img, h_img, 0, 0
    for tpl_name, (h, w) in groups:
        tpl = get_template(tpl_name)
        dst = tpl.tensor() * torch.tensor([w / tpl.size[1], h / tpl.size[0]])
        mats = similarity_transform(lm, dst)
        inv = invert_affine(mats)
        corners = torch.tensor([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], dtype=torch.float32)
        pts = transform_points(inv, corners[None].expand(len(lm), -1, -1))
        margin = 4.0 / torch.linalg.det(mats[:, :, :2]).abs().sqrt()
        x0 = min(x0, int(math.floor(float((pts[..., 0].amin(1) - margin).min()))) - 2)
        y0 = min(y0, int(math.floor(float((pts[..., 1].amin(1) - margin).min()))) - 2)
        x1 = max(x1, int(math.ceil(float((pts[..., 0].amax(1) + margin).max()))) + 3)
        y1 = max(y1, int(math.ceil(float((pts[..., 1].amax(1) + margin).max()))) + 3)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(w_img, max(x1, x0 + 2)), min(h_img, max(y1, y0 + 2))
    if x1 - x0 < 2 or y1 - y0 < 2:  # faces entirely outside the photo: keep the photo
        return 0, 0, w_img, h_img
    return x0, y0, x1, y1


@dataclass
class ImageFaces:
    """Faces of one image and their embeddings (``embeddings[model]``: (n_faces, D), CPU float32).

    ``extra`` holds embeddings of the landmark sets passed as ``extra`` to
    :meth:`FaceEmbeddingCache.process` (e.g. a protected image embedded at its original's
    landmarks).
    """

    path: Path
    size: tuple[int, int] = (0, 0)  # (width, height)
    faces: list[Face] = field(default_factory=list)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    error: str | None = None

    @property
    def primary(self) -> int | None:
        """Index of the largest face (the one an image-level identity label refers to)."""
        return 0 if self.faces else None


@dataclass
class _Prepared:
    key: tuple
    path: Path
    size: tuple[int, int] = (0, 0)
    faces: list[Face] = field(default_factory=list)
    n_extra: int = 0
    crops: dict[tuple, torch.Tensor] = field(default_factory=dict)
    error: str | None = None
    seconds: dict = field(default_factory=dict)


class FaceEmbeddingCache:
    """Batched, cached face embeddings for several models; see the module docstring."""

    def __init__(self, models: Mapping[str, nn.Module], *, detector=None, device: str | torch.device = "cpu",
                 batch_size: int = 32, aligned: bool = False, aligned_template: str = "arcface-112",
                 amp: bool | None = None, workers: int = 2, min_face_size: float = 20.0,
                 max_pixels: int | None = None,
                 amp_dtype: torch.dtype | Sequence[torch.dtype] | None = None,
                 amp_recheck: int = AMP_RECHECK_EVERY):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not aligned and detector is None:
            raise ValueError("a face detector is needed unless the inputs are pre-aligned crops")
        self.models = dict(models)
        self.detector = detector
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.aligned = aligned
        self.aligned_template = get_template(aligned_template)
        self.workers = max(1, int(workers))
        self.min_face_size = float(min_face_size)
        self.max_pixels = max_pixels
        self.results: dict[tuple, ImageFaces] = {}
        # Models sharing a template and input size share crops.
        self.groups = {name: (model_template(m), model_input_size(m)) for name, m in self.models.items()}
        want_amp = (self.device.type == "cuda") if amp is None else bool(amp)
        # autocast dtypes tried in order on each model's first batch (``amp_dtype`` overrides:
        # one dtype, or several in the order to try them)
        if amp_dtype is None:
            bf16 = self.device.type != "cuda" or (want_amp and torch.cuda.is_bf16_supported())
            self.amp_dtypes = default_amp_dtypes(self.device.type, bf16)
        elif isinstance(amp_dtype, torch.dtype):
            self.amp_dtypes = (amp_dtype,)
        else:
            self.amp_dtypes = tuple(amp_dtype)
        if not self.amp_dtypes:
            raise ValueError("amp_dtype: give at least one dtype")
        if amp_recheck < 0:
            raise ValueError("amp_recheck must be 0 (never) or a number of batches")
        self.amp_recheck = int(amp_recheck)
        self.amp_chosen: dict[str, torch.dtype] = {}  # model -> the autocast dtype it runs under
        self._batches: dict[str, int] = {n: 0 for n in self.models}  # forward batches per model
        # model -> None (not checked yet) | True | False; reasons for the report
        self.amp_state: dict[str, bool | None] = {
            n: (None if want_amp and isinstance(m, nn.Module) and getattr(m, "differentiable", True) else False)
            for n, m in self.models.items()}
        self.amp_notes: dict[str, str] = {
            n: ("off" if not want_amp else "off (not a torch model)") for n, s in self.amp_state.items() if s is False}
        self.timings = {"load_s": 0.0, "detect_s": 0.0, "align_s": 0.0, "forward_s": 0.0, "images": 0, "faces": 0}

    # ------------------------------------------------------------------ per-image work
    def _detect(self, rgb: np.ndarray) -> list[Face]:
        h, w = rgb.shape[:2]
        if self.aligned:
            tpl = self.aligned_template
            sx, sy = w / tpl.size[1], h / tpl.size[0]
            pts = np.asarray(tpl.points, dtype=np.float32) * np.array([sx, sy], dtype=np.float32)
            return [Face(np.array([0, 0, w - 1, h - 1], dtype=np.float32), pts, 1.0, {"aligned": True})]
        faces = [f for f in self.detector.detect(rgb) if f.size >= self.min_face_size]
        return sorted(faces, key=lambda f: f.width * f.height, reverse=True)

    def _prepare(self, key: tuple, path: Path, extra: np.ndarray | None, need: set[tuple]) -> _Prepared:
        out = _Prepared(key, path)
        try:
            t0 = time.perf_counter()
            img = load_image(path, max_pixels=self.max_pixels)
            t1 = time.perf_counter()
            out.size = img.size
            out.faces = self._detect(img.rgb)
            t2 = time.perf_counter()
            lms = [f.landmarks for f in out.faces]
            if extra is not None and len(extra):
                out.n_extra = len(extra)
                lms += list(np.asarray(extra, dtype=np.float32).reshape(-1, 5, 2))
            if lms:
                lm = np.stack(lms).astype(np.float32)
                # Only the pixels the warps read are converted to float (big photos, small faces).
                x0, y0, x1, y1 = source_region(lm, need, img.size)
                pix = img.high if img.high is not None else img.rgb
                region = np.ascontiguousarray(pix[y0:y1, x0:x1])
                x = torch.from_numpy(region).permute(2, 0, 1).float().div_(65535.0 if img.high is not None else 255.0)
                lm_t = torch.from_numpy(lm - np.array([x0, y0], dtype=np.float32))
                for tpl, size in need:
                    out.crops[(tpl, size)] = align_faces(x, lm_t, tpl, size=size).crops
            out.seconds = {"load_s": t1 - t0, "detect_s": t2 - t1, "align_s": time.perf_counter() - t2}
        except FaceprivError as exc:
            out.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad file never stops the audit
            out.error = f"{type(exc).__name__}: {exc}"
        return out

    # ------------------------------------------------------------------ batched forward
    def _forward(self, name: str, crops: torch.Tensor) -> torch.Tensor:
        model = self.models[name]
        x = crops.to(self.device, non_blocking=True)
        t0 = time.perf_counter()
        self._batches[name] += 1
        with torch.no_grad():
            state = self.amp_state[name]
            if state is False:
                emb = model(x).float()
            elif state is None:
                emb = self._choose_amp(name, model, x)
            else:
                dtype = self.amp_chosen[name]
                with torch.autocast(self.device.type, dtype=dtype):
                    emb = model(x).float()
                n = self._batches[name]
                if self.amp_recheck and n % self.amp_recheck == 0:  # periodic re-check
                    emb32 = model(x).float()
                    ok, what = _amp_check(emb, emb32)
                    if not ok:  # autocast off for the rest of the run; this batch uses float32
                        self.amp_state[name] = False
                        self.amp_notes[name] = (f"off from batch {n}: the re-check found {dtype} {what} "
                                                f"(batches 1-{n - 1} ran under autocast; first check: "
                                                f"{self.amp_notes[name]})")
                        emb = emb32
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings["forward_s"] += time.perf_counter() - t0
        return emb.detach().float().cpu()

    def _choose_amp(self, name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """First batch of ``name``: float32, then each autocast dtype in turn until one is safe.
        Returns the embeddings to use (the chosen dtype's, or float32's)."""
        emb = model(x).float()
        tried = []
        for dtype in self.amp_dtypes:
            try:
                with torch.autocast(self.device.type, dtype=dtype):
                    emb_amp = model(x).float()
            except RuntimeError as exc:  # e.g. an op without a kernel for this dtype
                tried.append(f"{dtype} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                continue
            ok, what = _amp_check(emb_amp, emb)
            if ok:
                self.amp_state[name] = True
                self.amp_chosen[name] = dtype
                refused = f"; refused: {', '.join(tried)}" if tried else ""
                self.amp_notes[name] = f"on ({dtype}, {what.replace('min cosine', 'min cosine to float32')}{refused})"
                return emb_amp
            tried.append(f"{dtype} {what}" if len(self.amp_dtypes) > 1 else what)
        self.amp_state[name] = False
        self.amp_notes[name] = f"off (autocast changed embeddings: {'; '.join(tried)})"
        return emb

    def process(self, paths: Iterable[str | Path], *, extra: Mapping[Path, np.ndarray] | None = None,
                progress: bool = True, description: str = "embedding faces") -> dict[Path, ImageFaces]:
        """Detect, align and embed every face of ``paths`` (cached); returns path -> :class:`ImageFaces`.

        ``extra``: per path, additional (k, 5, 2) landmark sets to embed in that image (results
        in :attr:`ImageFaces.extra`).
        """
        extra = {Path(k).resolve(): v for k, v in (extra or {}).items()}
        wanted: list[tuple[tuple, Path, np.ndarray | None]] = []
        seen = set()
        for p in paths:
            p = Path(p).resolve()
            ex = extra.get(p)
            key = (p, None if ex is None else np.asarray(ex, dtype=np.float32).round(3).tobytes())
            if key in seen:
                continue
            seen.add(key)
            wanted.append((key, p, ex))
        todo = [w for w in wanted if w[0] not in self.results]
        need = set(self.groups.values())
        buffers: dict[str, list[tuple[tuple, int, torch.Tensor]]] = {n: [] for n in self.models}
        pending: dict[tuple, dict] = {}

        def flush(name: str, force: bool = False):
            buf = buffers[name]
            while buf and (force or sum(len(c) for _, _, c in buf) >= self.batch_size):
                rows, take = [], 0
                while buf and take < self.batch_size:
                    key, start, crops = buf[0]
                    k = min(len(crops), self.batch_size - take)
                    rows.append((key, start, crops[:k]))
                    take += k
                    if k == len(crops):
                        buf.pop(0)
                    else:
                        buf[0] = (key, start + k, crops[k:])
                emb = self._forward(name, torch.cat([c for _, _, c in rows]))
                emb = emb.reshape(len(emb), -1)
                i = 0
                for key, start, crops in rows:
                    slot = pending[key]["emb"][name]
                    if slot is None:  # allocated at the first batch that holds this image's faces
                        slot = pending[key]["emb"][name] = torch.zeros(pending[key]["n"], emb.shape[1])
                    slot[start: start + len(crops)] = emb[i: i + len(crops)]
                    pending[key]["left"] -= 1 if start + len(crops) == pending[key]["n"] else 0
                    i += len(crops)
            finish_ready()

        def finish_ready():
            for key in [k for k, v in pending.items() if v["left"] == 0]:
                v = pending.pop(key)
                res = v["res"]
                n_faces = len(res.faces)
                for name, full in v["emb"].items():
                    res.embeddings[name] = full[:n_faces]
                    res.extra[name] = full[n_faces:]
                self.results[key] = res

        # Images read ahead of the forward passes: at least a batch's worth, so the readers keep
        # decoding and aligning the next batch while a forward runs (a shallower queue leaves
        # them idle for most of every forward). Only the aligned crops are kept per image.
        ahead = self.workers * 2 + min(self.batch_size, 64)
        with make_progress(enabled=progress) as bar, ThreadPoolExecutor(self.workers) as pool:
            task = bar.add_task(description, total=len(todo))
            queue: deque = deque()
            it = iter(todo)
            for _ in range(ahead):
                nxt = next(it, None)
                if nxt is not None:
                    queue.append(pool.submit(self._prepare, nxt[0], nxt[1], nxt[2], need))
            while queue:
                prep: _Prepared = queue.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    queue.append(pool.submit(self._prepare, nxt[0], nxt[1], nxt[2], need))
                for k, v in prep.seconds.items():
                    self.timings[k] += v
                self.timings["images"] += 1
                res = ImageFaces(prep.path, prep.size, prep.faces, error=prep.error)
                n = len(prep.faces) + prep.n_extra
                self.timings["faces"] += len(prep.faces)
                if prep.error is not None or n == 0:
                    for name in self.models:
                        res.embeddings[name] = torch.zeros(0, 0)
                        res.extra[name] = torch.zeros(0, 0)
                    self.results[prep.key] = res
                else:
                    # embedding slots are allocated by the first forward that fills them (no
                    # probe forward pass just to learn a model's embedding size)
                    pending[prep.key] = {"res": res, "n": n, "left": len(self.models),
                                         "emb": {name: None for name in self.models}}
                    for name, group in self.groups.items():
                        buffers[name].append((prep.key, 0, prep.crops[group]))
                        flush(name)
                bar.advance(task)
            for name in self.models:
                flush(name, force=True)
        finish_ready()
        return {key[0]: self.results[key] for key, _, _ in wanted}

    def get(self, path: str | Path, extra: np.ndarray | None = None) -> ImageFaces:
        p = Path(path).resolve()
        key = (p, None if extra is None else np.asarray(extra, dtype=np.float32).round(3).tobytes())
        return self.results[key]

    def amp_report(self) -> dict[str, str]:
        return {n: self.amp_notes.get(n, "pending") for n in self.models}


def embed_aligned(model: nn.Module, crops: torch.Tensor, *, batch_size: int = 32,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """Embed already-aligned crops (N, 3, h, w) in batches (the raw-forward reference)."""
    device = torch.device(device)
    outs = []
    with torch.no_grad():
        for i in range(0, len(crops), batch_size):
            outs.append(model(crops[i: i + batch_size].to(device)).float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0, 0)
