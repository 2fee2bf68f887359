"""The one model registry every facepriv command loads models through.

Each :class:`ModelSpec` says what a model is (task, architecture, input size, alignment
template, normalisation, embedding size and comparison, thresholds, licence) and where its
weights come from (one or more :mod:`~facepriv.models.sources`). ``create_model(name)``
resolves the weights (user path > imported copy > cached/installed > download), converts them
once into a safetensors cache when the original format is not torch's, and returns a ready
module.

Model files register themselves with :func:`register` when :mod:`facepriv.models` is imported.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError
from ..core.io import atomic_write_bytes, current_umask, finalize_output
from . import hub
from .sources import NotAvailableError, Source, UserFile

TASKS = ("detector", "recognition", "expression", "score", "autoencoder", "inpainting", "metric")


class UnknownModelError(ConfigError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class LoadContext:
    """What a model's loader gets: the resolved weights and helpers to cache conversions."""

    spec: ModelSpec
    path: Path | None
    source: Source | None
    device: torch.device
    options: dict[str, Any] = field(default_factory=dict)

    def cached_state_dict(self, convert: Callable[[Path], Mapping[str, torch.Tensor]],
                          version: str = "1") -> dict[str, torch.Tensor]:
        """Convert the source file into a torch state dict once; later loads read safetensors.

        The cache key is the source's digest (or the file's size+mtime for user files) and the
        converter ``version``, so new weights or a fixed converter never reuse a stale cache.
        """
        from safetensors.torch import load_file, save_file

        if self.path is None:
            raise NotAvailableError(f"{self.spec.name}: no weights to convert")
        key = (self.source.digest if self.source is not None and self.source.digest else None)
        if key is None:
            st = self.path.stat()
            key = f"user-{st.st_size}-{st.st_mtime_ns}"
        key = "".join(c if c.isalnum() else "-" for c in key)[:48]
        out = hub.home() / "converted" / self.spec.name / f"{key}-v{version}.safetensors"
        if out.is_file():
            return load_file(str(out))
        state = {k: v.detach().contiguous().cpu() for k, v in convert(self.path).items()}
        out.parent.mkdir(parents=True, exist_ok=True)
        # A private temporary name per writer (several processes may convert at once, e.g.
        # accelerate ranks sharing FACEPRIV_HOME); the last rename wins with identical content.
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
        os.close(fd)
        try:
            save_file(state, tmp, metadata={"model": self.spec.name,
                                            "source": self.source.describe() if self.source else str(self.path)})
            finalize_output(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return state


@dataclass(frozen=True)
class ModelSpec:
    """Everything facepriv knows about a named model."""

    name: str
    task: str
    architecture: str
    description: str
    license: str
    sources: tuple[Source, ...]
    loader: Callable[[LoadContext], Any]
    input_size: tuple[int, int] | None = None  # (height, width)
    template: str | None = None  # alignment template name (facepriv.core.align.TEMPLATES)
    normalization: str | None = None  # human-readable, e.g. "(x*255-127.5)/128"
    embedding_size: int | None = None
    metric: str | None = None  # "cosine" or "euclidean" for recognition models
    # Similarity thresholds, "higher = same person" convention (euclidean: negative distance),
    # keyed by false-accept rate ("1e-1", "1e-2", "1e-3") or "default".
    thresholds: Mapping[str, float] = field(default_factory=dict)
    threshold_source: str | None = None
    # "protocol": published values that define a benchmark protocol (they win over a stored
    # calibration); "shipped": calibrated by facepriv on a public set (LFW) as a default, so a
    # user's own `facepriv audit calibrate` takes precedence
    threshold_kind: str = "protocol"
    labels: tuple[str, ...] = ()
    differentiable: bool = True
    runtime: str = "torch"  # "torch" or "onnxruntime"
    size_bytes: int | None = None
    reference: str | None = None  # paper / upstream project
    aliases: tuple[str, ...] = ()

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"{self.name}: unknown task {self.task!r}")


_REGISTRY: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def _ensure_loaded() -> None:
    from . import zoo  # noqa: F401 - registers every built-in model


def get_spec(name: str) -> ModelSpec:
    _ensure_loaded()
    name = _ALIASES.get(name, name)
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " Run `facepriv models list`."
        raise UnknownModelError(f"unknown model {name!r}.{hint}") from None


def list_models(task: str | None = None) -> list[ModelSpec]:
    _ensure_loaded()
    return [s for s in _REGISTRY.values() if task is None or s.task == task]


# --------------------------------------------------------------------------- imports
def _imports_file() -> Path:
    return hub.home() / "imported" / "imports.json"


def _read_imports() -> dict[str, str]:
    try:
        return json.loads(_imports_file().read_text())
    except (OSError, ValueError):
        return {}


def import_model(name: str, path: str | os.PathLike, *, copy: bool = True) -> Path:
    """Register a local copy of a model's weights (for air-gapped machines).

    When the spec pins a sha256 for a single-file source, the file must match it.
    """
    spec = get_spec(name)
    src = Path(path).expanduser().resolve()
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    pinned = [s for s in spec.sources if getattr(s, "sha256", None)]
    # A file source without a published digest (or a user file) accepts any file.
    unpinned = any(s.kind in ("url", "user") and getattr(s, "sha256", None) is None for s in spec.sources)
    if src.is_file() and pinned and not unpinned:
        got = hub.sha256_file(src)
        if all(not got.startswith(s.sha256) for s in pinned):
            raise hub.ChecksumError(
                f"{src} (sha256 {got}) is not the file {name} expects "
                f"({', '.join(s.sha256 for s in pinned)})"
            )
    dst = src
    if copy:
        dst = hub.home() / "imported" / spec.name / src.name
        if dst.resolve() != src:  # re-importing the imported copy itself keeps it as it is
            if src.is_dir():
                staging = Path(tempfile.mkdtemp(prefix=f".{src.name}.", dir=_mkdir(dst.parent)))
                os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's 0700 would make it private
                try:
                    shutil.copytree(src, staging, dirs_exist_ok=True)
                    if dst.exists():
                        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
                    os.replace(staging, dst)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
            else:
                if dst.is_dir():
                    shutil.rmtree(dst)
                hub.atomic_copy(src, dst)  # replaces an older copy only once the new one is complete
    table = _read_imports()
    table[spec.name] = str(dst)
    # a private temporary name per writer, then an atomic rename (concurrent imports never mix)
    atomic_write_bytes(_imports_file(), json.dumps(table, indent=1).encode())
    return dst


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def imported_path(name: str) -> Path | None:
    p = _read_imports().get(name)
    return Path(p) if p and Path(p).exists() else None


# --------------------------------------------------------------------------- resolution
@dataclass
class Availability:
    available: bool
    where: str  # human description of the source in use / to be used
    source: Source | None
    path: Path | None

    @property
    def short(self) -> str:
        if self.source is None:
            return "imported" if self.where.startswith("imported") else self.where[:32]
        return self.source.short()

    @property
    def status(self) -> str:
        """``yes`` (usable offline now), ``download`` or ``needs file`` (no public download)."""
        if self.available:
            return "yes"
        return "needs file" if isinstance(self.source, UserFile) else "download"


def availability(spec: ModelSpec | str) -> Availability:
    """Is the model usable right now without the network, and from where?"""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    imp = imported_path(spec.name)
    if imp is not None:
        return Availability(True, f"imported: {imp}", None, imp)
    for src in spec.sources:
        path = src.local_path()
        if path is not None:
            return Availability(True, src.describe(), src, path)
    first = next((s for s in spec.sources if not isinstance(s, UserFile)), spec.sources[0] if spec.sources else None)
    return Availability(False, first.describe() if first else "built in", first, None)


def resolve_weights(spec: ModelSpec, *, path: str | os.PathLike | None = None, download: bool = True,
                    progress: bool = True) -> tuple[Path | None, Source | None]:
    """Find the weights: explicit path > imported > local source > first fetchable source."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"weights for {spec.name} not found at {p}")
        return p, None
    if not spec.sources:
        return None, None
    avail = availability(spec)
    if avail.available:
        return avail.path, avail.source
    errors = []
    offline = False
    for src in spec.sources:
        if isinstance(src, UserFile) and len(spec.sources) > 1:
            continue
        try:
            return src.resolve(what=spec.name, download=download, progress=progress), src
        except hub.OfflineError as exc:
            errors.append(str(exc))
            offline = True
            if hub.is_offline():
                break
        except NotAvailableError as exc:
            errors.append(str(exc))
    if not errors:
        errors = [str(NotAvailableError(f"{spec.name}: not on this machine"))]
    # OfflineError only when the network was what failed; a model with no download at all
    # (a user-supplied checkpoint) is "not available" whatever the offline switch says
    raise (hub.OfflineError if offline and hub.is_offline() else NotAvailableError)(" | ".join(errors))


def fetch(name: str, *, progress: bool = True) -> Path | None:
    """Make a model available offline (download / extract / convert) and return its path."""
    spec = get_spec(name)
    path, _ = resolve_weights(spec, download=True, progress=progress)
    # Build once so converted weights are cached as safetensors.
    create_model(spec.name, device="cpu")
    return path


def create_model(name: str, *, device: str | torch.device = "cpu", weights: str | os.PathLike | None = None,
                 download: bool = True, progress: bool = True, **options: Any) -> Any:
    """Build the named model with its weights, on ``device``, in eval mode.

    ``weights`` overrides every source with a local file or folder.
    """
    spec = get_spec(name)
    path, source = resolve_weights(spec, path=weights, download=download, progress=progress)
    ctx = LoadContext(spec=spec, path=path, source=source, device=torch.device(device), options=options)
    model = spec.loader(ctx)
    if isinstance(model, torch.nn.Module):
        model = model.to(ctx.device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return model
