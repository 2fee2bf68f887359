"""Where model files live and how they get there.

* ``FACEPRIV_HOME`` (default: the user cache dir, e.g. ``~/.cache/facepriv``) holds every
  downloaded, extracted, imported and converted file.
* ``FACEPRIV_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) makes every network source fail fast with
  a message saying what to fetch and which path to pass instead.
* Every download is written to a temporary file, checked against its pinned sha256, then
  renamed into place: a partial or tampered file never becomes visible under its final name.
  Files get the usual permissions (``0o666`` minus the umask), not ``mkstemp``'s ``0o600``, so
  a shared ``FACEPRIV_HOME`` stays readable by the group the umask allows.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ..core.errors import FaceprivError
from ..core.io import set_default_mode

_TRUE = {"1", "true", "yes", "on"}
CHUNK = 1 << 20


class OfflineError(FaceprivError):
    """A model needs the network but the offline switch is on (or the network is unreachable)."""


class ChecksumError(FaceprivError):
    """A downloaded or imported file does not match its pinned sha256."""


def home() -> Path:
    """Root of facepriv's model cache (``FACEPRIV_HOME``)."""
    env = os.environ.get("FACEPRIV_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("facepriv"))


def is_offline() -> bool:
    """True when ``FACEPRIV_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a truthy value."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("FACEPRIV_OFFLINE", "HF_HUB_OFFLINE"))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verified(path: Path, sha256: str | None) -> bool:
    """True if ``path`` exists and matches ``sha256``.

    A digest shorter than 64 hex digits is a *prefix* (torchvision / torch.hub publish the
    first 8 or 10 digits in their file names), checked the way ``torch.hub`` does.

    The result is remembered in a ``<file>.sha256`` marker holding the digest, size and
    mtime, so that large files are hashed once rather than on every load.
    """
    if not path.is_file():
        return False
    if sha256 is None:
        return True
    st = path.stat()
    marker = path.with_name(path.name + ".sha256")
    stamp = f"{sha256} {st.st_size} {st.st_mtime_ns}"
    try:
        if marker.read_text().strip() == stamp:
            return True
    except OSError:
        pass
    if not sha256_file(path).startswith(sha256):
        return False
    try:
        marker.write_text(stamp)
    except OSError:  # read-only location (e.g. site-packages): just re-hash next time
        pass
    return True


def atomic_copy(src: Path, dst: Path, sha256: str | None = None) -> Path:
    """Copy ``src`` to ``dst`` through a temporary file, verifying ``sha256`` if given."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        set_default_mode(tmp)
        if sha256 is not None:
            got = sha256_file(tmp)
            if not got.startswith(sha256):
                raise ChecksumError(f"{src} has sha256 {got}, expected {sha256}")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def download(url: str, dst: Path, *, sha256: str | None, what: str, progress: bool = True,
             timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dst`` atomically, with a rich progress bar and sha256 check."""
    if is_offline():
        raise OfflineError(
            f"{what} must be downloaded from {url}, but the offline switch is on "
            "(FACEPRIV_OFFLINE / HF_HUB_OFFLINE)."
        )
    import requests

    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
    h = hashlib.sha256()
    try:
        try:
            resp = requests.get(url, stream=True, timeout=timeout)
            resp.raise_for_status()
        except requests.RequestException as exc:
            raise OfflineError(f"could not download {what} from {url}: {exc}") from None
        total = int(resp.headers.get("content-length") or 0) or None
        from ..core.progress import make_progress

        set_default_mode(fd)
        with os.fdopen(fd, "wb") as f, make_progress(enabled=progress, transient=True, bytes_=True) as bar:
            task = bar.add_task(f"download {dst.name}", total=total)
            for chunk in resp.iter_content(CHUNK):
                f.write(chunk)
                h.update(chunk)
                bar.advance(task, len(chunk))
        fd = -1
        if sha256 is not None and not h.hexdigest().startswith(sha256):
            raise ChecksumError(f"{what}: {url} has sha256 {h.hexdigest()}, expected {sha256}")
        os.replace(tmp, dst)
    finally:
        if fd != -1:
            try:
                os.close(fd)
            except OSError:
                pass
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst
