"""Online face-comparison services behind one interface (``compare(a, b) -> CompareResult``).

    >>> from facepriv.audit.apis import create_api
    >>> api = create_api("facepp")            # keys from FACEPP_API_KEY / FACEPP_API_SECRET
    >>> res = api.compare("protected.png", "clean.jpg")
    >>> res.score, res.thresholds, res.verified("1e-4")

Providers: ``facepp`` (Face++ Compare), ``rekognition`` (AWS CompareFaces, needs boto3),
``azure`` (Azure AI Face detect + verify). See :mod:`facepriv.audit.apis.base` for the shared
retry / rate-limit / cache behaviour.
"""

from __future__ import annotations

from pathlib import Path

from ...core.errors import ConfigError
from .base import APIError, CompareResult, FaceAPI, RateLimiter, ResponseCache, config_path, read_config

PROVIDERS = ("facepp", "rekognition", "azure")
_ALIASES = {"face++": "facepp", "faceplusplus": "facepp", "aws": "rekognition", "azure-face": "azure"}


def create_api(name: str, *, endpoint: str | None = None, config: str | Path | None = None, **kw) -> FaceAPI:
    """Build an adapter; keys from the environment, else the API config file (never printed)."""
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in PROVIDERS:
        raise ConfigError(f"unknown API {name!r}; use one of {', '.join(PROVIDERS)}")
    section = read_config(config_path(config)).get(key, {}) or {}
    if key == "facepp":
        from .facepp import from_config
    elif key == "azure":
        from .azure import from_config
    else:
        from .rekognition import from_config
    return from_config(section, endpoint=endpoint, **kw)


__all__ = ["PROVIDERS", "APIError", "CompareResult", "FaceAPI", "RateLimiter", "ResponseCache", "create_api"]
