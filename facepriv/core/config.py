"""One base for every settings dataclass: strict ``from_dict``, ``to_json``, atomic JSON save/load.

    >>> @dataclass
    ... class MyConfig(ConfigBase):
    ...     config_name = "my setting"
    ...     steps: int = 10
    >>> MyConfig.from_dict({"steps": 3}).to_json()
    {'steps': 3}
    >>> MyConfig.from_dict({"stpes": 3})   # ConfigError: unknown my setting(s) stpes; known: steps

Like diffusers' ``ConfigMixin``: the fields are the settings, what is saved is exactly the
fields (plus, in :meth:`ConfigBase.save_json`, whatever ``extra`` the caller adds beside them
under its own keys), and a saved key the class does not know is an error, never silently
dropped: a typo must not fall back to a default. ``__post_init__`` of the subclass validates.
A trained network's settings are saved with its weights by :mod:`facepriv.core.saving`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError

C = TypeVar("C", bound="ConfigBase")


def _plain(value: Any) -> Any:
    """JSON-friendly copy of a field value (paths as text, nested configs as dicts)."""
    if isinstance(value, ConfigBase):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class ConfigBase:
    """Mixin for ``@dataclass`` settings classes (see the module docstring).

    ``config_name`` words the errors ("unknown <config_name>(s) ...").
    """

    config_name: ClassVar[str] = "setting"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def check_keys(cls, d: dict) -> None:
        """Raise :class:`ConfigError` naming the keys of ``d`` that are not fields."""
        names = cls.field_names()
        unknown = sorted(str(k) for k in set(d) - set(names))
        if unknown:
            raise ConfigError(f"unknown {cls.config_name}(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")

    @classmethod
    def from_dict(cls: type[C], d: dict | None) -> C:
        """A config from saved or given settings; an unknown key is a :class:`ConfigError`."""
        d = dict(d or {})
        cls.check_keys(d)
        return cls(**d)

    def to_json(self) -> dict:
        """The fields as JSON-friendly values (what :meth:`from_dict` reads back)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self: C, **changes) -> C:
        """A validated copy with ``changes`` (unknown names are a :class:`ConfigError`)."""
        self.check_keys(changes)
        return dataclasses.replace(self, **changes)

    def save_json(self, path: str | os.PathLike, *, key: str | None = None, extra: dict | None = None) -> Path:
        """Write the settings atomically as JSON: the fields at the top level, or under ``key``
        with ``extra`` beside them (format, version, provenance)."""
        from .io import atomic_write_bytes

        body = self.to_json() if key is None else {key: self.to_json()}
        payload = {**(extra or {}), **body}
        return atomic_write_bytes(Path(path), json.dumps(payload, indent=2, default=str).encode())

    @classmethod
    def load_json(cls: type[C], path: str | os.PathLike, *, key: str | None = None) -> C:
        """Read what :meth:`save_json` wrote; a missing or malformed file is a :class:`ConfigError`."""
        return cls.from_dict(read_json(path, key=key, what=cls.config_name))


def read_json(path: str | os.PathLike, *, key: str | None = None, what: str = "settings") -> dict:
    """A JSON object from ``path`` (its ``key`` entry if given), with errors that name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (no saved {what})") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the saved {what} ({exc})") from None
    if key is not None:
        data = data.get(key) if isinstance(data, dict) else None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the saved {what} is not a JSON object" + (f" under {key!r}" if key else ""))
    return data
