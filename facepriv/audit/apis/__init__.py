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

import re
from pathlib import Path

from ...core.errors import ConfigError
from .base import APIError, CompareResult, FaceAPI, RateLimiter, ResponseCache, config_path, read_config

PROVIDERS = ("facepp", "rekognition", "azure")
_ALIASES = {"face++": "facepp", "faceplusplus": "facepp", "aws": "rekognition", "azure-face": "azure"}


def canonical_name(name: str) -> str:
    """``face++`` / ``aws`` / ... -> the provider name (``facepp``, ``rekognition``, ``azure``)."""
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in PROVIDERS:
        raise ConfigError(f"unknown API {name!r}; use one of {', '.join(PROVIDERS)}")
    return key


def per_provider(values, apis: list[str], option: str, convert=str) -> dict[str, object]:
    """``--api-endpoint`` / ``--api-threshold`` values -> {provider: value}.

    Each value is ``NAME=VALUE`` (NAME a provider or alias; repeatable), or a bare VALUE when
    exactly one ``--api`` is selected. ``values``: None, one string, a list of strings or a dict.
    Every provider named must be one of ``apis``.
    """
    if values is None:
        return {}
    selected = [canonical_name(a) for a in apis]
    if isinstance(values, dict):
        items = [(canonical_name(k), v) for k, v in values.items()]
    else:
        items = []
        raw = [values] if isinstance(values, str | int | float) else list(values)
        for v in raw:
            if isinstance(v, str) and "=" in v:
                name, _, rest = v.partition("=")
                if re.fullmatch(r"[A-Za-z][A-Za-z0-9+_-]*", name.strip()):  # NAME=VALUE (a URL has ":" first)
                    items.append((canonical_name(name), rest.strip()))
                    continue
            # a bare value: only when exactly one provider is selected
            if len(selected) != 1 or len(raw) != 1:
                raise ConfigError(f"{option} {v!r}: with {len(selected)} --api given, say which provider it is "
                                  f"for: {option} NAME=VALUE (repeatable)")
            items.append((selected[0], v))
    out: dict[str, object] = {}
    for name, v in items:
        if name not in selected:
            raise ConfigError(f"{option} names {name}, but --api {name} is not selected")
        if name in out:
            raise ConfigError(f"{option} gives {name} twice")
        try:
            out[name] = convert(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{option} {name}={v!r}: not a valid value") from None
    return out


def create_api(name: str, *, endpoint: str | None = None, config: str | Path | None = None,
               threshold: float | None = None, **kw) -> FaceAPI:
    """Build an adapter; keys from the environment, else the API config file (never printed).

    ``threshold`` replaces the decision threshold of providers with one documented default
    (Rekognition's similarity 80, Azure's confidence 0.5); Face++ sends its own thresholds
    with every response, so it has none to replace.
    """
    key = canonical_name(name)
    section = read_config(config_path(config)).get(key, {}) or {}
    if key == "facepp":
        if threshold is not None:
            raise ConfigError("Face++ sends its own FAR thresholds (1e-3/1e-4/1e-5) with every response; "
                              "--api-threshold applies to rekognition and azure only")
        from .facepp import from_config
    elif key == "azure":
        from .azure import from_config
    else:
        from .rekognition import from_config
    if threshold is not None:
        kw["threshold"] = float(threshold)
    return from_config(section, endpoint=endpoint, **kw)


__all__ = ["PROVIDERS", "APIError", "CompareResult", "FaceAPI", "RateLimiter", "ResponseCache", "canonical_name",
           "create_api", "per_provider"]
