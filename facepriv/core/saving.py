"""One save format for trained networks (MAP score network, patch generator, k-same pool).

A saved network is a folder holding

* a metadata file (``config.json`` unless the :class:`SaveFormat` names another)::

      {"format": <kind>, "version": N, "config": {<the settings' fields>}, ...extra}

* its weights as safetensors files, each stamped with the same format and version,
* whatever else the writer adds (a diffusers ``unet/``, an autoencoder, a region mask).

:func:`save_network` writes everything into a temporary sibling folder, fsyncs it and renames
it into place, so a reader never sees half a folder. When the folder already exists (a
training output that also holds the training state) each saved entry replaces its old copy
by a rename, the metadata file last. :func:`read_network` reads the metadata back, checking
the format and version with errors that say what the folder is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io import fsync_path

META_FILE = "config.json"


@dataclass(frozen=True)
class SaveFormat:
    """What one kind of saved network is called and where its metadata lives."""

    kind: str  # the "format" value, e.g. "facepriv-patch-generator"
    version: int  # the version this code writes (and the newest it reads)
    what: str  # words for errors: "patch generator"
    meta_file: str = META_FILE
    config_key: str = "config"


def _dir_mode() -> int:
    from .io import current_umask

    return 0o777 & ~current_umask()


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def _replace_entry(src: Path, dst: Path) -> None:
    """Move ``src`` onto ``dst`` by renames; an old folder at ``dst`` is moved aside first."""
    if dst.is_dir() and not dst.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _commit(tmp: Path, folder: Path, meta_file: str) -> None:
    _fsync_tree(tmp)
    if not folder.exists():
        os.rename(tmp, folder)  # the whole folder appears at once
    else:
        if not folder.is_dir():
            raise ConfigError(f"{folder} exists and is not a folder")
        entries = sorted(tmp.iterdir(), key=lambda p: p.name == meta_file)  # metadata last
        for entry in entries:
            _replace_entry(entry, folder / entry.name)
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_path(folder)
    fsync_path(folder.parent)


def metadata(fmt: SaveFormat, config: Any, extra: Mapping | None = None) -> dict:
    """The metadata dict of a save: format, version, the settings under ``fmt.config_key``, ``extra``."""
    settings = config.to_json() if hasattr(config, "to_json") else dict(config)
    meta = {"format": fmt.kind, "version": fmt.version, fmt.config_key: settings}
    clash = sorted(set(meta) & set(extra or {}))
    if clash:
        raise ValueError(f"extra metadata may not replace {', '.join(clash)}")
    return {**meta, **(extra or {})}


def save_network(folder: str | os.PathLike, fmt: SaveFormat, config: Any, *,
                 weights: Mapping[str, Mapping] | None = None,
                 extra: Mapping | Callable[[Path], Mapping] | None = None,
                 write: Callable[[Path], None] | None = None) -> Path:
    """Save a network as ``folder`` (see the module docstring); returns the folder.

    ``config``: a :class:`~facepriv.core.config.ConfigBase` (or a plain dict) of settings;
    ``weights``: file name -> state dict (tensors) written as safetensors; ``write``: called with
    the temporary folder to add other files (they are committed with the rest); ``extra``: keys
    beside the settings in the metadata file (or a function of the temporary folder giving them,
    called once the weights are written there).
    """
    from safetensors.torch import save_file

    folder = Path(folder).expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        os.chmod(tmp, _dir_mode())
        if write is not None:
            write(tmp)
        stamp = {"format": fmt.kind, "version": str(fmt.version)}
        for name, state in (weights or {}).items():
            tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            save_file(tensors, str(tmp / name), metadata=stamp)
        meta = metadata(fmt, config, extra(tmp) if callable(extra) else extra)
        (tmp / fmt.meta_file).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        _set_file_modes(tmp)
        _commit(tmp, folder, fmt.meta_file)
    except BaseException:  # includes KeyboardInterrupt: never leave a half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _set_file_modes(root: Path) -> None:
    from .io import default_file_mode

    mode, dmode = default_file_mode(), _dir_mode()
    for dirpath, dirs, files in os.walk(root):
        for name in files:
            os.chmod(Path(dirpath) / name, mode)
        for name in dirs:
            os.chmod(Path(dirpath) / name, dmode)


def read_metadata(folder: str | os.PathLike, fmt: SaveFormat, *,
                  legacy: Callable[[dict], bool] | None = None) -> dict:
    """The metadata of a saved network, checked: the right ``format`` and a version this code reads.

    ``legacy``: accepts metadata written before the format was stamped (it gets version 0).
    """
    folder = Path(folder).expanduser()
    path = folder / fmt.meta_file
    if not path.is_file():
        raise ConfigError(f"{folder} is not a saved {fmt.what} (no {fmt.meta_file})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the saved {fmt.what} ({exc})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: the saved {fmt.what} is not a JSON object")
    if "format" not in meta and legacy is not None and legacy(meta):
        return {**meta, "format": fmt.kind, "version": 0}
    if meta.get("format") != fmt.kind:
        raise ConfigError(f"{folder} is not a facepriv {fmt.what} ({fmt.meta_file} says format "
                          f"{meta.get('format')!r}, not {fmt.kind!r})")
    version = meta.get("version")
    if not isinstance(version, int) or version < 0:
        raise ConfigError(f"{path}: malformed version {version!r} of the saved {fmt.what}")
    if version > fmt.version:
        raise ConfigError(f"{folder}: a {fmt.what} saved by a newer facepriv (format version {version}; "
                          f"this one reads up to {fmt.version}); upgrade facepriv")
    if not isinstance(meta.get(fmt.config_key, {}), dict):
        raise ConfigError(f"{path}: {fmt.config_key!r} of the saved {fmt.what} is not a JSON object")
    return meta


def read_settings(meta: dict, fmt: SaveFormat) -> dict:
    """The settings stored in the metadata ``meta`` (a copy; {} when none were stored)."""
    return dict(meta.get(fmt.config_key) or {})


def load_weights(folder: str | os.PathLike, name: str, fmt: SaveFormat) -> dict:
    """The tensors of the weights file ``name`` of a saved network (a clear error when missing)."""
    from safetensors.torch import load_file

    path = Path(folder).expanduser() / name
    if not path.is_file():
        raise ConfigError(f"{Path(folder)}: {name} missing (an incomplete saved {fmt.what})")
    return load_file(str(path))


def rewrite_metadata(folder: str | os.PathLike, fmt: SaveFormat, meta: dict) -> Path:
    """Replace the metadata file of a saved network atomically (its weights stay as they are)."""
    from .io import atomic_write_bytes

    path = Path(folder).expanduser() / fmt.meta_file
    return atomic_write_bytes(path, json.dumps(meta, indent=2, default=str).encode())
