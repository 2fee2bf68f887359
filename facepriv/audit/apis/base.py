"""One interface for online face-comparison services, and the plumbing they share.

``FaceAPI.compare(img_a, img_b) -> CompareResult(score, thresholds, raw, ...)``: the score is
the provider's own (Face++ confidence 0-100, Rekognition similarity 0-100, Azure confidence
0-1), thresholds are the provider's (Face++ returns its FAR 1e-3/1e-4/1e-5 thresholds with
*every* response; the others have one documented default), ``raw`` is the redacted response.

Shared behaviour:

* bounded concurrency (:meth:`FaceAPI.compare_many`, a thread pool of ``concurrency``);
* a rate limit (``rate`` requests per second, across threads);
* retries with exponential backoff (and ``Retry-After`` when the server sends one) on
  rate-limit / overload answers (403 CONCURRENCY_LIMIT_EXCEEDED, 429, 5xx, timeouts,
  connection errors); authentication errors are never retried and stop the adapter (every
  later pair fails at once with the same message instead of hammering the service);
* per-request timeouts;
* a response cache keyed by the provider, endpoint and the sha256 of both images, so a re-run
  costs nothing (successes and "no face" answers are cached, transient errors are not);
* images outside the provider's limits (:class:`ImageLimits`) are downscaled / re-encoded, and
  images whose shorter side is below its minimum (tiny aligned crops) are upscaled (Lanczos,
  sent as PNG) rather than refused by the service; ``CompareResult.note`` says so;
* per-pair errors recorded in the result, never raised out of ``compare_many``;
* secrets registered with :mod:`facepriv.core.secrets` and redacted from every message.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...core.errors import ConfigError, FaceprivError
from ...core.secrets import redact, redact_text, register_secret


class APIError(FaceprivError):
    """A failed request. ``retryable``: worth another try; ``fatal``: stop using this adapter."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 retryable: bool = False, fatal: bool = False, no_face: bool = False,
                 retry_after: float | None = None, no_face_in: int | None = None):
        super().__init__(redact_text(message))
        self.status, self.code = status, code
        self.retryable, self.fatal, self.no_face = retryable, fatal, no_face
        self.retry_after = retry_after
        self.no_face_in = no_face_in


@dataclass
class CompareResult:
    """Outcome of one comparison. ``score`` is None when there is no score (error / no face)."""

    score: float | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    raw: dict | None = None
    error: str | None = None
    code: str | None = None
    no_face: bool = False
    no_face_in: int | None = None  # 1 or 2: which image had no face (None: unknown)
    note: str | None = None  # what was done to the images before sending (upscaled, re-encoded)
    cached: bool = False
    attempts: int = 0  # requests sent for this comparison, retries included (0: answered from the cache)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.score is not None

    def verified(self, key: str) -> bool | None:
        """Did the service accept the pair at threshold ``key``? None without score/threshold."""
        if self.score is None or key not in self.thresholds:
            return None
        return self.score >= self.thresholds[key]

    def to_json(self) -> dict:
        return redact(asdict(self))


class RateLimiter:
    """At most ``rate`` request starts per second, shared by all threads (None = unlimited)."""

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 1.0 / rate if rate and rate > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()
        self._clock, self._sleep = clock, sleep

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


class ResponseCache:
    """JSON files under ``root``, one per (provider, endpoint, image pair, options) key."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(*parts: str) -> str:
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: dict) -> None:
        from ...core.io import atomic_write_bytes

        atomic_write_bytes(self._path(key), json.dumps(redact(value)).encode())


def default_cache_dir() -> Path:
    from ...models.hub import home

    return home() / "api-cache"


@dataclass
class ImageLimits:
    """What a provider accepts: file size, longest side, shortest side (pixels)."""

    max_bytes: int = 2 * 1024 * 1024
    max_side: int = 4096
    min_side: int = 48


PIXEL_NOTE = "this can weaken pixel-level protections"


def _encode(img, limits: ImageLimits, *, lossless: bool) -> tuple[bytes, str]:
    """PNG when ``lossless`` and it fits ``max_bytes``; else JPEG q95, downscaled (Lanczos, never
    below ``min_side``) until it fits. Returns (bytes, "PNG" or "JPEG q95")."""
    from PIL import Image

    if lossless:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        if buf.tell() <= limits.max_bytes:
            return buf.getvalue(), "PNG"
    floor = min(1.0, limits.min_side / max(1, min(img.width, img.height)))
    scale = 1.0
    while True:
        s = max(scale, floor)
        img2 = img if s >= 1.0 else img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))),
                                               Image.LANCZOS)
        buf = io.BytesIO()
        img2.save(buf, format="JPEG", quality=95)
        if buf.tell() <= limits.max_bytes or s <= floor or s < 0.1:
            return buf.getvalue(), "JPEG q95"
        scale *= 0.8


def prepare_image(path_or_bytes: str | Path | bytes, limits: ImageLimits) -> tuple[bytes, str | None]:
    """Image bytes within the provider's limits. Returns (bytes, note about what was changed or None).

    * A JPEG/PNG within every limit is sent as it is.
    * Too large (bytes or longest side) or another format: re-encoded as JPEG q95, downscaled
      (Lanczos) as needed.
    * Shorter side below ``limits.min_side`` (e.g. a tiny aligned crop, which the service would
      refuse: Face++ INVALID_IMAGE_SIZE): upscaled (Lanczos) so the shorter side is exactly
      ``min_side`` and sent as PNG (no further loss). An image that cannot reach ``min_side``
      without its longest side passing ``max_side`` raises :class:`APIError` (code BAD_IMAGE).

    The note says what was done; resampling and re-encoding can weaken pixel-level protections.
    """
    from PIL import Image

    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            fmt = im.format
    except Exception as exc:  # noqa: BLE001
        raise APIError(f"cannot read the image: {exc}", code="BAD_IMAGE") from None
    too_small = min(w, h) < limits.min_side
    if not too_small and len(data) <= limits.max_bytes and max(w, h) <= limits.max_side and fmt in ("JPEG", "PNG"):
        return data, None
    if too_small and max(w, h) * limits.min_side / min(w, h) > limits.max_side:
        raise APIError(f"the image is {w}x{h} px: its shorter side cannot reach the provider's minimum of "
                       f"{limits.min_side} px without its longer side passing {limits.max_side} px", code="BAD_IMAGE")
    from ...core.io import load_image

    if isinstance(path_or_bytes, bytes):
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".img") as f:
            f.write(data)
            f.flush()
            rgb = load_image(f.name).rgb
    else:
        rgb = load_image(path_or_bytes).rgb
    img = Image.fromarray(rgb)
    if too_small:
        scale = limits.min_side / min(img.width, img.height)
        size = (max(limits.min_side, round(img.width * scale)), max(limits.min_side, round(img.height * scale)))
        img = img.resize(size, Image.LANCZOS)
        out, how = _encode(img, limits, lossless=True)
        return out, (f"upscaled from {w}x{h} to {img.width}x{img.height} px (Lanczos, sent as {how}) to reach the "
                     f"provider's minimum side of {limits.min_side} px; {PIXEL_NOTE}")
    if max(img.width, img.height) > limits.max_side:
        scale = limits.max_side / max(img.width, img.height)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    out, how = _encode(img, limits, lossless=False)
    with Image.open(io.BytesIO(out)) as im:
        ow, oh = im.size
    return out, (f"re-encoded as {how} at {ow}x{oh} to fit the provider's limits ({limits.max_bytes // 1024} KB, "
                 f"{limits.max_side} px); {PIXEL_NOTE}")


class FaceAPI(ABC):
    """Base class of the online adapters; subclasses implement :meth:`_compare` (one attempt)."""

    name = "api"
    score_range = ""
    limits = ImageLimits()

    def __init__(self, *, endpoint: str | None = None, timeout: float = 30.0, retries: int = 4,
                 backoff: float = 1.0, backoff_max: float = 30.0, rate: float | None = 2.0,
                 concurrency: int = 2, cache: str | Path | bool | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.endpoint = endpoint
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff, self.backoff_max = float(backoff), float(backoff_max)
        self.concurrency = max(1, int(concurrency))
        self.limiter = RateLimiter(rate, sleep=sleep)
        self._sleep = sleep
        if cache is False:
            self.cache = None
        else:
            self.cache = ResponseCache(default_cache_dir() if cache in (None, True) else cache)
        self._fatal: str | None = None
        self._lock = threading.Lock()
        self.calls = 0  # HTTP requests actually sent (cache hits excluded), all threads
        self._local = threading.local()  # per thread: requests sent for the comparison in progress
        self.stats = {"cache_hits": 0, "retries": 0, "errors": 0}

    @classmethod
    def from_config(cls, section: dict, *, endpoint: str | None = None, **kw) -> FaceAPI:
        """The adapter for the provider's section of the API config file (``endpoint``: ``--api-endpoint``,
        else the section's). Adapters that need keys override this; this default reads none."""
        return cls(endpoint=endpoint or section.get("endpoint"), **kw)

    # -------------------------------------------------------------- for subclasses
    @abstractmethod
    def _compare(self, img_a: bytes, img_b: bytes) -> CompareResult:
        """One comparison; may call :meth:`call` several times. Raises :class:`APIError`."""

    def cache_identity(self) -> str:
        """What makes a cached answer valid: provider, endpoint and options (never secrets)."""
        return f"{self.name}|{self.endpoint or ''}"

    def describe(self) -> dict:
        return redact({"name": self.name, "endpoint": self.endpoint, "score_range": self.score_range,
                       "timeout_s": self.timeout, "retries": self.retries, "concurrency": self.concurrency,
                       "rate_per_s": (1.0 / self.limiter.interval) if self.limiter.interval else None})

    def call(self, fn: Callable[[], object]) -> object:
        """Run one request with the rate limit and retries (``fn`` raises APIError on failure)."""
        attempt = 0
        while True:
            self.limiter.wait()
            with self._lock:
                self.calls += 1
            self._local.attempts = getattr(self._local, "attempts", 0) + 1
            try:
                return fn()
            except APIError as exc:
                if exc.fatal:
                    with self._lock:
                        self._fatal = str(exc)
                    raise
                if not exc.retryable or attempt >= self.retries:
                    raise
                delay = min(self.backoff_max, self.backoff * (2 ** attempt)) * (0.5 + random.random() / 2)
                if exc.retry_after is not None:
                    delay = min(self.backoff_max, max(delay, exc.retry_after))
                attempt += 1
                with self._lock:
                    self.stats["retries"] += 1
                self._sleep(delay)

    # -------------------------------------------------------------- public
    @property
    def stopped_reason(self) -> str | None:
        """Why the adapter stopped sending (a fatal error, e.g. rejected credentials; already
        redacted), or None while it works."""
        return self._fatal

    def compare(self, img_a: str | Path | bytes, img_b: str | Path | bytes) -> CompareResult:
        """Compare two images (paths or bytes); errors are returned in the result, not raised."""
        t0 = time.perf_counter()
        if self._fatal is not None:
            with self._lock:
                self.stats["errors"] += 1
            return CompareResult(error=f"not sent: {self._fatal}", code="ADAPTER_STOPPED")
        prepared = []
        for n, img in ((1, img_a), (2, img_b)):
            try:
                prepared.append(prepare_image(img, self.limits))
            except (OSError, APIError) as exc:
                with self._lock:
                    self.stats["errors"] += 1
                return CompareResult(error=redact_text(f"image {n} not sent: {exc}"), code="BAD_IMAGE",
                                     seconds=time.perf_counter() - t0)
        (a, note_a), (b, note_b) = prepared
        key = None
        if self.cache is not None:
            key = ResponseCache.key(self.cache_identity(), hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest())
            hit = self.cache.get(key)
            if hit is not None:
                with self._lock:
                    self.stats["cache_hits"] += 1
                res = CompareResult(**{k: v for k, v in hit.items() if k in CompareResult.__dataclass_fields__})
                res.cached = True
                res.attempts = 0  # nothing was sent for this answer
                res.seconds = time.perf_counter() - t0
                return res
        # attempts of this comparison only: _compare runs in this thread, and call() counts in
        # a thread-local (the shared ``calls`` also moves with the other threads' requests)
        self._local.attempts = 0
        try:
            res = self._compare(a, b)
        except APIError as exc:
            with self._lock:
                self.stats["errors"] += 0 if exc.no_face else 1
            res = CompareResult(error=str(exc), code=exc.code, no_face=exc.no_face, no_face_in=exc.no_face_in)
        except Exception as exc:  # noqa: BLE001 - a per-pair failure never aborts the audit
            with self._lock:
                self.stats["errors"] += 1
            res = CompareResult(error=redact_text(f"{type(exc).__name__}: {exc}"), code="UNEXPECTED")
        res.attempts = self._local.attempts
        notes = [f"image {n} {text}" for n, text in ((1, note_a), (2, note_b)) if text]
        if notes:
            res.note = "; ".join(notes)
            if res.raw is not None:
                res.raw = {**res.raw, "facepriv_note": res.note}
        res.seconds = time.perf_counter() - t0
        if key is not None and (res.ok or res.no_face):
            self.cache.put(key, {**asdict(res), "cached": False})  # attempts: this answer's true count
        res.raw = redact(res.raw)
        return res

    def compare_many(self, pairs: Sequence[tuple[str | Path | bytes, str | Path | bytes]], *,
                     progress: bool = False, description: str | None = None) -> list[CompareResult]:
        """Compare many pairs with at most ``concurrency`` in flight; results in input order."""
        from ...core.progress import make_progress

        results: list[CompareResult | None] = [None] * len(pairs)
        with make_progress(enabled=progress) as bar, ThreadPoolExecutor(self.concurrency) as pool:
            task = bar.add_task(description or f"{self.name} compare", total=len(pairs))
            futs = {pool.submit(self.compare, a, b): i for i, (a, b) in enumerate(pairs)}
            for fut, i in futs.items():
                results[i] = fut.result()
                bar.advance(task)
        return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------ credentials
def config_path(explicit: str | Path | None = None) -> Path | None:
    """The API config file: ``explicit``, else ``FACEPRIV_API_CONFIG``, else the user config dir's
    ``facepriv/apis.json`` / ``apis.toml`` when it exists."""
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise ConfigError(f"API config file {p} does not exist")
        return p
    env = os.environ.get("FACEPRIV_API_CONFIG")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise ConfigError(f"FACEPRIV_API_CONFIG={p} does not exist")
        return p
    from platformdirs import user_config_dir

    for name in ("apis.json", "apis.toml"):
        p = Path(user_config_dir("facepriv")) / name
        if p.is_file():
            return p
    return None


def _toml_reader(path: Path):
    """tomllib (Python >= 3.11), else the tomli backport; a clear error without either."""
    try:
        import tomllib

        return tomllib
    except ImportError:
        try:
            import tomli

            return tomli
        except ImportError:
            raise ConfigError(f"API config file {path}: reading TOML needs Python >= 3.11 or "
                              "`pip install tomli`; or write the same settings as JSON") from None


def read_config(path: Path | None) -> dict:
    if path is None:
        return {}
    text = path.read_text()
    toml = _toml_reader(path) if path.suffix.lower() == ".toml" else None
    try:
        data = toml.loads(text) if toml is not None else json.loads(text)
    except Exception as exc:  # noqa: BLE001 - never echo the file's content (it holds keys)
        raise ConfigError(f"API config file {path} could not be parsed ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"API config file {path}: expected a table of providers")
    for section in data.values():
        if isinstance(section, dict):
            for k, v in section.items():
                if isinstance(v, str) and any(s in k.lower() for s in ("key", "secret", "token", "password")):
                    register_secret(v)
    return data


def credential(section: dict, env: str, *names: str) -> str | None:
    """A credential from the environment (first) or the config section; registered as secret."""
    value = os.environ.get(env) or next((section[n] for n in names if section.get(n)), None)
    register_secret(value)
    return value


# ------------------------------------------------------------------------------ provider registry
@dataclass(frozen=True)
class ProviderSpec:
    """A registered online service: its adapter class and what it needs (for docs, tests and messages;
    the adapter's ``from_config`` reads and registers the keys)."""

    name: str
    cls: type
    env: tuple[str, ...] = ()  # environment variables with its keys / endpoint (first listed wins)
    config_keys: tuple[str, ...] = ()  # keys of its ``[name]`` section in the API config file
    extra: str | None = None  # an optional package it needs (e.g. boto3)
    aliases: tuple[str, ...] = ()

    def create(self, section: dict, **kw) -> FaceAPI:
        return self.cls.from_config(section, **kw)


#: provider name -> :class:`ProviderSpec`, in registration order (the order of ``--api`` messages)
PROVIDERS: dict[str, ProviderSpec] = {}
#: other spellings accepted for a provider (``face++``, ``aws``, ...), not listed separately
ALIASES: dict[str, str] = {}


def register_provider(name: str, *, env: Sequence[str] = (), config_keys: Sequence[str] = (),
                      extra: str | None = None, aliases: Sequence[str] = ()):
    """Class decorator adding a :class:`FaceAPI` subclass to :data:`PROVIDERS` under ``name``
    (and ``aliases``); ``create_api`` / ``--api NAME`` then build it with ``cls.from_config``."""

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, FaceAPI)):
            raise TypeError(f"register_provider({name!r}): {cls!r} is not a FaceAPI subclass")
        key = name.strip().lower()
        PROVIDERS[key] = ProviderSpec(key, cls, tuple(env), tuple(config_keys), extra,
                                      tuple(a.strip().lower() for a in aliases))
        for a in aliases:
            ALIASES[a.strip().lower()] = key
        return cls

    return deco


def unregister_provider(name: str) -> None:
    """Remove a provider and its aliases (tests registering a fake one clean up with this)."""
    spec = PROVIDERS.pop(name.strip().lower(), None)
    for a in spec.aliases if spec else ():
        if ALIASES.get(a) == spec.name:
            del ALIASES[a]
