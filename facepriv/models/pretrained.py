"""One answer to "which model does this reference mean?" (timm's ``create_model`` idea).

Commands take a model as a **local folder or file** (a diffusers ``save_pretrained`` folder,
a checkpoint), a **registry name** (``ddpm-celebahq-256``, ``taesd``) or a **Hugging Face hub
id** (``google/ddpm-celebahq-256``). :func:`resolve_pretrained` tells them apart, in this order:

1. an existing local path (``~`` expanded) is used as it is;
2. a registry name or alias is its :class:`~facepriv.models.registry.ModelSpec`;
3. the hub id of a registered model (``google/ddpm-celebahq-256``) is that registry entry,
   so its pinned source, imports and offline instructions apply;
4. any other hub id (``org/name``: one slash, letters, digits, ``.``, ``_``, ``-``) stays a
   hub id, fetched only when :meth:`ResolvedRef.local_path` is asked for it (the hub cache,
   ``HF_HUB_CACHE`` and the offline switch apply; offline, the error names the folder to
   pass instead);
5. anything else is a :class:`~facepriv.core.errors.ConfigError`: a path-like reference that
   does not exist (``./nope/``, ``~/x``, ``a/b/c``) says so instead of being looked up on
   the hub, and a bare word lists what is registered.

With ``task`` given, a registry entry (by name or hub id) of another task is refused.
Classifying never touches the network.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ConfigError
from .registry import ModelSpec, UnknownModelError, get_spec, list_models, resolve_weights
from .sources import HubRepo

#: what a model of each task is called in messages
TASK_NOUNS = {
    "score": "diffusion score model",
    "autoencoder": "autoencoder",
    "inpainting": "inpainting model",
    "recognition": "face recognition model",
    "detector": "face detector",
    "expression": "expression model",
    "metric": "metric model",
}

# A Hugging Face repository id: "org/name", each part starting with a letter or digit, then
# letters, digits, ".", "_" or "-", ending in a letter, digit or "_" (no "--" or "..", at most
# 96 characters: the hub's own rules).
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^{_PART}/{_PART}$")


def is_hub_id(text: str) -> bool:
    """True when ``text`` has the shape of a Hugging Face repository id (``org/name``)."""
    return bool(_HUB_ID.match(text)) and len(text) <= 96 and "--" not in text and ".." not in text


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "~")) or "/" in text or "\\" in text


def _noun(task: str | None) -> str:
    return TASK_NOUNS.get(task, f"{task} model") if task else "model"


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


@dataclass(frozen=True)
class ResolvedRef:
    """What a model reference turned out to be.

    ``kind`` is ``"local"`` (``path`` set), ``"registry"`` (``spec`` set; ``hub_id`` too when
    the reference was the entry's hub id) or ``"hub"`` (``hub_id`` set).
    """

    ref: str
    kind: str
    path: Path | None = None
    spec: ModelSpec | None = None
    hub_id: str | None = None

    @property
    def name(self) -> str | None:
        """The registry name (None unless ``kind == "registry"``)."""
        return self.spec.name if self.spec is not None else None

    @property
    def record(self) -> str:
        """The reference as a saved config should keep it: a local path made absolute (so it
        works from any working directory); registry names and hub ids as given."""
        return str(self.path.resolve()) if self.path is not None else self.ref

    def local_path(self, *, allow_patterns: tuple[str, ...] | None = None, download: bool = True,
                   progress: bool = True) -> Path | None:
        """A local path holding the model: the folder itself, the registry entry's weights
        (``create_model``'s rule: imported > cached > download), or a hub snapshot (only
        ``allow_patterns``, default: what a diffusers model folder needs). Downloads respect
        the offline switch, raising :class:`~facepriv.models.hub.OfflineError` that names
        the alternative (``facepriv models import`` / passing the folder)."""
        if self.path is not None:
            return self.path
        if self.spec is not None:
            return resolve_weights(self.spec, download=download, progress=progress)[0]
        return HubRepo(self.hub_id, allow_patterns=allow_patterns).resolve(what=self.ref, download=download,
                                                                           progress=progress)


def _registered_by_hub_id(text: str, task: str | None) -> ModelSpec | None:
    """The registry entry whose hub source is ``text``; one of ``task`` first."""
    matches = [s for s in list_models() if any(isinstance(src, HubRepo) and src.repo_id == text for src in s.sources)]
    for s in matches:
        if task is None or s.task == task:
            return s
    return matches[0] if matches else None


def resolve_pretrained(ref: str | os.PathLike, *, task: str | None = None, what: str | None = None) -> ResolvedRef:
    """Classify ``ref`` as a local path, a registry entry or a hub id (see the module doc).

    ``task`` (``"score"``, ``"autoencoder"``, ...) restricts registry entries to that task;
    ``what`` names the reference in error messages (e.g. ``"--score-model"``; default: the
    task's noun). Raises :class:`~facepriv.core.errors.ConfigError` for a reference that is
    none of these, a missing path, or a registry entry of another task.
    """
    text = str(ref)
    noun = _noun(task)
    what = what or noun
    if not text.strip():
        raise ConfigError(f"{what}: empty model reference; give a folder, a registry name or a hub id (org/name)")
    path = Path(text).expanduser()
    if path.exists():
        return ResolvedRef(text, "local", path=path)
    try:
        spec, hub_id = get_spec(text), None
    except UnknownModelError:
        spec, hub_id = _registered_by_hub_id(text, task), text
    if spec is not None:
        if task is not None and spec.task != task:
            named = "" if text == spec.name else f" ({spec.name})"
            raise ConfigError(f"{what} {text}: {_a(spec.task + ' model')}{named}, not {_a(noun)}")
        return ResolvedRef(text, "registry", spec=spec, hub_id=hub_id)
    if is_hub_id(text):
        return ResolvedRef(text, "hub", hub_id=text)
    if _looks_like_path(text):
        raise ConfigError(f"{what} {text!r}: no such file or folder ({path.absolute()}); "
                          "a hub id has the form org/name")
    names = [s.name for s in list_models(task)]
    close = difflib.get_close_matches(text, names, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else (
        f"registered: {', '.join(names)}" if task and names else "see `facepriv models list`")
    raise ConfigError(f"{what} {text!r}: not a folder, a registered {noun} or a hub id (org/name); {hint}")
