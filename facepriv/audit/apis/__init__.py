"""Online face-comparison services behind one interface (``compare(a, b) -> CompareResult``).

    >>> from facepriv.audit.apis import create_api
    >>> api = create_api("facepp")            # keys from FACEPP_API_KEY / FACEPP_API_SECRET
    >>> res = api.compare("protected.png", "clean.jpg")
    >>> res.score, res.thresholds, res.verified("1e-4")

Providers: ``facepp`` (Face++ Compare), ``rekognition`` (AWS CompareFaces, needs boto3),
``azure`` (Azure AI Face detect + verify). See :mod:`facepriv.audit.apis.base` for the shared
retry / rate-limit / cache behaviour. Each adapter class registers itself with
``@register_provider(name, env=..., config_keys=..., extra=..., aliases=...)`` in
:data:`PROVIDERS`; ``create_api`` and ``--api`` look names up there.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...core.errors import ConfigError
from .base import (ALIASES, PROVIDERS, APIError, CompareResult, FaceAPI, ProviderSpec, RateLimiter, ResponseCache,
                   config_path, read_config, register_provider, unregister_provider)

# the built-in adapters register themselves on import; this order is the order names are listed in
from . import facepp  # noqa: F401
from . import rekognition  # noqa: F401
from . import azure  # noqa: F401


def canonical_name(name: str) -> str:
    """``face++`` / ``aws`` / ... -> the provider name (``facepp``, ``rekognition``, ``azure``)."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
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
    if threshold is not None:
        kw["threshold"] = float(threshold)
    return PROVIDERS[key].create(section, endpoint=endpoint, **kw)


__all__ = ["ALIASES", "PROVIDERS", "APIError", "CompareResult", "FaceAPI", "ProviderSpec", "RateLimiter",
           "ResponseCache", "canonical_name", "create_api", "per_provider", "register_provider",
           "unregister_provider"]
