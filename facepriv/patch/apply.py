"""Applying a trained patch generator to photos: one forward pass per batch of faces.

For every face: align it to the ArcFace template at the generator's input size, run the
generator (with the target face's encoder features computed once, or none = evasion), and
paste the patch into the photo with :func:`facepriv.patch.placement.paste_patch` (single
resampling straight from patch pixels to photo pixels; everything outside the patch mask is
left bit-for-bit unchanged).

:func:`run_patch_apply` drives folders of photos through :func:`facepriv.core.batch.run_batch`
(per-file errors, manifest, ``--resume``, sharding by rank under ``accelerate launch`` /
torchrun / MPI, see :func:`facepriv.core.distributed.distributed_context`). It reads
``photo_batch`` photos ahead (in the order :func:`facepriv.core.batch.plan_batch` gives; load +
detect, each photo on its own, so a bad file only fails itself), patches the faces of all of
them with one :meth:`PatchApplier.apply_many` call (one generator pass per ``batch_size``
faces), and writes each photo with the steps of :func:`facepriv.core.photo.process_photo`
(``load_and_detect``, ``no_face_result``, ``save_edited``: face policy, atomic outputs that
never replace an input).

After a photo's faces are patched, each face is measured against every surrogate the
generator was trained with (named by its ``config.json``): the clean face against the patched
face (evasion) or the patched face against the target (impersonation), in the model's own
similarity units, at the thresholds of FAR :data:`VERIFY_FAR`. The manifest row gets
``attack`` (per face ``passed`` per model, None = no threshold known), which the batch summary
prints as per-face lines and a one-line verdict, as it does for ``protect``. ``verify=False``
in :class:`PatchApplyConfig` turns it off.

Before the first photo it warns once (:func:`generator_warning`) when the generator's own
validation rate, measured at the end of training and stored in its ``config.json``, is below
:data:`facepriv.patch.train.APPLY_WARN_RATE` or missing: an under-trained generator pastes
little more than a grey box.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.align import align_faces, landmarks_tensor
from ..core.batch import BatchSummary, check_outputs, InputItem, ItemResult, collect_inputs, plan_batch, run_batch
from ..core.distributed import distributed_context
from ..core.errors import ConfigError, NoFaceError
from ..core.faces import FacePolicy
from ..core.io import LoadedImage, load_image
from ..core.photo import SaveOptions, load_and_detect, no_face_result, save_edited
from ..core.saving import read_metadata
from .generator import GENERATOR_FORMAT, PatchGenerator, read_validation
from .placement import patch_to_photo, paste_patch


@dataclass
class PatchApplyConfig:
    generator: str
    target: str | None = None  # image of the identity to impersonate; None = evasion
    detector: str = "mtcnn"
    batch_size: int = 32  # faces per generator forward pass
    photo_batch: int = 8  # photos read ahead and patched with one apply_many call
    verify: bool = True  # measure every patched face against the generator's surrogates

    def __post_init__(self):
        if self.batch_size < 1 or self.photo_batch < 1:
            raise ConfigError("batch_size and photo_batch must be at least 1")


VERIFY_FAR = "1e-2"  # the false-accept rate of the thresholds the per-face verification uses


@dataclass
class PatchApplySummary(BatchSummary):
    """A batch summary plus what the per-face verification used (FAR, surrogates, thresholds)."""

    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**super().to_json(), "details": self.details}


def generator_surrogates(path: str | os.PathLike) -> list[str]:
    """The surrogates a generator folder was trained with: its validation record's models
    (``config.json``), else the training config in ``train_state.json``; [] when neither says."""
    import json

    path = Path(path).expanduser()
    try:
        meta = read_metadata(path, GENERATOR_FORMAT)
    except ConfigError:
        meta = {}
    v = meta.get("validation") if isinstance(meta, dict) else None
    if isinstance(v, dict) and isinstance(v.get("surrogates"), dict) and v["surrogates"]:
        return [str(n) for n in v["surrogates"]]
    try:
        state = json.loads((path / "train_state.json").read_text())
        names = (state.get("config") or {}).get("surrogates")
    except (OSError, ValueError, AttributeError):
        names = None
    return [str(n) for n in names] if isinstance(names, list) else []


def _load_surrogates(names: list[str], device):
    from ..attacks import SurrogateEnsemble

    return SurrogateEnsemble(names, device=device)


class PatchVerifier:
    """Per-face verification of patched photos against a surrogate ensemble (one forward per
    model per photo: the clean and the patched faces together)."""

    def __init__(self, ensemble, *, far: str = VERIFY_FAR, target_aligned: torch.Tensor | None = None):
        from ..attacks import AttackConfig
        from ..attacks.linf import surrogate_thresholds

        self.ensemble = ensemble.eval()
        self.far = far
        self.thresholds = surrogate_thresholds(ensemble, AttackConfig(far=far), required=False)
        self.metrics = {n: getattr(m.spec, "metric", None) or "cosine"
                        for n, m in zip(ensemble.names, ensemble.members)}
        self.target = None
        if target_aligned is not None:  # (1, 3, S, S) aligned to the ArcFace template at S
            from ..core.align import get_template

            tpl = get_template("arcface-112")
            S = target_aligned.shape[-1]
            pts = tpl.tensor(target_aligned.device) * torch.tensor([S / tpl.size[1], S / tpl.size[0]],
                                                                     device=target_aligned.device)
            with torch.no_grad():
                self.target = ensemble.reference(target_aligned, pts[None])

    @property
    def mode(self) -> str:
        return "impersonation" if self.target is not None else "dodging"

    @torch.no_grad()
    def __call__(self, clean: torch.Tensor, patched: torch.Tensor, landmarks: torch.Tensor) -> list[dict]:
        """Per face of one photo: ``{"face", "status", "mode", "passed": {model: bool | None}}``."""
        from ..models.recognition import similarity

        n = landmarks.shape[0]
        dev = patched.device
        lms = landmarks.to(dev, torch.float32).reshape(-1, 5, 2)
        if self.target is None:  # clean and patched faces in one batch per model
            imgs = torch.stack([clean.to(dev), patched])
            emb = self.ensemble.embed(imgs, torch.cat([lms, lms]),
                                      image_index=torch.arange(2, device=dev).repeat_interleave(n))
        else:
            emb = self.ensemble.embed(patched, lms)
        passed: dict[str, list] = {}
        for name, e in emb.items():
            t = self.thresholds.get(name)
            if t is None:
                passed[name] = [None] * n
                continue
            if self.target is None:
                sim = similarity(e[n:], e[:n], self.metrics[name])
                passed[name] = (sim < t).tolist()
            else:
                ref = self.target[name].to(e.device)
                sim = similarity(e, ref.expand_as(e), self.metrics[name])
                passed[name] = (sim >= t).tolist()
        return [{"face": i, "status": "attacked", "mode": self.mode,
                 "passed": {name: (None if v[i] is None else bool(v[i])) for name, v in passed.items()}}
                for i in range(n)]


class PatchApplier:
    """A loaded generator (+ target) that patches faces given by landmarks."""

    def __init__(self, generator: PatchGenerator | str | os.PathLike, *, target=None, detector=None,
                 device: str | torch.device = "cpu", batch_size: int = 32):
        self.device = torch.device(device)
        if not isinstance(generator, PatchGenerator):
            generator = PatchGenerator.from_pretrained(generator, device=self.device)
        self.generator = generator.to(self.device).eval()
        self.batch_size = max(1, int(batch_size))
        cfg = self.generator.config
        self.size = cfg.input_size
        self.region = self.generator.region
        self.target_aligned = None
        self.target_features = None
        if target is not None:
            self.set_target(target, detector=detector)

    def set_target(self, target, *, detector=None) -> None:
        """``target``: an image path, an RGB uint8 array, an aligned (3, S, S) tensor, or None
        (evasion)."""
        if target is None:
            self.target_aligned = self.target_features = None
            return
        if isinstance(target, torch.Tensor) and target.dim() == 3 and target.shape[-1] == self.size:
            aligned = target[None].to(self.device)
        else:
            if isinstance(target, (str, os.PathLike)):
                img = load_image(target)
                rgb = img.rgb
                x = img.to_tensor(self.device)
            else:
                rgb = np.asarray(target, dtype=np.uint8)
                x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div(255).to(self.device)
            if detector is None:
                from ..models import create_model

                detector = create_model("mtcnn", device=self.device)
            faces = detector.detect(rgb)
            if not faces:
                raise NoFaceError(f"no face found in the target image {target if isinstance(target, (str, os.PathLike)) else ''}")
            face = max(faces, key=lambda f: f.width * f.height)
            aligned = align_faces(x, landmarks_tensor([face], self.device), "arcface-112", size=(self.size, self.size)).crops
        self.target_aligned = aligned.clamp(0, 1)
        with torch.no_grad():
            self.target_features = self.generator.encode_target(self.target_aligned)

    @property
    def mode(self) -> str:
        return "impersonation" if self.target_features is not None else "evasion"

    @torch.no_grad()
    def patches_for(self, aligned: torch.Tensor) -> torch.Tensor:
        """Patches (N, 3, P, P) for aligned faces (N, 3, S, S), in batches of ``batch_size``."""
        out = []
        for i in range(0, aligned.shape[0], self.batch_size):
            out.append(self.generator(aligned[i: i + self.batch_size], target_features=self.target_features))
        if not out:
            P = self.generator.config.patch_size
            return aligned.new_zeros(0, 3, P, P)
        return torch.cat(out)

    @torch.no_grad()
    def apply(self, image: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Patch every face (landmarks (N, 5, 2)) of one photo (3, H, W) in [0, 1]."""
        return self.apply_many([image], [landmarks])[0]

    @torch.no_grad()
    def apply_many(self, images: list[torch.Tensor], landmarks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Patch the faces of many photos with one generator pass per ``batch_size`` faces."""
        if len(images) != len(landmarks):
            raise ValueError("one landmark tensor per image is needed")
        lms = [torch.as_tensor(lm, dtype=torch.float32, device=self.device).reshape(-1, 5, 2) for lm in landmarks]
        crops = [align_faces(img.to(self.device), lm, "arcface-112", size=(self.size, self.size)).crops
                 for img, lm in zip(images, lms) if lm.shape[0]]
        if not crops:
            return [img.clone() for img in images]
        patches = self.patches_for(torch.cat(crops))
        out, k = [], 0
        P = self.generator.config.patch_size
        for img, lm in zip(images, lms):
            n = lm.shape[0]
            if n == 0:
                out.append(img.clone())
                continue
            mats = patch_to_photo(self.region, P, lm)
            out.append(paste_patch(img.to(self.device), patches[k: k + n], self.region, mats))
            k += n
        return out

    def edit(self, x: torch.Tensor, faces, _loaded=None) -> torch.Tensor:
        """The edit function for :func:`facepriv.core.photo.process_photo`."""
        return self.apply(x, landmarks_tensor(faces, x.device))


def generator_warning(validation: dict | None, *, mode: str = "evasion", floor: float | None = None) -> str | None:
    """The warning ``patch apply`` prints before patching with a generator whose validation
    record (:func:`facepriv.patch.generator.read_validation`) says it rarely works, or that has
    none; None when the record is fine. ``mode``: ``impersonation`` judges the record's
    impersonation rate when it has one."""
    from .train import APPLY_WARN_RATE

    floor = APPLY_WARN_RATE if floor is None else floor
    retrain = ("train longer (`facepriv patch train` with the same --out, a higher --epochs and --resume) "
               "or on more photos")
    if not validation:
        return ("this generator has no validation evasion rate (trained by an older facepriv, its training did "
                "not finish, or its weights changed since): its patches may not protect anyone; retrain it, "
                "or check the results with `facepriv audit`")
    v = validation
    judged = ", ".join(v.get("judged_by") or []) or "its surrogates"
    faces = f"{v.get('faces', 0)} {'held-out' if v.get('held_out', True) else 'training'} validation faces"
    far = v.get("far", "1e-2")
    at = v.get("at") or f"FAR {far}"
    if mode == "impersonation" and v.get("impersonation_rate") is not None:
        rate = float(v["impersonation_rate"])
        if rate >= floor:
            return None
        return (f"this generator makes its training targets recognised by {judged} on only {100 * rate:.0f} % of "
                f"{faces} at {at}: the patches will probably not impersonate; {retrain}")
    rate = v.get("evasion_rate")
    if rate is None:
        return (f"this generator's evasion rate is unknown: none of its surrogates has a known threshold at FAR "
                f"{far}; check the results with `facepriv audit`")
    rate = float(rate)
    if rate >= floor:
        return None
    grey = v.get("grey_patch_rate")
    grey_text = f" (a plain grey patch: {100 * float(grey):.0f} %)" if grey is not None else ""
    return (f"this generator defeats its surrogates ({judged}) on only {100 * rate:.0f} % of {faces} at "
            f"{at}{grey_text}: its patches will probably not protect; {retrain}")


def _print_warning(text: str) -> None:
    from rich.text import Text

    from ..core.progress import stderr_console

    stderr_console.print(Text.assemble(("warning:", "yellow"), " ", text), soft_wrap=True)


def _stamp(path: str | os.PathLike | None) -> list | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(p.glob("*")) if f.is_file()]
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


class _Prepared:
    """One photo read ahead: loaded and detected (or the error that stopped it), then patched."""

    __slots__ = ("attack", "error", "faces", "img", "result", "timings")

    def __init__(self):
        self.error: BaseException | None = None
        self.img: LoadedImage | None = None
        self.faces: list = []
        self.result: LoadedImage | None = None
        self.timings: dict[str, float] = {}
        self.attack: list[dict] | None = None


class _BatchedPatcher:
    """The per-item ``process`` of :func:`run_patch_apply`, batching the generator across photos.

    When ``run_batch`` asks for an item that is not ready, the next ``photo_batch`` items of
    ``order`` (the items ``run_batch`` will ask for, in its order) are loaded and detected one
    by one - an unreadable file keeps its error and is reported when its turn comes - and all
    their faces are patched with one :meth:`PatchApplier.apply_many` call. Saving stays per
    item, so the manifest, ``--resume`` and Ctrl-C behave as for every other command.
    """

    def __init__(self, applier: PatchApplier, detector, *, policy: FacePolicy, save: SaveOptions,
                 device: torch.device, order: list[InputItem], photo_batch: int,
                 verifier: PatchVerifier | None = None):
        self.applier, self.detector, self.policy, self.save = applier, detector, policy, save
        self.verifier = verifier
        self.device = device
        self.order = order
        self.pos = {str(it.path): k for k, it in enumerate(order)}
        self.photo_batch = max(1, int(photo_batch))
        self.ready: dict[str, _Prepared] = {}

    def _prepare(self, item: InputItem) -> _Prepared:
        prep = _Prepared()
        try:
            prep.img, prep.faces, prep.timings = load_and_detect(item, detector=self.detector, policy=self.policy,
                                                                 max_pixels=self.save.max_pixels)
        except Exception as exc:  # noqa: BLE001 - re-raised for this item alone when run_batch asks for it
            prep.error, prep.img = exc, None
        return prep

    def _fill(self, item: InputItem) -> None:
        k = self.pos.get(str(item.path))
        window = [item] if k is None else [it for it in self.order[k: k + self.photo_batch]
                                           if str(it.path) not in self.ready]
        preps = {str(it.path): self._prepare(it) for it in window}
        todo = [(key, p) for key, p in preps.items() if p.error is None and p.faces]
        if todo:
            t = time.perf_counter()
            try:
                xs = [p.img.to_tensor(self.device) for _, p in todo]
                lms = [landmarks_tensor(p.faces, self.device) for _, p in todo]
                outs = self.applier.apply_many(xs, lms)
                for (_, p), y in zip(todo, outs):
                    p.result = p.img.with_pixels(y)
                n_faces = sum(len(p.faces) for _, p in todo)
                dt = time.perf_counter() - t
                for _, p in todo:  # the batch's time, shared by faces
                    p.timings["edit_s"] = round(dt * len(p.faces) / n_faces, 4)
                for (_, p), x, y, lm in zip(todo, xs, outs, lms):
                    self._verify(p, x, y, lm)
                del xs, outs
            except Exception:  # noqa: BLE001 - the batch failed (e.g. out of memory): photo by photo
                for _, p in todo:
                    t = time.perf_counter()
                    try:
                        x = p.img.to_tensor(self.device)
                        lm = landmarks_tensor(p.faces, self.device)
                        y = self.applier.apply(x, lm)
                        p.result = p.img.with_pixels(y)
                    except Exception as exc:  # noqa: BLE001
                        p.error = exc
                    p.timings["edit_s"] = round(time.perf_counter() - t, 4)
                    if p.error is None:
                        self._verify(p, x, y, lm)
        self.ready.update(preps)

    def _verify(self, prep: _Prepared, x: torch.Tensor, y: torch.Tensor, lm: torch.Tensor) -> None:
        """The per-face verification of one patched photo; a failure here never loses the photo."""
        if self.verifier is None:
            return
        t = time.perf_counter()
        try:
            prep.attack = self.verifier(x, y, lm)
        except Exception as exc:  # noqa: BLE001 - the photo is patched; only its verdict is missing
            prep.attack = [{"face": i, "status": "skipped", "mode": self.verifier.mode,
                            "reason": f"verification failed: {exc}"} for i in range(len(prep.faces))]
        prep.timings["verify_s"] = round(time.perf_counter() - t, 4)

    def __call__(self, item: InputItem, dst: Path) -> ItemResult:
        key = str(item.path)
        if key not in self.ready:
            self._fill(item)
        prep = self.ready.pop(key)
        if prep.error is not None:
            raise prep.error
        timings = dict(prep.timings)
        extra = {"mode": self.applier.mode}
        if not prep.faces:
            return no_face_result(item, dst, prep.img, policy=self.policy, save=self.save, timings=timings,
                                  extra=extra)
        res = save_edited(prep.result, dst, prep.faces, save=self.save, timings=timings, extra=extra)
        if prep.attack is not None:
            res.extra["attack"] = prep.attack
        return res


def run_patch_apply(inputs: list[str | Path], out: str | Path, cfg: PatchApplyConfig, *,
                    policy: FacePolicy | None = None, save: SaveOptions | None = None,
                    device: str | torch.device = "cpu", glob: str | None = None, resume: bool = False,
                    output_suffix: str | None = None, progress: bool = True, verbose: bool = False,
                    detector=None, warn: bool = True, surrogates=None) -> PatchApplySummary:
    """Patch every face of every input photo, mirroring the inputs under ``out``.

    ``detector``: a face detector object to use instead of ``create_model(cfg.detector)``.
    ``warn``: print :func:`generator_warning` (once, on stderr, before any photo) when the
    generator's validation rate is low or missing.
    ``surrogates``: a :class:`facepriv.attacks.SurrogateEnsemble` (or model names) to verify the
    patched faces with instead of the generator's own surrogates (``cfg.verify``).
    """
    from ..models import create_model

    policy = policy or FacePolicy()
    save = save or SaveOptions()
    out = Path(out)
    gen_dir = Path(cfg.generator).expanduser()
    try:
        read_metadata(gen_dir, GENERATOR_FORMAT)  # before any work: the folder is a saved generator
    except ConfigError as exc:
        raise ConfigError(f"--generator: {exc}") from None
    if cfg.target is not None and not Path(cfg.target).is_file():
        raise ConfigError(f"--target {cfg.target}: no such image")
    items = collect_inputs(inputs, glob=glob, exclude=[out])
    check_outputs(items, out, output_suffix)  # before any model loads
    # accelerate / torchrun / MPI, the same rule as protect and deid
    rank, world, device = distributed_context(None, None, torch.device(device))
    if warn and rank == 0:
        text = generator_warning(read_validation(gen_dir), mode="impersonation" if cfg.target else "evasion")
        if text:
            _print_warning(text)
    if detector is None:
        detector = create_model(cfg.detector, device=device)
    applier = PatchApplier(gen_dir, target=cfg.target, detector=detector, device=device, batch_size=cfg.batch_size)

    verifier, details = None, {}
    if cfg.verify:
        if surrogates is None:
            surrogates = generator_surrogates(gen_dir)
        if isinstance(surrogates, (list, tuple)):
            surrogates = _load_surrogates(list(surrogates), device) if surrogates else None
        if surrogates is not None:
            verifier = PatchVerifier(surrogates, target_aligned=applier.target_aligned)
            details = {"far": verifier.far, "surrogates": list(surrogates.names),
                       "thresholds": dict(verifier.thresholds)}
        elif warn and rank == 0:
            _print_warning("the generator's config names no surrogates: the patched faces are not verified")

    # batch_size / photo_batch change how faces are grouped, not the outputs: a resumed run may
    # change them; verify only changes what the manifest records
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("batch_size", "photo_batch", "verify")}
    config = {"command": "patch apply", **settings, "generator_files": _stamp(gen_dir / "generator.safetensors"),
              "target_file": _stamp(cfg.target), "policy": asdict(policy), "save": asdict(save),
              "suffix": output_suffix}
    # the items run_batch will ask for, in its order, for reading ahead
    order = plan_batch(items, out, config, resume=resume, rank=rank, world_size=world).todo
    process = _BatchedPatcher(applier, detector, policy=policy, save=save, device=device, order=order,
                              photo_batch=cfg.photo_batch, verifier=verifier)
    summary = run_batch(items, process, out_dir=out, config=config, resume=resume, output_suffix=output_suffix,
                        description=f"patch ({applier.mode})", progress=progress, verbose=verbose,
                        command="patch apply", rank=rank, world_size=world)
    return PatchApplySummary(**vars(summary), details=details)
