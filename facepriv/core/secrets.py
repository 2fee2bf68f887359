"""Keeping API keys out of every output.

Adapters register each secret they load (:func:`register_secret`); :func:`redact` replaces
every registered secret (and common ``key=value`` shapes) in strings, dicts and lists. The
report writers, the error messages of the API adapters and the CLI pass everything they print
or write through it, so a key can never end up in a report, a log line or a traceback text.
"""

from __future__ import annotations

import re
import threading
from typing import Any

MASK = "***"
_lock = threading.Lock()
_secrets: set[str] = set()

# Field names whose values are secrets wherever they appear (form fields, JSON, headers).
SECRET_FIELDS = ("api_key", "api_secret", "apikey", "secret", "password", "token", "subscription-key",
                 "ocp-apim-subscription-key", "aws_secret_access_key", "aws_access_key_id", "aws_session_token",
                 "authorization", "key")
_FIELD_RE = re.compile(
    r"(?i)\b(api_key|api_secret|apikey|aws_secret_access_key|aws_access_key_id|aws_session_token|"
    r"ocp-apim-subscription-key|subscription-key)\b(\s*[=:]\s*[\"']?)([^\"'&\s,;}]+)")


def register_secret(value: str | None) -> None:
    """Remember a secret so :func:`redact` hides it everywhere (values shorter than 4 are ignored)."""
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(str(value))


def registered() -> frozenset[str]:
    with _lock:
        return frozenset(_secrets)


def redact_text(text: str) -> str:
    if not text:
        return text
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, MASK)
    return _FIELD_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (str / dict / list / tuple, nested) with every secret replaced by ``***``."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str) and k.lower() in SECRET_FIELDS and isinstance(v, str):
                out[k] = MASK
            else:
                out[redact_text(k) if isinstance(k, str) else k] = redact(v)
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(redact(v) for v in obj)
    return obj
