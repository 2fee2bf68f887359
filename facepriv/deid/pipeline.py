"""Run de-identification methods over photos, videos and folders.

:func:`run_deid` is what ``facepriv deid`` calls: it collects the inputs (photos and, among
them, video files, routed to :mod:`facepriv.deid.video`), builds the methods once (models
loaded, k-Same pool built), and runs them through the batch runner, so outputs mirror the
input tree, every file gets a manifest line (with what each method decided: the pool faces a
k-Same face averages, the tries of the generative guard, the tracks of a video) and
``--resume`` works.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core.batch import BatchSummary, check_outputs, InputItem, ItemResult, collect_inputs, run_batch
from ..core.distributed import distributed_context
from ..core.errors import ConfigError, FaceprivError
from ..core.faces import CachedDetector, Face, FaceDetector, FacePolicy  # CachedDetector: importable here, as before
from ..core.io import IMAGE_SUFFIXES
from ..core.photo import SaveOptions, process_photo
from ..core.progress import make_progress
from .base import DeidMethod, canonical_name, create_method
from .video import VIDEO_SUFFIXES, VideoOptions, deid_video, is_video


@dataclass
class DeidConfig:
    methods: list[str] = field(default_factory=lambda: ["blur"])
    strength: float = 1.0
    region: str = "face"
    feather: float | None = None
    detector: str = "yunet"  # the best recall (100 %) and 5x MTCNN's speed on our benchmark, see docs/benchmarks.md
    options: dict = field(default_factory=dict)  # per-method extra keyword arguments
    k_pool: str | None = None  # k-Same face pool: a folder, a saved pool file, or None = the inputs
    video: VideoOptions = field(default_factory=VideoOptions)


def build_methods(cfg: DeidConfig, device: str | torch.device | None = None) -> list[DeidMethod]:
    """Create the configured methods (in order); with ``device`` also load their models."""
    if not cfg.methods:
        raise ConfigError("no de-identification method given")
    methods = []
    for m in cfg.methods:
        name = canonical_name(m)
        opts = {**cfg.options.get(m, {}), **cfg.options.get(name, {})}
        if name.startswith("k-same") and cfg.k_pool and "pool" not in opts:
            opts["pool"] = cfg.k_pool
        methods.append(create_method(name, strength=cfg.strength, region=cfg.region, feather=cfg.feather, **opts))
    if device is not None:
        for method in methods:
            method.setup(device)
    return methods


def region_warnings(methods: list[DeidMethod], region: str) -> list[str]:
    """Warnings for a ``region`` some methods do not apply; a ConfigError when none of them
    does (the eye bar alone with ``--region head``). The default region ``face`` is silent."""
    ignored = [m.name for m in methods if not m.honours_region]
    if region == "face" or not ignored:
        return []
    if len(ignored) == len(methods):
        raise ConfigError(f"--region {region} does not apply to {', '.join(ignored)} (it has its own shape); "
                          "leave --region out")
    return [f"--region {region} is not applied by {', '.join(ignored)} (its own shape); it applies to "
            f"{', '.join(m.name for m in methods if m.honours_region)}"]


def strength_warnings(methods: list[DeidMethod], strength: float) -> list[str]:
    """Warnings for a ``strength`` some methods have no parameter for (mask, k-same-average,
    k-same-select); a ConfigError when none of them has one. The default 1.0 is silent."""
    ignored = [m.name for m in methods if not m.uses_strength]
    if strength == 1.0 or not ignored:
        return []
    if len(ignored) == len(methods):
        raise ConfigError(f"--strength does not apply to {', '.join(ignored)} (nothing to scale"
                          + ("; k-same's privacy parameter is --k" if any(n.startswith("k-same") for n in ignored) else "")
                          + "); leave --strength out")
    return [f"--strength {strength:g} is not applied by {', '.join(ignored)} (nothing to scale); it applies to "
            f"{', '.join(m.name for m in methods if m.uses_strength)}"]


def deidentify(image: torch.Tensor, faces: list[Face], methods: list[DeidMethod], loaded=None) -> torch.Tensor:
    """Apply ``methods`` in sequence to the faces of one image (3, H, W) in [0, 1].

    ``loaded``: the :class:`~facepriv.core.io.LoadedImage` the image came from, passed on to
    the methods that use it (``takes_loaded``: the adversarial noise keeps a 16-bit file's levels).
    """
    out = image
    for m in methods:
        out = m.apply(out, faces, loaded=loaded) if getattr(m, "takes_loaded", False) else m.apply(out, faces)
    return out


def collect_media(inputs: list[str | Path], *, glob: str | None = None, exclude=()) -> list[InputItem]:
    """Photos and videos among ``inputs`` (folders searched recursively), output-relative paths."""
    if glob:
        return collect_inputs(inputs, glob=glob, exclude=exclude)
    items = collect_inputs(inputs, glob="*", exclude=exclude)
    folders = [Path(str(p)).expanduser().resolve() for p in inputs
               if not str(p).startswith("@") and Path(str(p)).expanduser().is_dir()]
    keep = set(IMAGE_SUFFIXES) | set(VIDEO_SUFFIXES)
    out = []
    for it in items:
        from_folder = any(f in it.path.parents for f in folders)
        if from_folder and (it.path.suffix.lower() not in keep or it.path.name.startswith(".")):
            continue
        out.append(it)
    return out


def config_warnings(cfg: DeidConfig) -> list[str]:
    """The warnings :func:`run_deid` will record for ``cfg`` (ConfigError if it is unusable);
    creates the methods without loading any model."""
    methods = build_methods(cfg)
    return region_warnings(methods, cfg.region) + strength_warnings(methods, cfg.strength)


def _prepare_ksame(methods: list[DeidMethod], items: list[InputItem], detector: FaceDetector, cfg: DeidConfig,
                   policy: FacePolicy, save: SaveOptions, device, progress: bool) -> dict | None:
    """Build (or load) the k-Same pool; returns what to record about it."""
    from ..core.io import load_image
    from .ksame import FacePool, ksame_methods

    ks = ksame_methods(methods)
    if not ks:
        return None
    first = ks[0]
    photos = [it for it in items if not is_video(it.path)]
    videos = len(items) - len(photos)
    if first.pool is None:
        if cfg.k_pool and Path(cfg.k_pool).is_dir():
            first.build_pool(cfg.k_pool, detector, policy=policy, progress=progress)
        elif cfg.k_pool:
            raise ConfigError(f"--k-pool {cfg.k_pool}: not a folder or a saved pool file")
        elif not photos and videos:
            raise ConfigError("k-same on videos needs --k-pool DIR (a folder of face photos): video frames are never "
                              "used as the pool, and there are no input photos to use instead")
        else:  # the batch itself is the pool
            pool = FacePool.empty(first.size, first.region)
            with make_progress(enabled=progress) as bar:
                task = bar.add_task("k-same pool (inputs)", total=len(photos))
                for it in photos:
                    try:
                        img = load_image(it.path, max_pixels=save.max_pixels)
                    except FaceprivError:
                        bar.advance(task)
                        continue  # reported by the main pass
                    faces = policy.select(detector.detect(img.rgb))
                    pool.add(img.to_tensor(device), faces, str(it.path), None, first.pool_models())
                    bar.advance(task)
            first.set_pool(pool)
    for m in ks[1:]:
        if m.pool is None:
            m.set_pool(first.pool)
    pool = first.pool
    k = max(m.k for m in ks)
    # a pool made of the inputs holds every face's own identity, which is never averaged: k + 1
    # identities are needed. A separate pool may not hold the inputs' people at all (k are
    # enough up front; a face whose own identity is in it then fails alone if k others remain short).
    need = k if cfg.k_pool else k + 1
    if pool.n_identities < need:
        where = cfg.k_pool or "the input photos"
        why = "" if cfg.k_pool else " (k others than each face's own)"
        note = (f" Videos ({videos}) are never used as the pool; give --k-pool DIR." if videos and not cfg.k_pool
                else " Give --k-pool DIR with more people or a smaller --k.")
        raise ConfigError(
            f"k-same: {where} hold{'s' if cfg.k_pool else ''} {pool.n_identities} identit"
            f"{'y' if pool.n_identities == 1 else 'ies'} ({len(pool)} faces); k={k} needs at least {need}{why}.{note}")
    return {"faces": len(pool), "identities": pool.n_identities, "identity_mode": pool.identity_mode,
            "template": pool.template.name, "source": str(cfg.k_pool) if cfg.k_pool else "inputs"}


def run_deid(inputs: list[str | Path], out: str | Path, cfg: DeidConfig, *, policy: FacePolicy | None = None,
             save: SaveOptions | None = None, device: str | torch.device = "cpu", glob: str | None = None,
             resume: bool = False, output_suffix: str | None = None, progress: bool = True,
             verbose: bool = False, detector: FaceDetector | None = None,
             rank: int | None = None, world_size: int | None = None) -> BatchSummary:
    """De-identify every face in every input photo and video, mirroring the inputs under ``out``.

    ``detector``: a ready :class:`FaceDetector` to use instead of creating ``cfg.detector``.
    ``rank``/``world_size``: this process's share of the inputs (default: from ``accelerate
    launch`` / torchrun / MPI, see :func:`facepriv.core.distributed.distributed_context`); each
    process writes ``manifest.rankN.jsonl``. A k-Same pool made of the inputs still holds all of them.
    """
    from ..models import create_model

    policy = policy or FacePolicy()
    save = save or SaveOptions()
    out = Path(out)
    rank, world, device = distributed_context(rank, world_size, torch.device(device))
    items = collect_media(inputs, glob=glob, exclude=[out])
    check_outputs(items, out, output_suffix)  # collisions and outputs over inputs: before any model loads
    methods = build_methods(cfg)
    warnings = region_warnings(methods, cfg.region) + strength_warnings(methods, cfg.strength)  # before any model loads
    for method in methods:
        method.setup(device)
    if detector is None:
        detector = create_model(cfg.detector, device=device)
    if not isinstance(detector, CachedDetector):
        detector = CachedDetector(detector)
    pool_info = _prepare_ksame(methods, items, detector, cfg, policy, save, device, progress)

    applied = [m.describe() for m in methods]  # what each method really applies (region: null if not)

    def process(item: InputItem, dst: Path) -> ItemResult:
        for m in methods:
            m.last_info = {}
        if is_video(item.path):
            dst = dst.with_suffix(item.path.suffix)
            info = deid_video(item.path, dst, methods, detector, policy=policy, options=cfg.video,
                              progress=progress, device=device)
            status = info.pop("status")
            res = ItemResult(status=status, output=None if status == "skipped" else dst,
                             faces=info.get("faces", 0), timings=info.pop("timings", {}), extra={"video": info})
        else:
            res = process_photo(item, dst, detector=detector, policy=policy, save=save, device=device,
                                edit=lambda x, faces, img: deidentify(x, faces, methods, loaded=img))
            decided = {m.name: m.last_info for m in methods if m.last_info}
            if decided:
                res.extra["deid"] = decided
        res.extra["methods"] = applied
        if warnings:
            res.extra["warnings"] = warnings
        return res

    config = {"command": "deid", **asdict(cfg), "policy": asdict(policy), "save": asdict(save),
              "suffix": output_suffix, "methods_resolved": [m.describe() for m in methods], "pool": pool_info,
              "warnings": warnings}
    return run_batch(items, process, out_dir=out, config=config, resume=resume, output_suffix=output_suffix,
                     description=f"deid {'+'.join(cfg.methods)}", progress=progress, verbose=verbose,
                     command="deid", rank=rank, world_size=world)
