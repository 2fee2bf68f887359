"""``--method transfer``: noise made to hold against recognisers it never saw, with a held-out verdict.

    >>> from facepriv.protect.transfer import TransferOptions, build_transfer_editor
    >>> edit = build_transfer_editor(TransferOptions(), device, detector)
    >>> process_photo(item, dst, detector=detector, policy=policy, edit=edit, save=save)

Who optimises and who judges (``verify_with``):

* ``"loo"`` (default): leave-one-out over the offline recognisers (dlib-resnet, facenet-casia,
  sface). Each photo holds one of them out, in turn, as its judge, and is protected against the
  others; the judge decides the budget escalation and gives the verdict. Over a batch every
  recogniser serves as a judge.
* ``"none"``: every offline recogniser is a surrogate; escalation and the verdict use the
  surrogates themselves (not a transfer verdict: say so).
* model names (``"arcface-r100"``, an imported model): those judge; every offline recogniser
  that is not a judge is a surrogate. A judge is never a surrogate.

``person`` names a folder of photos of the person being protected (or ``identity_folders``: each
photo's own folder): their embeddings define the identity the faces are pushed away from, and
the verdict compares the protected face with these *other* photos as well as with its original.
The attack is :func:`facepriv.attacks.transfer.transfer_attack`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..attacks import SurrogateEnsemble
from ..attacks.transfer import TransferConfig, transfer_attack
from ..attacks.config import levels_for
from ..core.config import ConfigBase
from ..core.errors import ConfigError, ProtectionFailed
from ..core.faces import Face, FaceDetector
from ..core.io import IMAGE_SUFFIXES, LoadedImage, load_image

OFFLINE_RECOGNISERS = ("dlib-resnet", "facenet-casia", "sface")


@dataclass
class TransferOptions(ConfigBase):
    """What ``protect --method transfer`` does besides the attack settings (``attack``)."""

    config_name = "transfer option"

    surrogates: list[str] | None = None  # None: the offline recognisers that are not judges
    verify_with: str | list[str] = "loo"
    person: str | None = None
    identity_folders: bool = False
    shared_pattern: bool = True  # per-person mode: start every photo from the person's shared pattern
    attack: TransferConfig = field(default_factory=TransferConfig)

    def __post_init__(self):
        if isinstance(self.attack, dict):
            self.attack = TransferConfig.from_dict(self.attack)
        self.attack.validate()
        if isinstance(self.verify_with, str) and self.verify_with not in ("loo", "none"):
            self.verify_with = [v.strip() for v in self.verify_with.split(",") if v.strip()]
        if self.person is not None and not Path(self.person).expanduser().is_dir():
            raise ConfigError(f"--person {self.person}: not a folder of photos of the person")
        if self.person and self.identity_folders:
            raise ConfigError("--person and --identity-folders: give one of them")

    def roles(self) -> list[tuple[list[str], list[str]]]:
        """The (surrogates, judges) rotation: one entry per photo in turn."""
        if self.verify_with == "loo":
            pool = self.surrogates or list(OFFLINE_RECOGNISERS)
            if len(pool) < 2:
                raise ConfigError("leave-one-out verification needs at least two recognisers (--surrogates)")
            return [([m for m in pool if m != j], [j]) for j in pool]
        judges = [] if self.verify_with == "none" else list(self.verify_with)
        surr = self.surrogates or [m for m in OFFLINE_RECOGNISERS if m not in judges]
        clash = sorted(set(surr) & set(judges))
        if clash:
            raise ConfigError(f"{', '.join(clash)} cannot both optimise and judge: a judge is never a surrogate")
        if not surr:
            raise ConfigError("no surrogate left to optimise against")
        return [(surr, judges)]


def _load(names, device) -> dict[str, torch.nn.Module]:
    from ..models import create_model, get_spec

    out = {}
    for n in names:
        spec = get_spec(n)
        if spec.task != "recognition":
            raise ConfigError(f"{n!r} is a {spec.task} model, not a face-recognition model")
        out[n] = create_model(n, device=device)
    return out


def _group(models: dict, names: list[str]) -> SurrogateEnsemble | None:
    return SurrogateEnsemble(names, models=[models[n] for n in names]) if names else None


class TransferEditor:
    """The ``EditFn`` of ``--method transfer``; ``last_result`` keeps the latest report."""

    def __init__(self, opts: TransferOptions, device, detector: FaceDetector | None, progress=None, *,
                 output_suffix: str | None = None, quality: int = 95):
        self.opts = opts
        self.output_suffix, self.quality = output_suffix, quality
        self.rotation = opts.roles()
        names = sorted({n for s, j in self.rotation for n in (*s, *j)})
        self.models = _load(names, device)
        for s, _j in self.rotation:
            for n in s:
                if not getattr(self.models[n].spec, "differentiable", True):
                    raise ConfigError(f"surrogate {n!r} has no gradients; use it with --verify-with instead")
        self.detector = detector
        self.device = torch.device(device)
        self.progress = progress
        self.turn = 0
        self.last_result = None
        self.last_roles: tuple[list[str], list[str]] | None = None
        self._person_cache: dict[str, dict[str, dict]] = {}
        self._patterns: dict[tuple, object] = {}
        self._faces: dict[str, list] = {}

    def __call__(self, x: torch.Tensor, faces: list[Face], loaded: LoadedImage | None = None) -> torch.Tensor:
        path = getattr(loaded, "path", None)
        folder = self.person_folder(path)
        # a stable choice per file name (per person in person mode, so that the person's shared
        # pattern never saw the judge): the same photo gets the same judge on a rerun or a shard
        key = folder.name if folder is not None else (Path(path).name if path is not None else None)
        turn = zlib.crc32(key.encode()) if key is not None else self.turn
        self.turn += 1
        surr, judges = self.rotation[turn % len(self.rotation)]
        levels = levels_for(loaded)
        cfg = self.opts.attack.replace(quantize=levels)
        person = self.person_embeddings(path)
        pattern = self.pattern_for(folder, surr) if folder is not None and self.opts.shared_pattern else None
        res = transfer_attack(x, faces, _group(self.models, surr), cfg, checkers=_group(self.models, judges),
                              person=person, pattern=pattern, progress=self.progress)
        self.last_result, self.last_roles = res, (surr, judges)
        self._last = (x.detach(), faces, person)
        ProtectionFailed.check(res.per_face, "protect transfer")  # an unprotected face fails the photo
        return self.fit_codec(x, res.image, faces, loaded)

    def fit_codec(self, x: torch.Tensor, y: torch.Tensor, faces: list[Face], loaded: LoadedImage | None) -> torch.Tensor:
        """Keep the face-region PSNR floor in a lossy output: a JPEG / WebP encoding adds its own
        error, so the change is shrunk (3 % at a time) until the *encoded* faces hold the floor."""
        import io as _io

        import numpy as np
        from PIL import Image

        from ..attacks.budget import masked_psnr
        from ..core.io import encode_image, output_format
        from ..core.regions import region_mask

        if loaded is None or loaded.path is None:
            return y
        fmt = output_format(Path("out" + (self.output_suffix or Path(loaded.path).suffix)), fallback=loaded.format)
        if fmt not in ("JPEG", "WEBP"):
            return y
        cfg = self.opts.attack
        masks = []
        for f in faces:
            r = region_mask(f, tuple(x.shape[-2:]), region=cfg.region, feather=cfg.feather, device=x.device)
            if r is not None:
                m = torch.zeros(1, *x.shape[-2:], device=x.device)
                m[:, r.y0:r.y1, r.x0:r.x1] = r.mask
                masks.append(m)
        for _ in range(12):
            data = encode_image(loaded.with_pixels(y), fmt, quality=self.quality)
            dec = np.asarray(Image.open(_io.BytesIO(data)).convert("RGB"))
            z = torch.from_numpy(dec.copy()).to(x.device).permute(2, 0, 1).float() / 255.0
            if all(masked_psnr(z, x, m) >= cfg.min_psnr for m in masks):
                return y
            y = x + (y - x) * 0.97
        return y

    def verify_saved(self, path: str | Path) -> None:
        """Re-measure the last photo's verdicts and face PSNR on the file as saved (after its
        encoding) and update ``last_result.per_face`` in place (``verified_on: "saved file"``)."""
        from ..attacks.budget import masked_psnr
        from ..attacks.linf import surrogate_thresholds
        from ..attacks.transfer import _far_cfg, face_verdicts
        from ..core.align import landmarks_tensor
        from ..core.regions import region_mask

        x, faces, person = self._last
        rows = [r for r in self.last_result.per_face if r.get("status") in ("attacked", "failed")]
        if not rows:
            return
        saved = load_image(path).to_tensor(x.device)
        if saved.shape != x.shape:
            return  # resized on save: the verdict stays the one measured before saving
        surr, judges = self.last_roles
        groups = [("surrogate", _group(self.models, surr))] + ([("held-out", _group(self.models, judges))]
                                                              if judges else [])
        thr: dict = {}
        for _role, g in groups:
            thr.update(surrogate_thresholds(g, _far_cfg(self.opts.attack), required=False))
        chosen = [faces[r["face"]] for r in rows]
        verdicts = face_verdicts(groups, x, saved, landmarks_tensor(chosen, x.device), thr, person)
        for r, v, f in zip(rows, verdicts, chosen):
            reg = region_mask(f, tuple(x.shape[-2:]), region=self.opts.attack.region,
                              feather=self.opts.attack.feather, device=x.device)
            mask = torch.zeros(1, *x.shape[-2:], device=x.device)
            mask[:, reg.y0:reg.y1, reg.x0:reg.x1] = reg.mask
            r.update(v if v["person_similarity"] else {"similarity": v["similarity"]})
            r["face_psnr"] = round(masked_psnr(saved, x, mask), 3)
            r["verified_on"] = "saved file"

    def person_folder(self, path: Path | None) -> Path | None:
        """The folder of the person's photos: ``--person``, or the photo's own with identity folders."""
        if self.opts.person:
            return Path(self.opts.person).expanduser()
        return Path(path).parent if self.opts.identity_folders and path is not None else None

    def pattern_for(self, folder: Path, surrogates: list[str]):
        """The person's shared pattern (computed once per person, against this photo's surrogates)."""
        from ..attacks.transfer import person_pattern

        key = (str(folder.resolve()), tuple(surrogates))
        if key not in self._patterns:
            samples = [(load_image(p).to_tensor(self.device), f) for p, f in self._faces_in(folder)[:8]]
            if not samples:
                return None
            self._patterns[key] = person_pattern(samples, _group(self.models, list(surrogates)), self.opts.attack,
                                                 progress=self.progress)
        return self._patterns[key]

    def person_embeddings(self, path: Path | None) -> dict[str, torch.Tensor] | None:
        """Embeddings of the person's *other* photos (``--person`` or the photo's folder), per model."""
        folder = self.person_folder(path)
        if folder is None:
            return None
        key = str(folder.resolve())
        if key not in self._person_cache:
            self._person_cache[key] = self._embed_folder(folder)
        entries = self._person_cache[key]
        me = Path(path).resolve() if path is not None else None
        rows = [e for p, e in entries.items() if p != str(me)]
        if not rows:
            return None
        return {n: torch.cat([r[n] for r in rows], 0) for n in self.models}

    def _faces_in(self, folder: Path) -> list[tuple[Path, Face]]:
        """(photo, its largest face) for every readable photo of the folder with a face (cached)."""
        key = str(folder.resolve())
        if key not in self._faces:
            if self.detector is None:
                raise ConfigError("a face detector is needed to read the person's photos")
            found = []
            for p in sorted(q for q in folder.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES
                            and not q.name.startswith(".")):
                try:
                    faces = self.detector.detect(load_image(p).rgb)
                except Exception:  # noqa: BLE001 - a bad reference photo is left out, not fatal
                    continue
                if faces:
                    found.append((p, max(faces, key=lambda f: f.width * f.height)))
            self._faces[key] = found
        return self._faces[key]

    @torch.no_grad()
    def _embed_folder(self, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
        from ..core.align import landmarks_tensor

        out = {}
        grp = _group(self.models, list(self.models))
        for p, face in self._faces_in(folder):
            x = load_image(p).to_tensor(self.device)
            out[str(p.resolve())] = {k: v.detach() for k, v in grp.embed(x, landmarks_tensor([face], x.device)).items()}
        return out


def build_transfer_editor(opts: TransferOptions, device, detector: FaceDetector | None, progress=None, *,
                          output_suffix: str | None = None, quality: int = 95) -> TransferEditor:
    """Load every surrogate and judge once; return the per-photo edit function (``output_suffix``
    and ``quality``: how photos will be saved, so a lossy output still holds the PSNR floor)."""
    return TransferEditor(opts, device, detector, progress=progress, output_suffix=output_suffix, quality=quality)
