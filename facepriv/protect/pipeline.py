"""``run_protect``: protect every face in photos and folders, with MAP or a noise baseline.

* ``method="map"`` (default): the photos' faces are found first (one pass over the inputs),
  then a copy of the score network is fine-tuned once for the whole set (or once per group
  of ``batch_faces`` faces), and each photo is written with its regenerated faces pasted back
  (only the edit is added, so the rest of the photo keeps its full resolution). Fine-tuning
  starts lazily when the batch runner reaches the first photo of a group, so ``--resume``,
  per-file errors and the manifest work as for every other command.
* ``model=DIR``: reuse a network saved by ``save_model`` - one inversion + generation per face,
  no tuning, photo by photo.
* ``method="pgd" | "mifgsm" | "tipim" | ...``: L-inf noise baselines from
  :mod:`facepriv.protect.baselines`, photo by photo through :func:`core.photo.process_photo`.

Each method is an entry of :mod:`facepriv.protect.registry` (name -> builder + traits), registered
at the end of this module; ``run_protect`` resolves ``auto`` (:func:`resolve_method`) and runs the
entry's job.

Under ``accelerate launch`` (several processes) the inputs are sharded by rank (each process
writes ``manifest.rankN.jsonl``); for MAP each process fine-tunes its own copy on its own shard
(no gradient exchange; ``save_model`` then writes ``DIR/rankN``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..attacks.config import METHODS as ATTACK_METHODS
from ..attacks.config import AttackConfig
from ..core.align import landmarks_tensor
from ..core.batch import BatchSummary, InputItem, check_outputs, collect_inputs, plan_batch, run_batch
from ..core.distributed import distributed_context  # also importable from here, as before
from ..core.errors import ConfigError
from ..core.faces import CachedDetector, Face, FacePolicy
from ..core.io import load_image
from ..core.photo import SaveOptions, process_photo
from ..core.progress import make_progress
from .baselines import attack_config, build_baseline
from .map.loading import score_model_reference
from .map.tuner import MAPConfig, MAPEditor, MAPTuner, align_for_score_model, paste_protected
from .registry import PROTECT_METHODS, ProtectJob, ProtectRun, get_protect_method, photo_job, register_protect_method

DEFAULT_SCORE_MODEL = "ddpm-celebahq-256"
BASELINE_METHODS = tuple(ATTACK_METHODS)  # pgd, mifgsm, tidim, tipim: the L-inf attacks' table
_INFERENCE_KEYS = ("t0", "n_inv", "n_gen", "mixed_precision", "batch_size")


@dataclass
class ProtectConfig:
    """What ``facepriv protect`` does; see the CLI help for each option.

    ``map`` is a full :class:`MAPConfig`, or a dict of the MAP settings given explicitly
    (the rest take MAPConfig's defaults when fine-tuning, and the saved model's values when
    reusing one with ``model``).
    """

    method: str = "auto"
    surrogates: list[str] | None = None  # None: the method's default (see ``surrogate_names``)
    target: str | None = None  # image or folder of images of the identity to impersonate
    detector: str = "mtcnn"
    # MAP
    map: MAPConfig | dict = field(default_factory=dict)
    score_model: str | None = None  # registry name, hub id or folder (default ddpm-celebahq-256)
    model: str | None = None  # a folder written by save_model: protect without fine-tuning
    save_model: str | None = None
    expression_model: str = "expr-fer7"
    expression_ref: str | None = None  # image whose expression the faces should take
    batch_faces: int | None = None  # fine-tune once per this many faces (None: once for all)
    feather: float = 0.12
    # the L-inf baselines (pgd/mifgsm/tidim/tipim only): an AttackConfig, or a dict of the
    # AttackConfig options given (epsilon, steps, step_size, momentum, region, ...; the rest take
    # protect's defaults: see protect.baselines.attack_config)
    attack: AttackConfig | dict = field(default_factory=dict)
    # transfer: TransferOptions fields (verify_with, person, identity_folders, attack={...})
    transfer: dict = field(default_factory=dict)

    def __post_init__(self):
        self.method = self.method.strip().lower()
        if self.method != "auto" and self.method not in PROTECT_METHODS:
            raise ConfigError(f"unknown method {self.method!r}; use one of {', '.join(method_names())}")
        spec = None if self.method == "auto" else PROTECT_METHODS[self.method]
        group = spec.options if spec is not None else None
        if spec is not None and group != "map" and (self.model or self.save_model):
            raise ConfigError("--model / --save-model apply to --method map only")
        if self.model and self.save_model:
            raise ConfigError("--model reuses a fine-tuned network; --save-model saves one after fine-tuning: "
                              "give one of them")
        if self.batch_faces is not None and self.batch_faces < 1:
            raise ConfigError("batch_faces must be >= 1")
        for what, p in (("--target", self.target), ("--expression-ref", self.expression_ref),
                        ("--model", self.model)):
            if p is not None and not Path(p).expanduser().exists():
                raise ConfigError(f"{what} {p} does not exist")
        if self.surrogates is not None and not self.surrogates:
            raise ConfigError("at least one surrogate face-recognition model is needed")
        if isinstance(self.map, dict):
            MAPConfig.from_dict(self.map)  # validate early
        if self.attack and group != "baseline":
            baselines = [n for n, m in PROTECT_METHODS.items() if m.options == "baseline"]
            given = sorted(self.attack) if isinstance(self.attack, dict) else ["attack"]
            raise ConfigError(f"baseline attack options ({', '.join(given)}) apply to "
                              f"--method {'|'.join(baselines)}, not to {self.method}")
        if spec is not None and spec.needs_target and self.target is None:
            raise ConfigError(f"{self.method} is a targeted method: give --target (an image or a folder of images)")
        if self.transfer and spec is not None and group != "transfer":
            raise ConfigError(f"transfer options ({', '.join(sorted(self.transfer))}) apply to --method transfer")
        if spec is None:
            self.transfer_options()  # auto may become transfer
        elif spec.validate is not None:
            spec.validate(self)  # unknown or invalid options: an error before any work

    def surrogate_names(self) -> list[str]:
        """The surrogates of MAP and the noise baselines (default: dlib-resnet, facenet-casia)."""
        return list(self.surrogates) if self.surrogates else ["dlib-resnet", "facenet-casia"]

    def transfer_options(self):
        from .transfer import TransferOptions

        return TransferOptions(**{"surrogates": self.surrogates, **self.transfer})

    def map_config(self, saved: dict | None = None) -> MAPConfig:
        if isinstance(self.map, MAPConfig):
            return self.map
        return MAPConfig.from_dict({**(saved or {}), **self.map})

    def to_json(self) -> dict:
        d = asdict(self)
        for key in ("map", "attack"):  # a full config, or the dict of options given
            value = getattr(self, key)
            d[key] = value.to_json() if hasattr(value, "to_json") else dict(value)
        return d


@dataclass
class ProtectSummary(BatchSummary):
    """A batch summary plus what fine-tuning did (losses, conflicts, saved models)."""

    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**super().to_json(), "details": self.details}


@torch.no_grad()
def target_reference(target: str | Path, ensemble, detector) -> dict[str, torch.Tensor]:
    """Embeddings ``{surrogate: (1, D)}`` of the target identity (image or folder, averaged)."""
    import torch.nn.functional as F

    from ..attacks.reference import reference_from_images, target_images

    files = target_images(target)  # the same photos as the noise baselines' --target
    refs = reference_from_images(ensemble, [str(f) for f in files], detector)
    return {k: F.normalize(v, dim=-1).mean(0, keepdim=True) for k, v in refs.items()}


def _largest_face(path: str | Path, detector) -> tuple[torch.Tensor, Face]:
    from ..core.errors import NoFaceError

    img = load_image(path)
    faces = detector.detect(img.rgb)
    if not faces:
        raise NoFaceError(f"no face found in {path}")
    return img.to_tensor(), max(faces, key=lambda f: f.width * f.height)


def _save_dir(base: str, rank: int, world: int, chunk: int, n_chunks: int) -> Path:
    p = Path(base).expanduser()
    if world > 1:
        p = p / f"rank{rank}"
    if n_chunks > 1:
        p = p / f"chunk{chunk:03d}"
    return p


@dataclass
class _Chunk:
    index: int
    items: list[InputItem]
    faces: int
    slices: dict[str, slice] = field(default_factory=dict)
    latents: torch.Tensor | None = None
    tuner: MAPTuner | None = None
    error: BaseException | None = None
    remaining: int = 0
    info: dict = field(default_factory=dict)


def _plan_chunks(items: list[InputItem], faces_of: dict[str, list[Face]], batch_faces: int | None) -> list[_Chunk]:
    chunks: list[_Chunk] = []
    cur: list[InputItem] = []
    n = 0
    for it in items:
        k = len(faces_of[str(it.path)])
        if cur and batch_faces is not None and n + k > batch_faces:
            chunks.append(_Chunk(len(chunks), cur, n))
            cur, n = [], 0
        cur.append(it)
        n += k
    if cur:
        chunks.append(_Chunk(len(chunks), cur, n))
    for c in chunks:
        c.remaining = len(c.items)
    return chunks


class _MapRun:
    """The MAP fine-tuning path of :func:`run_protect` (state shared by the per-photo calls)."""

    def __init__(self, cfg: ProtectConfig, device: torch.device, progress: bool, rank: int, world: int):
        from ..attacks.identity import IdentityReference, SurrogateEnsemble
        from ..models import create_model
        from ..models.hub import OfflineError
        from ..models.sources import NotAvailableError
        from .map.loading import load_base_score_model

        self.cfg = cfg
        self.mcfg = cfg.map_config()
        self.device = device
        self.progress = progress
        self.rank, self.world = rank, world
        self.score_ref = score_model_reference(cfg.score_model or DEFAULT_SCORE_MODEL)
        try:
            self.score = load_base_score_model(self.score_ref, device=device)
        except (OSError, NotAvailableError, OfflineError) as exc:  # hub / URL unreachable, not cached, offline
            raise ConfigError(f"MAP cannot load its score network {self.score_ref}: {str(exc)[:300]}\n"
                              "Without the network, `--method transfer` protects photos offline (the default "
                              "on a machine without a GPU); `facepriv models fetch ddpm-celebahq-256` caches the "
                              "network where a connection exists.") from None
        self.ensemble = SurrogateEnsemble(cfg.surrogate_names(), device=device)
        self.detector = create_model(cfg.detector, device=device)
        self.known = CachedDetector(self.detector)  # the scan's faces, served again at each photo's turn
        wants_exp = self.mcfg.w_exp > 0 and (self.mcfg.expression is not None or cfg.expression_ref)
        self.expr = create_model(cfg.expression_model, device=device) if wants_exp else None
        if self.expr is not None and self.mcfg.expression is not None and not cfg.expression_ref:
            try:
                self.expr.label_index(self.mcfg.expression)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        self.target = None
        if cfg.target:
            self.target = IdentityReference(target=target_reference(cfg.target, self.ensemble, self.detector))
        self.expr_ref = None
        if cfg.expression_ref and self.expr is not None:
            from .map.losses import expression_inputs

            x, face = _largest_face(cfg.expression_ref, self.detector)
            al = align_for_score_model(self.score, x.to(device), landmarks_tensor([face], device))
            with torch.no_grad():
                self.expr_ref = self.expr.features(expression_inputs(self.expr, al.crops, self.score.template))
        self.faces_of: dict[str, list[Face] | BaseException] = {}
        self.chunks: list[_Chunk] = []
        self.chunk_of: dict[str, _Chunk] = {}
        self.saved: list[str] = []
        self.logs: list[dict] = []

    # first pass: find faces
    def scan(self, items: list[InputItem], policy: FacePolicy, max_pixels) -> None:
        with make_progress(enabled=self.progress) as bar:
            task = bar.add_task("finding faces", total=len(items))
            for it in items:
                try:
                    img = load_image(it.path, max_pixels=max_pixels)
                    self.faces_of[str(it.path)] = policy.select(self.known.detect(img.rgb))
                except Exception as exc:  # noqa: BLE001 - reported when the photo's turn comes
                    self.faces_of[str(it.path)] = exc
                bar.advance(task)
        with_faces = [it for it in items if isinstance(self.faces_of.get(str(it.path)), list)
                      and self.faces_of[str(it.path)]]
        self.chunks = _plan_chunks(with_faces, self.faces_of, self.cfg.batch_faces)
        for c in self.chunks:
            for it in c.items:
                self.chunk_of[str(it.path)] = c

    def _prepare(self, chunk: _Chunk, max_pixels) -> None:
        """Align the chunk's faces, invert them, fine-tune a fresh copy of the network."""
        t = time.perf_counter()
        crops = []
        start = 0
        for it in chunk.items:
            faces = self.faces_of[str(it.path)]
            x = load_image(it.path, max_pixels=max_pixels).to_tensor(self.device)
            al = align_for_score_model(self.score, x, landmarks_tensor(faces, self.device))
            crops.append(al.crops.cpu())
            chunk.slices[str(it.path)] = slice(start, start + len(faces))
            start += len(faces)
        crops_t = torch.cat(crops)
        tuner = MAPTuner(self.score, ensemble=self.ensemble, expression_model=self.expr, config=self.mcfg,
                         device=self.device, base_ref=self.score_ref, progress=self.progress)
        reference = self.target or tuner.source_reference(crops_t)
        chunk.latents = tuner.invert(crops_t)
        tuner.fit(crops_t, reference=reference, latents=chunk.latents, expression_ref=self.expr_ref)
        chunk.tuner = tuner
        chunk.info = {"chunk": chunk.index, "photos": len(chunk.items), "faces": chunk.faces,
                      "tune_s": round(time.perf_counter() - t, 3), **tuner.summary()}
        self.logs.append({**chunk.info, "history": tuner.history})
        if self.cfg.save_model:
            dst = _save_dir(self.cfg.save_model, self.rank, self.world, chunk.index, len(self.chunks))
            tuner.save(dst, extra={"faces": chunk.faces, "photos": len(chunk.items),
                                   "target": self.cfg.target, "expression_ref": self.cfg.expression_ref})
            chunk.info["saved"] = str(dst)
            self.saved.append(str(dst))

    def process(self, item: InputItem, dst: Path, policy: FacePolicy, save: SaveOptions):
        key = str(item.path)
        found = self.faces_of.get(key)
        if isinstance(found, BaseException):
            raise found
        chunk = self.chunk_of.get(key)
        extra: dict = {}

        def edit(x, faces, _loaded):
            if chunk is None:  # no face in the scan, some now
                raise RuntimeError("faces changed between the two passes")
            if chunk.tuner is None and chunk.error is None:
                for other in self.chunks:  # free the previous group's network and latents
                    if other is not chunk and other.tuner is not None and other.remaining == 0:
                        other.tuner, other.latents = None, None
                try:
                    self._prepare(chunk, save.max_pixels)
                    extra["map_tune_s"] = chunk.info.get("tune_s")
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # noqa: BLE001 - every photo of the group reports it
                    chunk.error = exc
            if chunk.error is not None:
                raise chunk.error
            sl = chunk.slices[key]
            if sl.stop - sl.start != len(faces):
                raise RuntimeError("faces changed between the two passes")
            x_hat = chunk.tuner.protect(latents=chunk.latents[sl])
            al = align_for_score_model(chunk.tuner.base, x, landmarks_tensor(faces, x.device))
            return paste_protected(x, x_hat, al, self.cfg.feather)

        try:
            res = process_photo(item, dst, detector=self.known, policy=policy, edit=edit, save=save,
                                device=self.device)
        finally:
            if chunk is not None:
                chunk.remaining -= 1
                if chunk.remaining == 0:
                    chunk.tuner, chunk.latents = None, None
        if chunk is not None:
            res.extra.update({"map_group": chunk.index, **extra})
        return res


def resolve_method(cfg: ProtectConfig, device: torch.device) -> tuple[str, str]:
    """``auto``: MAP where it can run (a CUDA device and the score network on this machine, or a
    saved MAP model), else ``transfer``. Returns the method and a one-line reason."""
    if cfg.method != "auto":
        return cfg.method, f"--method {cfg.method}"
    map_only = {k for k in (cfg.map if isinstance(cfg.map, dict) else {"map": 1}) if k != "seed"}
    if cfg.model or cfg.save_model or cfg.score_model or cfg.expression_ref or map_only:
        return "map", "MAP options given (score network, expression, fine-tuning): MAP"
    if device.type != "cuda":
        return "transfer", f"no CUDA device ({device.type}): transfer noise (MAP needs a GPU)"
    ref = cfg.score_model or DEFAULT_SCORE_MODEL
    from ..models import availability, resolve_pretrained

    try:
        r = resolve_pretrained(ref, task="score", what="score network")
    except ConfigError:
        r = None
    ok = r is not None and (r.kind == "local" or (availability(r.spec).available if r.kind == "registry"
                                                  else _hub_cached(ref)))
    if ok:
        return "map", f"CUDA and the score network {ref} on this machine: MAP"
    return "transfer", f"the score network {ref} is not on this machine (`facepriv models fetch {ref}`): transfer noise"


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001
        return False


def _transfer_report(row: dict, roles) -> dict:
    """The manifest's per-face record of the transfer method: the verdict of each model."""
    keep = ("face", "status", "reason", "steps", "psnr_level", "face_psnr", "linf")
    out = {k: row[k] for k in keep if k in row}
    out["surrogates"], out["held_out"] = list(roles[0]), list(roles[1])
    for key in ("similarity", "person_similarity", "verified_on"):
        if row.get(key):
            out[key] = row[key]
    # the verdict per model (None: no threshold known): against the person's other photos when given
    verdict = row.get("person_similarity") or row.get("similarity") or {}
    out["passed"] = {m: v.get("passed") for m, v in verdict.items()}
    return out


def run_protect(inputs: list[str | Path], out: str | Path, cfg: ProtectConfig | None = None, *,
                policy: FacePolicy | None = None, save: SaveOptions | None = None,
                device: str | torch.device = "cpu", glob: str | None = None, resume: bool = False,
                output_suffix: str | None = None, progress: bool = True, verbose: bool = False,
                rank: int | None = None, world_size: int | None = None) -> ProtectSummary:
    """Protect every face in every input photo, mirroring the inputs under ``out``."""
    from ..core.device import resolve_device

    cfg = cfg or ProtectConfig()
    policy = policy or FacePolicy()
    save = save or SaveOptions()
    out = Path(out)
    rank, world, dev = distributed_context(rank, world_size, resolve_device(device))
    items = collect_inputs(inputs, glob=glob, exclude=[out])
    check_outputs(items, out, output_suffix)  # before any model loads
    config = {"command": "protect", **cfg.to_json(), "policy": asdict(policy), "save": asdict(save),
              "suffix": output_suffix}
    if cfg.model:
        meta = Path(cfg.model, "facepriv.json")
        config["model_meta"] = meta.read_text() if meta.is_file() else None
    common = dict(out_dir=out, config=config, resume=resume, output_suffix=output_suffix, rank=rank,
                  world_size=world, progress=progress, verbose=verbose, command="protect")
    method, why = resolve_method(cfg, dev)
    spec = get_protect_method(method)
    if method != cfg.method:
        cfg = dataclasses.replace(cfg, method=method, transfer=cfg.transfer if spec.options == "transfer" else {})
    details: dict = {"method": cfg.method, "chosen_because": why, "rank": rank, "world_size": world,
                     "device": str(dev)}
    run = ProtectRun(cfg, dev, policy, save, list(items), out, config, resume, output_suffix, progress, rank, world,
                     details)
    job = spec.build(run)
    summary = run_batch(items, job.process, description=job.description, **common)
    if job.finish is not None:
        job.finish()
    return ProtectSummary(**vars(summary), details=details)


def method_names() -> tuple[str, ...]:
    """``auto`` and every registered protect method, as ``--method`` takes them."""
    return ("auto", *PROTECT_METHODS)


@register_protect_method("map", options="map", needs_gpu=True, accepts_target=True,
                         help="fine-tune a face diffusion model that regenerates each face")
def _build_map(run: ProtectRun) -> ProtectJob:
    from ..models import create_model

    cfg, dev, details = run.cfg, run.device, run.details
    if cfg.model:  # reuse a fine-tuned network: no tuning, photo by photo
        overrides = cfg.map if isinstance(cfg.map, dict) else {k: getattr(cfg.map, k) for k in _INFERENCE_KEYS}
        editor = MAPEditor.from_pretrained(cfg.model, base=cfg.score_model, device=dev,
                                           overrides={k: v for k, v in overrides.items() if k in _INFERENCE_KEYS},
                                           feather=cfg.feather)
        detector = create_model(cfg.detector, device=dev)
        job = photo_job(run, editor.edit_faces, detector, description="protect map (saved model)")
        job.finish = lambda: details.update({"model": str(cfg.model), "t0": editor.cfg.t0,
                                             "n_inv": editor.cfg.n_inv, "n_gen": editor.cfg.n_gen})
        return job

    rank, world, out = run.rank, run.world, run.out
    runner = _MapRun(cfg, dev, run.progress, rank, world)
    plan = plan_batch(run.items, out, run.config, resume=run.resume, rank=rank, world_size=world)
    runner.scan(plan.todo, run.policy, run.save.max_pixels)  # the photos run_batch will hand over

    def finish():
        details.update({"score_model": runner.score_ref, "resolution": runner.score.resolution,
                        "map": asdict(runner.mcfg), "groups": [c.info for c in runner.chunks if c.info],
                        "saved_models": runner.saved})
        if runner.logs:
            log_name = "map_log.json" if world <= 1 else f"map_log.rank{rank}.json"
            (out / log_name).write_text(json.dumps(runner.logs, indent=2, default=str))
            details["log"] = str(out / log_name)

    return ProtectJob(lambda item, dst: runner.process(item, dst, run.policy, run.save), "protect map", finish)


@register_protect_method("transfer", options="transfer", validate=lambda cfg: cfg.transfer_options(),
                         help="noise made to carry over to recognisers it never saw, checked on a held-out one")
def _build_transfer(run: ProtectRun) -> ProtectJob:
    from ..models import create_model
    from .transfer import build_transfer_editor

    topts = run.cfg.transfer_options()
    detector = create_model(run.cfg.detector, device=run.device)
    edit = build_transfer_editor(topts, run.device, detector, output_suffix=run.output_suffix,
                                 quality=run.save.quality)
    run.details["transfer"] = topts.to_json()

    def report(res, edit):
        if edit.last_result is not None:
            edit.verify_saved(res.output)
            res.extra["attack"] = [_transfer_report(r, edit.last_roles) for r in edit.last_result.per_face]
            res.extra["linf"] = round(float(edit.last_result.linf), 6)

    return photo_job(run, edit, detector, description="protect transfer", report=report)


for _traits in ATTACK_METHODS.values():  # the L-inf baselines: protect/baselines.py
    register_protect_method(_traits.name, options="baseline", accepts_target=True, needs_target=_traits.needs_target,
                            help=_traits.help, validate=attack_config)(build_baseline)
del _traits

#: ``--method`` choices of the built-in methods (the live list: :func:`method_names`)
METHODS = method_names()
