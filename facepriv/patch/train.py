"""Training a conditional patch generator against a surrogate ensemble.

Data
    Faces are detected in the ``data`` photos (and one face per ``targets`` image), aligned
    to a *context canvas* - the ArcFace template scaled by ``context_scale`` with a margin
    of ``context_margin`` reference pixels around it - and cached as uint8 tensors
    (``out/cache/*.safetensors``, keyed by the files, their sizes/mtimes and the geometry),
    so later runs and ``--resume`` skip detection. The canvas is the "photo" during training:
    every surrogate re-aligns the patched canvas to its own template exactly as it would
    align a real photo, and patches are placed with the same functions ``apply`` uses.

Step
    ``patch = G(source, target)`` -> EOT (random placement jitter + colour jitter) -> pasted
    onto the canvas -> surrogate embeddings -> :func:`~facepriv.patch.losses.patch_objective`
    (pull to the target / push from the source, TV, printability, optional latent prior).
    Each sample gets a random target; with probability ``evasion_prob`` (and always without
    ``targets``) it gets none and the push-only evasion objective. The random draws of a step
    (targets, EOT, prior noise) come from torch's RNG re-seeded from ``(seed, process index,
    step)`` (:func:`step_seed`): every rank under ``accelerate launch`` draws its own jitter,
    and a resumed run draws exactly what the straight run drew.

Bookkeeping
    :class:`accelerate.Accelerator` places the generator, optimiser and data loader (one or
    many GPUs under ``accelerate launch``; CPU otherwise). After every epoch - and every
    ``checkpoint_every`` steps inside an epoch - the main process writes the generator
    (``config.json`` + ``generator.safetensors``, loadable with
    :meth:`PatchGenerator.from_pretrained`) and the training state
    (``train_state.safetensors``: optimiser tensors + RNG; ``train_state.json``: completed
    epochs, batches done in the current epoch, step, history and the current epoch's running
    sums, settings) atomically; ``resume=True`` continues from there, mid-epoch included.

Validation
    ``val_fraction`` of the data photos (at most ``val_max_photos``; chosen by a hash of the
    seed and the path, so the same photos on every run and every rank) are held out of
    training. At the end, :func:`validate_generator` patches each held-out face without any
    jitter and counts it as *evaded* when its similarity to its own clean photo falls below
    every surrogate's threshold at FAR ``val_far`` (from
    :func:`facepriv.attacks.surrogate_thresholds`: the model spec, a calibration, else the
    model's default operating threshold - said so in the record). The record (rate, per
    surrogate rates and thresholds, a plain grey patch's rate for comparison, and with
    targets the impersonation rate) goes into the generator's ``config.json``;
    ``patch apply`` warns when it is below :data:`APPLY_WARN_RATE` or missing. With too few
    photos to hold any out, the training faces are measured instead (optimistic; noted).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from ..core.align import Template, align_faces, get_template, invert_affine, landmarks_tensor
from ..core.batch import collect_inputs
from ..core.config import ConfigBase
from ..core.errors import ConfigError, FaceprivError
from ..core.faces import FacePolicy
from ..core.io import load_image
from ..core.progress import make_progress, stderr_console
from .generator import GeneratorConfig, PatchGenerator
from .losses import PatchLossWeights, default_palette, load_latent_prior, load_palette, patch_objective
from .placement import PlacementEOT, color_jitter, compose, get_region, photo_to_reference, random_placement_jitter

CACHE_VERSION = 1
#: validation evasion rate a well-trained generator reaches (what ``patch train`` calls good)
GOOD_EVASION_RATE = 0.8
#: below this validation rate ``patch apply`` warns that the patches will probably not protect
APPLY_WARN_RATE = 0.5


@dataclass
class PatchTrainConfig(ConfigBase):
    """Everything ``patch train`` does (its ``to_json`` is recorded in ``train_state.json``)."""

    config_name = "patch training setting"

    data: list[str] = field(default_factory=list)
    out: str = "patch-generator"
    targets: list[str] | None = None
    surrogates: list[str] = field(default_factory=lambda: ["dlib-resnet", "facenet-casia"])
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weights: PatchLossWeights = field(default_factory=PatchLossWeights)
    evasion_prob: float = 0.25  # share of samples trained without a target when targets exist
    palette: str | None = None
    prior_unet: str | None = None  # natural mode: diffusers UNet2D(Condition)Model on the autoencoder's latents
    eot: PlacementEOT = field(default_factory=PlacementEOT)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    detector: str = "mtcnn"
    min_face_size: float = 40.0
    max_faces: int | None = None  # per data photo
    glob: str | None = None
    context_scale: float = 1.5
    context_margin: int = 16  # reference (ArcFace-112) pixels around the template
    grad_clip: float = 1.0
    seed: int = 0
    max_steps_per_epoch: int | None = None
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: at the end of each epoch only)
    val_fraction: float = 0.1  # share of the data photos held out to measure the evasion rate
    val_max_photos: int = 200
    val_far: str = "1e-2"  # false-accept rate whose threshold decides "evaded"

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("val_fraction must be in [0, 1)")
        if self.val_max_photos < 0:
            raise ConfigError("val_max_photos must be 0 or more")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch size must be at least 1")
        if self.checkpoint_every < 0:
            raise ConfigError("checkpoint_every must be 0 (per epoch only) or a number of steps")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError("max_steps_per_epoch must be at least 1")
        if not 0 <= self.evasion_prob <= 1:
            raise ConfigError("evasion_prob must be in [0, 1]")
        if not self.data:
            raise ConfigError("no training photos given (--data)")
        if self.lr <= 0:
            raise ConfigError("learning rate must be positive")

    def fingerprint(self) -> str:
        """What must not change between a run and its --resume."""
        d = asdict(self)
        keep = {k: d[k] for k in ("surrogates", "batch_size", "lr", "weights", "evasion_prob", "palette",
                                  "prior_unet", "eot", "detector", "min_face_size", "max_faces", "glob",
                                  "context_scale", "context_margin", "seed")}
        g = dict(d["generator"])
        for k in ("autoencoder_model", "latent_channels", "latent_factor", "latent_scaling_factor",
                  "latent_shift_factor", "autoencoder"):
            g.pop(k, None)
        keep["generator"] = g
        # the held-out split changes the training faces; left out at its defaults so that runs
        # started before validation existed still resume (they keep training on every face)
        for k, default in (("val_fraction", 0.1), ("val_max_photos", 200)):
            if d[k] != default:
                keep[k] = d[k]
        keep["data"] = sorted(str(Path(p).expanduser().resolve()) for p in self.data)
        keep["targets"] = sorted(str(Path(p).expanduser().resolve()) for p in (self.targets or []))
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- canvas
def context_template(scale: float, margin: float) -> Template:
    """The ArcFace template scaled by ``scale`` inside a margin of ``margin`` reference pixels."""
    tpl = get_template("arcface-112")
    side = int(round((112 + 2 * margin) * scale))
    pts = tuple(((x + margin + 0.5) * scale - 0.5, (y + margin + 0.5) * scale - 0.5) for x, y in tpl.points)
    return Template(f"arcface-context-{scale:g}-{margin:g}", (side, side), pts)


@dataclass
class FaceSet:
    """Aligned faces cached for training: context canvases and generator inputs (uint8)."""

    canvases: torch.Tensor  # (N, 3, C, C) uint8
    aligned: torch.Tensor  # (N, 3, S, S) uint8, ArcFace template at the generator's input size
    files: list[str]
    template: Template

    def __len__(self) -> int:
        return self.canvases.shape[0]

    def landmarks(self, n: int, device=None) -> torch.Tensor:
        return self.template.tensor(device).expand(n, 5, 2)

    def subset(self, keep: list[int]) -> FaceSet:
        idx = torch.as_tensor(keep, dtype=torch.long)
        return FaceSet(self.canvases[idx], self.aligned[idx], [self.files[i] for i in keep], self.template)


def held_out_photos(files: list[str], *, fraction: float, max_photos: int, seed: int) -> set[str]:
    """The photos kept out of training for validation: ``floor(fraction * photos)`` (at most
    ``max_photos``, and never all of them), picked by a hash of ``seed`` and the path - the same
    on every run, rank and resume, and mostly unchanged when photos are added."""
    photos = sorted(set(files))
    n_val = min(int(len(photos) * fraction), int(max_photos), len(photos) - 1)
    if n_val <= 0:
        return set()
    def key(f: str) -> bytes:
        return hashlib.sha256(f"facepriv-val|{int(seed)}|{Path(f).expanduser().resolve()}".encode()).digest()

    ranked = sorted(photos, key=key)
    return set(ranked[:n_val])


def _cache_key(items, kind: str, cfg: PatchTrainConfig, tpl: Template, one_face: bool) -> str:
    h = hashlib.sha256()
    for it in items:
        st = it.path.stat()
        h.update(f"{it.path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps([CACHE_VERSION, kind, cfg.detector, cfg.min_face_size, cfg.max_faces, one_face,
                         tpl.size, tpl.points, cfg.generator.input_size]).encode())
    return h.hexdigest()[:20]


def build_face_set(inputs: list[str], *, cfg: PatchTrainConfig, detector, cache_dir: Path | None, kind: str,
                   one_face: bool = False, progress: bool = True, device="cpu",
                   detections: dict | None = None) -> FaceSet:
    """Detect, align and cache the faces of ``inputs`` (one per image with ``one_face``).

    ``detections``: a dict shared between calls (path -> faces) so a photo that is both a
    training photo and a target is detected once.
    """
    from safetensors.torch import load_file, save_file

    tpl = context_template(cfg.context_scale, cfg.context_margin)
    items = collect_inputs(inputs, glob=cfg.glob)
    if not items:
        raise ConfigError(f"no images found in {', '.join(map(str, inputs))}")
    key = _cache_key(items, kind, cfg, tpl, one_face)
    cache = cache_dir / f"{kind}-{key}.safetensors" if cache_dir is not None else None
    S = cfg.generator.input_size
    if cache is not None and cache.is_file():
        t = load_file(str(cache))
        meta = json.loads((cache.with_suffix(".json")).read_text())
        return FaceSet(t["canvases"], t["aligned"], meta["files"], tpl)
    policy = FacePolicy(on_no_face="skip", max_faces=1 if one_face else cfg.max_faces, min_face_size=cfg.min_face_size)
    canvases, aligned, files, skipped = [], [], [], []
    with make_progress(enabled=progress) as bar:
        task = bar.add_task(f"finding faces ({kind})", total=len(items))
        for it in items:
            try:
                img = load_image(it.path)
                key = str(it.path)
                found = detections.get(key) if detections is not None else None
                if found is None:
                    found = detector.detect(img.rgb)
                    if detections is not None:
                        detections[key] = found
                faces = policy.select(found)
            except FaceprivError as exc:
                skipped.append(f"{it.path}: {exc}")
                faces = []
                img = None
            if img is not None and not faces:
                skipped.append(f"{it.path}: no face")
            if faces:
                x = img.to_tensor(device)
                lms = landmarks_tensor(faces, device)
                c = align_faces(x, lms, tpl).crops
                a = align_faces(x, lms, "arcface-112", size=(S, S)).crops
                canvases.append((c.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
                aligned.append((a.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
                files += [str(it.path)] * len(faces)
            bar.advance(task)
    if skipped and progress:
        stderr_console.print(f"[yellow]{kind}: {len(skipped)} image(s) without a usable face were skipped")
    if not canvases:
        raise ConfigError(f"no faces found in the {kind} images")
    fs = FaceSet(torch.cat(canvases), torch.cat(aligned), files, tpl)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".part")
        save_file({"canvases": fs.canvases.contiguous(), "aligned": fs.aligned.contiguous()}, str(tmp))
        cache.with_suffix(".json").write_text(json.dumps({"files": files, "skipped": skipped}))
        os.replace(tmp, cache)
    return fs


def to_float(x: torch.Tensor, device) -> torch.Tensor:
    return x.to(device).float().div_(255.0)


@torch.no_grad()
def reference_embeddings(surrogates, faces: FaceSet, device, chunk: int = 16) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(faces), chunk):
        x = to_float(faces.canvases[i: i + chunk], device)
        n = x.shape[0]
        emb = surrogates.reference(x, faces.landmarks(n, device), image_index=torch.arange(n, device=device))
        for k, v in emb.items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- validation
def _threshold_sources(surrogates, far: str) -> dict[str, tuple[float | None, str]]:
    """Per surrogate: its threshold at ``far`` (:func:`facepriv.attacks.surrogate_thresholds`,
    in the model's similarity units) and where it came from, in words."""
    from ..attacks import AttackConfig, surrogate_thresholds
    from ..attacks.linf import _calibrated

    values = surrogate_thresholds(surrogates, AttackConfig(far=far), required=False)
    out = {}
    for name, m in zip(surrogates.names, surrogates.members):
        spec_t = dict(getattr(m.spec, "thresholds", {}) or {})
        t = values.get(name)
        if t is None:
            how = "none known"
        elif far in spec_t:
            how = f"FAR {far} ({getattr(m.spec, 'threshold_source', None) or 'model spec'})"
        elif _calibrated(name, far) is not None:
            how = f"FAR {far} (calibrated with `facepriv audit calibrate`)"
        else:
            how = "the model's default operating threshold (FAR unknown)"
        out[name] = (t, how)
    return out


@torch.no_grad()
def _batch_similarities(generator: PatchGenerator, surrogates, faces: FaceSet, i: int, batch_size: int, *,
                        dev, p2r: torch.Tensor, metrics: dict[str, str], sims: dict[str, dict[str, list]],
                        targets: FaceSet | None, t_ref: dict[str, torch.Tensor] | None) -> None:
    """Similarities of the faces ``i : i + batch_size``, appended to ``sims[surrogate][kind]``.

    Kinds: ``patched`` (evasion patch) and ``grey`` (mid-grey patch) against the clean canvas;
    with ``t_ref``, ``imp`` (patched towards the cycled target) and ``clean_tgt`` (clean face)
    against that target.
    """
    from ..models.recognition import similarity
    from .placement import place_on_canvas

    region = generator.region
    canvas = to_float(faces.canvases[i: i + batch_size], dev)
    src = to_float(faces.aligned[i: i + batch_size], dev)
    n = canvas.shape[0]
    lms = faces.landmarks(n, dev)
    ii = torch.arange(n, device=dev)
    mats = compose(invert_affine(photo_to_reference(lms)), p2r.expand(n, 2, 3))
    ref = surrogates.reference(canvas, lms, image_index=ii)
    patch = generator(src).clamp(0, 1)
    grey = torch.full_like(patch, 0.5)
    for key, pt in (("patched", patch), ("grey", grey)):
        shown, _ = place_on_canvas(canvas, pt, region, mats)
        emb = surrogates.embed(shown, lms, image_index=ii)
        for name in surrogates.names:
            sims[name][key].append(similarity(emb[name], ref[name], metrics[name]).float().cpu())
    if t_ref is not None:
        t_idx = (torch.arange(i, i + n) % len(targets)).long()
        tgt = to_float(targets.aligned[t_idx], dev)
        shown, _ = place_on_canvas(canvas, generator(src, tgt).clamp(0, 1), region, mats)
        emb = surrogates.embed(shown, lms, image_index=ii)
        for name in surrogates.names:
            r = t_ref[name][t_idx.to(t_ref[name].device)]
            sims[name]["imp"].append(similarity(emb[name], r, metrics[name]).float().cpu())
            sims[name]["clean_tgt"].append(similarity(ref[name], r, metrics[name]).float().cpu())


def _surrogate_rates(surrogates, sims: dict[str, dict[str, list]], th: dict[str, tuple[float | None, str]],
                     metrics: dict[str, str], N: int, with_targets: bool) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Per-surrogate rows (threshold, its source, rates, mean similarities) and the per-face verdicts
    over all judged surrogates: ``evaded``, ``grey``, ``imp`` and ``clean`` (the clean face already
    passes for its target), each an (N,) bool tensor."""
    per: dict[str, dict] = {}
    verdicts = {k: torch.ones(N, dtype=torch.bool) for k in ("evaded", "grey", "imp", "clean")}
    for name in surrogates.names:
        after = torch.cat(sims[name]["patched"]) if N else torch.zeros(0)
        grey = torch.cat(sims[name]["grey"]) if N else torch.zeros(0)
        t, how = th[name]
        row = {"threshold": None if t is None else round(float(t), 6), "threshold_source": how,
               "metric": metrics[name], "mean_similarity": round(float(after.mean()), 5) if N else None,
               "mean_similarity_grey": round(float(grey.mean()), 5) if N else None, "evasion_rate": None}
        if t is not None and N:
            ev = after < t
            row["evasion_rate"] = round(float(ev.float().mean()), 5)
            verdicts["evaded"] &= ev
            verdicts["grey"] &= grey < t
            if with_targets:
                imp = torch.cat(sims[name]["imp"])
                clean = torch.cat(sims[name]["clean_tgt"])
                row["impersonation_rate"] = round(float((imp >= t).float().mean()), 5)
                row["impersonation_rate_clean"] = round(float((clean >= t).float().mean()), 5)
                verdicts["imp"] &= imp >= t
                verdicts["clean"] &= clean >= t
        per[name] = row
    return per, verdicts


def _validation_notes(surrogates, th: dict[str, tuple[float | None, str]], judged: list[str],
                      default_only: list[str], far: str, held_out: bool, N: int) -> list[str]:
    """The caveats of a validation record: unknown or default thresholds, few or training faces."""
    notes = []
    unknown = [n for n in surrogates.names if th[n][0] is None]
    if unknown:
        notes.append(f"no threshold is known for {', '.join(unknown)} (not at FAR {far}, no calibration, no default): "
                     "left out of the evasion rate" + ("" if judged else "; no rate can be given")
                     + f" - run `facepriv audit calibrate --pairs PAIRS.csv --models {','.join(unknown)}` on labelled pairs")
    if default_only:
        notes.append(f"{', '.join(default_only)}: no FAR {far} threshold known, its default operating threshold "
                     "is used instead (run `facepriv audit calibrate` for a FAR-calibrated one)")
    if not held_out:
        notes.append(f"too few training photos to hold any out: measured on the {N} training face(s) "
                     "(optimistic; give more photos for a held-out rate)")
    elif N < 20:
        notes.append(f"only {N} held-out face(s): the rate is rough")
    return notes


def _rate_basis(judged: list[str], default_only: list[str], far: str) -> str:
    """The ``at`` of a validation record: the operating point the rates were measured at, in words."""
    if default_only and len(default_only) == len(judged):
        return "the surrogates' default thresholds (FAR unknown)"
    if default_only:
        return f"FAR {far} (default thresholds for {', '.join(default_only)})"
    return f"FAR {far}"


@torch.no_grad()
def validate_generator(generator: PatchGenerator, surrogates, faces: FaceSet, *, far: str = "1e-2",
                       device="cpu", batch_size: int = 16, held_out: bool = True,
                       targets: FaceSet | None = None) -> dict:
    """How often the generator's evasion patches defeat the surrogates on ``faces``.

    Each face gets its evasion patch (no target), pasted without jitter exactly as ``patch
    apply`` pastes it; the face counts as *evaded* when its similarity to its own clean canvas
    is below the threshold at FAR ``far`` for every surrogate that has one (the strict,
    self-verification case). A mid-grey patch in the same place gives the baseline an
    untrained generator would reach. With ``targets``, each face is also patched to look like
    a target (cycling through them) and counts as *impersonating* when its similarity to that
    target reaches the threshold for every surrogate.

    Returns the record ``config.json`` stores: ``evasion_rate`` (None when no surrogate has a
    threshold), ``grey_patch_rate``, ``faces``, ``held_out``, ``far``, ``surrogates`` (per
    model: threshold, its source, evasion rate, mean similarity before / after), ``notes``
    and, with targets, ``impersonation_rate``.
    """
    dev = torch.device(device)
    P = generator.config.patch_size
    th = _threshold_sources(surrogates, far)
    metrics = {n: getattr(m.spec, "metric", None) or "cosine" for n, m in zip(surrogates.names, surrogates.members)}
    judged = [n for n in surrogates.names if th[n][0] is not None]
    sims: dict[str, dict[str, list[torch.Tensor]]] = {n: {"patched": [], "grey": [], "clean_tgt": [], "imp": []}
                                                      for n in surrogates.names}
    t_ref = None
    if targets is not None and len(targets):
        t_ref = reference_embeddings(surrogates, targets, dev)
    p2r = generator.region.patch_to_reference(P, device=dev)
    for i in range(0, len(faces), max(1, int(batch_size))):
        _batch_similarities(generator, surrogates, faces, i, batch_size, dev=dev, p2r=p2r, metrics=metrics,
                            sims=sims, targets=targets, t_ref=t_ref)

    N = len(faces)
    per, verdicts = _surrogate_rates(surrogates, sims, th, metrics, N, t_ref is not None)
    default_only = [n for n in judged if th[n][1].startswith("the model's default")]
    notes = _validation_notes(surrogates, th, judged, default_only, far, held_out, N)
    ok = bool(judged) and N > 0
    out = {"far": far, "at": _rate_basis(judged, default_only, far), "faces": N, "held_out": held_out,
           "evasion_rate": round(float(verdicts["evaded"].float().mean()), 5) if ok else None,
           "grey_patch_rate": round(float(verdicts["grey"].float().mean()), 5) if ok else None,
           "judged_by": judged, "surrogates": per, "notes": notes,
           "good_rate": GOOD_EVASION_RATE, "warn_below": APPLY_WARN_RATE}
    if t_ref is not None:
        out["impersonation_rate"] = round(float(verdicts["imp"].float().mean()), 5) if ok else None
        out["impersonation_rate_clean"] = round(float(verdicts["clean"].float().mean()), 5) if ok else None
    return out


def _pct(v: float) -> str:
    return f"{100 * v:.0f} %"


def validation_lines(validation: dict | None) -> list[str]:
    """Human lines on a validation record: the rate with what is good, then its notes.

    e.g. ``validation evasion 74 % at FAR 1e-2 on 40 held-out faces (good: > 80 %; a plain
    grey patch: 6 %)``.
    """
    if not validation:
        return ["no validation evasion rate was measured"]
    v = validation
    where = f"on {v.get('faces', 0)} {'held-out' if v.get('held_out') else 'training'} face(s)"
    rate = v.get("evasion_rate")
    good = v.get("good_rate", GOOD_EVASION_RATE)
    if rate is None:
        lines = [f"validation evasion: no rate {where} - no surrogate has a known threshold at FAR {v.get('far')}"]
    else:
        head = (f"validation evasion {_pct(rate)} at {v.get('at') or 'FAR ' + str(v.get('far'))} {where} "
                f"(good: > {_pct(good)}"
                + (f"; a plain grey patch: {_pct(v['grey_patch_rate'])}" if v.get("grey_patch_rate") is not None else "")
                + ")")
        if rate < good:
            head += ": train longer (higher --epochs; --resume continues this run) or on more photos"
        lines = [head]
        per = v.get("surrogates") or {}
        if len(v.get("judged_by") or []) > 1:
            lines.append("  per surrogate: " + ", ".join(
                f"{n} {_pct(r['evasion_rate'])}" for n, r in per.items() if r.get("evasion_rate") is not None))
    if v.get("impersonation_rate") is not None:
        clean = v.get("impersonation_rate_clean")
        lines.append(f"  impersonation of a training target reached on {_pct(v['impersonation_rate'])} of them"
                     + (f" (unpatched: {_pct(clean)})" if clean is not None else ""))
    lines += [f"  note: {n}" for n in v.get("notes") or []]
    return lines


# ----------------------------------------------------------------------------- sampling
class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch, seeded by (seed, epoch): resumable and reproducible."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def step_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of one training step of one process: differs across ranks and steps."""
    h = hashlib.sha256(f"facepriv-patch|{int(seed)}|{int(rank)}|{int(step)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------- state
def _atomic_json(path: Path, payload) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def save_train_state(out: Path, optimizer, *, epoch: int, step: int, history: list, fingerprint: str,
                     config: dict, batch: int = 0, partial: dict | None = None) -> None:
    """``epoch``: completed epochs; ``batch``: batches done in the next (incomplete) epoch, whose
    running loss sums are ``partial``."""
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    tmp = out / "train_state.safetensors.part"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / "train_state.safetensors")
    _atomic_json(out / "train_state.json", {
        "epoch": epoch, "batch": batch, "partial": partial or {}, "step": step, "history": history,
        "fingerprint": fingerprint,
        "param_groups": sd["param_groups"], "scalars": scalars, "config": config,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })


def load_train_state(out: Path, optimizer) -> dict:
    from safetensors.torch import load_file

    meta = json.loads((out / "train_state.json").read_text())
    tensors = load_file(str(out / "train_state.safetensors"))
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, d in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(d)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    return meta


# ----------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    out: Path
    epochs: int
    steps: int
    faces: int
    targets: int
    history: list[dict]
    elapsed: float
    resumed_from: int = 0  # completed epochs when the run was resumed
    resumed_from_step: int = 0
    validation: dict | None = None  # see validate_generator

    def to_json(self) -> dict:
        return {"out": str(self.out), "epochs": self.epochs, "steps": self.steps, "faces": self.faces,
                "targets": self.targets, "resumed_from_epoch": self.resumed_from,
                "resumed_from_step": self.resumed_from_step,
                "elapsed_s": round(self.elapsed, 2), "history": self.history, "validation": self.validation}

    def summary_lines(self) -> list[str]:
        """What ``patch train`` prints at the end about the validation (see :func:`validation_lines`)."""
        return validation_lines(self.validation)


class PatchTrainer:
    """Holds everything a training run needs; :meth:`fit` runs the epochs."""

    def __init__(self, cfg: PatchTrainConfig, *, device: str | torch.device | None = None, progress: bool = True,
                 surrogates=None, detector=None, autoencoder=None, prior=None):
        from accelerate import Accelerator

        from ..attacks.identity import SurrogateEnsemble
        from ..models import create_model

        self.cfg = cfg
        self.progress = progress
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cuda" and dev.index is not None:
            torch.cuda.set_device(dev)
        self.accelerator = Accelerator(cpu=dev is not None and dev.type == "cpu")
        self.device = self.accelerator.device
        self.out = Path(cfg.out).expanduser()
        self.region = get_region(cfg.generator.region, feather=cfg.generator.region_feather)
        self.surrogates = surrogates if surrogates is not None else SurrogateEnsemble(cfg.surrogates, device=self.device)
        self.surrogates.to(self.device).eval()
        for p in self.surrogates.parameters():
            p.requires_grad_(False)
        detector = detector if detector is not None else create_model(cfg.detector, device=self.device)
        cache_dir = self.out / "cache"
        show = progress and self.accelerator.is_main_process
        seen: dict = {}
        with self.accelerator.main_process_first():
            self.faces = build_face_set(cfg.data, cfg=cfg, detector=detector, cache_dir=cache_dir, kind="data",
                                        progress=show, device=self.device, detections=seen)
            self.targets = None
            if cfg.targets:
                self.targets = build_face_set(cfg.targets, cfg=cfg, detector=detector, cache_dir=cache_dir,
                                              kind="targets", one_face=True, progress=show, device=self.device,
                                              detections=seen)
        self.all_faces = self.faces
        self.target_ref = reference_embeddings(self.surrogates, self.targets, self.device) if self.targets else None
        self.palette = (load_palette(cfg.palette) if cfg.palette else default_palette()).to(self.device)
        self.generator = PatchGenerator(cfg.generator, autoencoder=autoencoder).to(self.device)
        self.prior = prior
        if self.prior is None and cfg.prior_unet and cfg.weights.prior > 0:
            if not cfg.generator.natural:
                raise ConfigError("the latent prior (--prior-unet) needs the natural mode (--natural)")
            self.prior = load_latent_prior(cfg.prior_unet, device=self.device)
        if self.prior is not None:
            self.prior.to(self.device)
        params = [p for n, p in self.generator.named_parameters() if not n.startswith("latent.")]
        for p in params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=(0.5, 0.999))
        self.use_split(held_out_photos(self.all_faces.files, fraction=cfg.val_fraction,
                                       max_photos=cfg.val_max_photos, seed=cfg.seed))
        self.validation: dict | None = None
        self.start_epoch, self.step, self.history = 0, 0, []
        self.start_batch, self.partial = 0, {}  # mid-epoch resume: batches already done, running sums
        self.resumed_from = self.resumed_from_step = 0
        self._model = None

    def use_split(self, held_out: set[str]) -> None:
        """Train on the faces of every photo but ``held_out``; validate on those (or, when
        there are none, on the training faces)."""
        train = [i for i, f in enumerate(self.all_faces.files) if f not in held_out]
        val = [i for i, f in enumerate(self.all_faces.files) if f in held_out]
        if not train:  # every photo held out (cannot happen with held_out_photos): train on all
            train, val = list(range(len(self.all_faces))), []
        self.held_out = set(held_out) if val else set()
        self.faces = self.all_faces if not val else self.all_faces.subset(train)
        self.val_faces = self.all_faces.subset(val) if val else None
        self.source_ref = reference_embeddings(self.surrogates, self.faces, self.device)
        cfg = self.cfg
        self.sampler = EpochSampler(len(self.faces), cfg.seed)
        self.loader = DataLoader(list(range(len(self.faces))), batch_size=cfg.batch_size, sampler=self.sampler,
                                 drop_last=len(self.faces) > cfg.batch_size)

    # -- one step, exposed for tests and for PGD-style use
    def placement_matrices(self, n: int, *, jitter: bool = True) -> torch.Tensor:
        lms = self.faces.landmarks(n, self.device)
        to_ref = photo_to_reference(lms)
        p2r = self.region.patch_to_reference(self.cfg.generator.patch_size, device=self.device).expand(n, 2, 3)
        if jitter:
            p2r = compose(random_placement_jitter(n, self.region, self.cfg.eot, device=self.device), p2r)
        return compose(invert_affine(to_ref), p2r)

    def batch_loss(self, idx: torch.Tensor, *, train: bool = True) -> dict[str, torch.Tensor]:
        from .placement import place_on_canvas

        cfg, dev = self.cfg, self.device
        idx = idx.to(torch.long).cpu()
        n = idx.numel()
        canvas = to_float(self.faces.canvases[idx], dev)
        src = to_float(self.faces.aligned[idx], dev)
        src_ref = {k: v[idx.to(v.device)] for k, v in self.source_ref.items()}
        tgt, tgt_ref, has_t = None, None, None
        if self.targets is not None:
            t_idx = torch.randint(0, len(self.targets), (n,))
            has_t = (torch.rand(n) >= cfg.evasion_prob).to(dev)
            tgt = to_float(self.targets.aligned[t_idx], dev)
            tgt_ref = {k: v[t_idx.to(v.device)] for k, v in self.target_ref.items()}
        model = self._model if self._model is not None else self.generator  # DDP-wrapped under accelerate
        patch, latent = model(src, tgt, has_t, return_latent=True)
        mask = self.region.patch_mask(cfg.generator.patch_size, device=dev)
        shown = color_jitter(patch, cfg.eot) if train else patch
        patched, _ = place_on_canvas(canvas, shown, self.region, self.placement_matrices(n, jitter=train))
        emb = self.surrogates.embed(patched, self.faces.landmarks(n, dev), image_index=torch.arange(n, device=dev))
        terms = patch_objective(emb, src_ref, tgt_ref, has_t, patch, cfg.weights, mask=mask, palette=self.palette,
                                latent=latent, prior=self.prior)
        with torch.no_grad():
            cs = [torch.nn.functional.cosine_similarity(emb[k], src_ref[k], dim=-1) for k in emb]
            terms["cos_source"] = torch.stack(cs).mean(0)
            if tgt_ref is not None:
                ct = [torch.nn.functional.cosine_similarity(emb[k], tgt_ref[k], dim=-1) for k in emb]
                terms["cos_target"] = torch.stack(ct).mean(0)
                terms["has_target"] = has_t
        return terms

    def resume(self) -> bool:
        if not (self.out / "train_state.json").is_file():
            return False
        meta = json.loads((self.out / "train_state.json").read_text())
        if meta.get("fingerprint") != self.cfg.fingerprint():
            raise ConfigError(f"{self.out} holds a training run with other settings; use another --out or the same "
                              "settings to resume")
        from ..core.saving import load_weights
        from .generator import GENERATOR_FORMAT, GENERATOR_WEIGHTS

        state = load_weights(self.out, GENERATOR_WEIGHTS, GENERATOR_FORMAT)
        missing, unexpected = self.generator.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("latent.")] or unexpected:
            raise ConfigError(f"{self.out}/generator.safetensors does not match this generator")
        if self.held_out and "val_fraction" not in (meta.get("config") or {}):
            self.use_split(set())  # a run started before validation existed: it trains on every face
        meta = load_train_state(self.out, self.optimizer)
        self.start_epoch, self.step, self.history = meta["epoch"], meta["step"], meta["history"]
        self.start_batch, self.partial = int(meta.get("batch", 0)), meta.get("partial") or {}
        self.resumed_from, self.resumed_from_step = self.start_epoch, self.step
        return True

    def _checkpoint(self, gen, opt, *, epoch: int, batch: int = 0, partial: dict | None = None) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            acc.unwrap_model(gen).save_pretrained(self.out)
            save_train_state(self.out, opt.optimizer if hasattr(opt, "optimizer") else opt, epoch=epoch,
                             step=self.step, history=self.history, fingerprint=self.cfg.fingerprint(),
                             config=_jsonable(self.cfg), batch=batch, partial=partial)

    def _seeded(self):
        """A context in which torch's RNG is seeded for the current step of this process."""
        from contextlib import contextmanager

        dev = self.device

        @contextmanager
        def ctx():
            devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(step_seed(self.cfg.seed, self.accelerator.process_index, self.step))
                yield

        return ctx()

    def fit(self, *, resume: bool = False) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        t0 = time.perf_counter()
        if resume:
            self.resume()
        self.out.mkdir(parents=True, exist_ok=True)
        gen, opt, loader = acc.prepare(self.generator, self.optimizer, self.loader)
        self._model = gen
        per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        todo = max(0, cfg.epochs - self.start_epoch)
        skip = min(self.start_batch, per_epoch) if todo else 0
        show = self.progress and acc.is_main_process
        with make_progress(enabled=show) as bar:
            task = bar.add_task("training patch generator", total=todo * per_epoch - skip)
            for epoch in range(self.start_epoch, cfg.epochs):
                self.sampler.set_epoch(epoch)
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(epoch)
                gen.train()
                sums: dict[str, float] = {}
                counts: dict[str, int] = {}
                if epoch == self.start_epoch and skip:
                    sums = {k: float(v) for k, v in self.partial.get("sums", {}).items()}
                    counts = {k: int(v) for k, v in self.partial.get("counts", {}).items()}
                for i, idx in enumerate(loader):
                    if i >= per_epoch:
                        break
                    if epoch == self.start_epoch and i < skip:
                        continue  # done before the interruption (same permutation: seeded by epoch)
                    with self._seeded():
                        terms = self.batch_loss(idx)
                    opt.zero_grad(set_to_none=True)
                    acc.backward(terms["total"])
                    if cfg.grad_clip:
                        acc.clip_grad_norm_(gen.parameters(), cfg.grad_clip)
                    opt.step()
                    self.step += 1
                    for k, v in terms.items():
                        if k in ("has_target",):
                            continue
                        v = v.detach()
                        if k == "cos_target" and "has_target" in terms:
                            sel = terms["has_target"]
                            if not bool(sel.any()):
                                continue
                            v = v[sel]
                        sums[k] = sums.get(k, 0.0) + float(v.float().sum() if v.dim() else v)
                        counts[k] = counts.get(k, 0) + (v.numel() if v.dim() else 1)
                    bar.update(task, advance=1, description=(
                        f"epoch {epoch + 1}/{cfg.epochs} loss {float(terms['total'].detach()):.3f} "
                        f"cos(src) {float(terms['cos_source'].mean()):.2f}"))
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and i + 1 < per_epoch:
                        self._checkpoint(gen, opt, epoch=epoch, batch=i + 1,
                                         partial={"sums": dict(sums), "counts": dict(counts)})
                rec = {"epoch": epoch + 1, "step": self.step, **{k: round(sums[k] / counts[k], 5) for k in sums}}
                self.history.append(rec)
                self._checkpoint(gen, opt, epoch=epoch + 1)
        if acc.is_main_process and todo == 0 and not (self.out / "generator.safetensors").is_file():
            acc.unwrap_model(gen).save_pretrained(self.out)
        if acc.is_main_process:
            self.validation = self.validate(acc.unwrap_model(gen))
            self.validation.update(epoch=cfg.epochs, step=self.step)
            from .generator import write_validation

            write_validation(self.out, self.validation)
        acc.wait_for_everyone()
        return TrainResult(self.out, cfg.epochs, self.step, len(self.faces), len(self.targets) if self.targets else 0,
                           self.history, time.perf_counter() - t0, self.resumed_from, self.resumed_from_step,
                           validation=self.validation)

    def validate(self, generator: PatchGenerator | None = None) -> dict:
        """The evasion rate of ``generator`` (default: the one being trained) on the held-out
        faces (or the training faces when none are held out); see :func:`validate_generator`."""
        held_out = self.val_faces is not None
        faces = self.val_faces if held_out else self.faces
        gen = generator if generator is not None else self.generator
        was_training = gen.training
        gen.eval()
        try:
            return validate_generator(gen, self.surrogates, faces, far=self.cfg.val_far, device=self.device,
                                      batch_size=max(self.cfg.batch_size, 16), held_out=held_out,
                                      targets=self.targets)
        finally:
            gen.train(was_training)


def _jsonable(cfg: PatchTrainConfig) -> dict:
    return json.loads(json.dumps(cfg.to_json(), default=str))


def train_patch_generator(cfg: PatchTrainConfig, *, device: str | torch.device | None = None, resume: bool = False,
                          progress: bool = True, **kwargs) -> TrainResult:
    """Train (or resume training) a generator; see the module docstring."""
    trainer = PatchTrainer(cfg, device=device, progress=progress, **kwargs)
    return trainer.fit(resume=resume)


__all__ = ["APPLY_WARN_RATE", "GOOD_EVASION_RATE", "FaceSet", "PatchTrainConfig", "PatchTrainer", "TrainResult",
           "build_face_set", "context_template", "held_out_photos", "step_seed", "train_patch_generator",
           "validate_generator", "validation_lines"]
