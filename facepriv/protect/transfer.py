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

import dataclasses
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..attacks import SurrogateEnsemble
from ..attacks.transfer import TransferConfig, transfer_attack
from ..core.errors import ConfigError
from ..core.faces import Face, FaceDetector
from ..core.io import IMAGE_SUFFIXES, LoadedImage, load_image

OFFLINE_RECOGNISERS = ("dlib-resnet", "facenet-casia", "sface")


@dataclass
class TransferOptions:
    """What ``protect --method transfer`` does besides the attack settings (``attack``)."""

    surrogates: list[str] | None = None  # None: the offline recognisers that are not judges
    verify_with: str | list[str] = "loo"
    person: str | None = None
    identity_folders: bool = False
    attack: TransferConfig = field(default_factory=TransferConfig)

    def __post_init__(self):
        if isinstance(self.attack, dict):
            names = {f.name for f in dataclasses.fields(TransferConfig)}
            unknown = sorted(set(self.attack) - names)
            if unknown:
                raise ConfigError(f"unknown transfer option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
            self.attack = TransferConfig(**self.attack)
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

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "attack": self.attack.to_json()}


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

    def __init__(self, opts: TransferOptions, device, detector: FaceDetector | None, progress=None):
        self.opts = opts
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
        self._person_cache: dict[str, dict[str, list]] = {}

    def __call__(self, x: torch.Tensor, faces: list[Face], loaded: LoadedImage | None = None) -> torch.Tensor:
        path = getattr(loaded, "path", None)
        # a stable choice per file name: the same photo gets the same judge on a rerun or a shard
        turn = zlib.crc32(Path(path).name.encode()) if path is not None else self.turn
        self.turn += 1
        surr, judges = self.rotation[turn % len(self.rotation)]
        levels = 65535 if loaded is not None and loaded.bit_depth > 8 else 255
        cfg = dataclasses.replace(self.opts.attack, quantize=levels)
        person = self.person_embeddings(path)
        res = transfer_attack(x, faces, _group(self.models, surr), cfg, checkers=_group(self.models, judges),
                              person=person, progress=self.progress)
        self.last_result, self.last_roles = res, (surr, judges)
        return res.image

    def person_embeddings(self, path: Path | None) -> dict[str, torch.Tensor] | None:
        """Embeddings of the person's *other* photos (``--person`` or the photo's folder), per model."""
        folder = Path(self.opts.person).expanduser() if self.opts.person else (
            Path(path).parent if self.opts.identity_folders and path is not None else None)
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

    @torch.no_grad()
    def _embed_folder(self, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
        from ..core.align import landmarks_tensor

        if self.detector is None:
            raise ConfigError("a face detector is needed to read the person's photos")
        out = {}
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not p.name.startswith("."))
        for p in files:
            try:
                img = load_image(p)
            except Exception:  # noqa: BLE001 - a bad reference photo is left out, not fatal
                continue
            found = self.detector.detect(img.rgb)
            if not found:
                continue
            face = max(found, key=lambda f: f.width * f.height)
            x = img.to_tensor(self.device)
            lm = landmarks_tensor([face], x.device)
            grp = _group(self.models, list(self.models))
            out[str(p.resolve())] = {k: v.detach() for k, v in grp.embed(x, lm).items()}
        return out


def build_transfer_editor(opts: TransferOptions, device, detector: FaceDetector | None, progress=None) -> TransferEditor:
    """Load every surrogate and judge once; return the per-photo edit function."""
    return TransferEditor(opts, device, detector, progress=progress)
