"""Find a score network from what a user typed: a registry name, a hub id or a folder."""

from __future__ import annotations

from pathlib import Path

import torch

from ...core.errors import ConfigError


def score_model_reference(ref: str | Path) -> str:
    """``ref`` as it should be recorded: an existing local folder becomes its absolute path
    (so a saved model's ``base`` works from any working directory); names and hub ids are kept."""
    text = str(ref)
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve())
    return text


def load_base_score_model(ref: str | Path, device: str | torch.device = "cpu"):
    """A :class:`~facepriv.models.diffusion.ScoreModel` from ``ref``.

    ``ref`` is a local diffusers folder (``save_pretrained`` layout), a registry name
    (``ddpm-celebahq-256``), the hub id of a registered model (``google/ddpm-celebahq-256``)
    or any other Hugging Face hub id of a ``UNet2DModel`` repository.
    """
    from ...models import create_model, get_spec, list_models
    from ...models.diffusion import load_score_model
    from ...models.sources import HubRepo

    text = str(ref)
    path = Path(text).expanduser()
    if path.exists():
        return load_score_model(path, device=device)
    try:
        spec = get_spec(text)
    except Exception:  # noqa: BLE001 - not a registry name
        spec = None
    if spec is not None:
        if spec.task != "score":
            raise ConfigError(f"{text} is a {spec.task} model, not a diffusion score network")
        return create_model(spec.name, device=device)
    for s in list_models("score"):
        if any(isinstance(src, HubRepo) and src.repo_id == text for src in s.sources):
            return create_model(s.name, device=device)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        local = HubRepo(text).resolve(what=text)
        return load_score_model(local, device=device)
    raise ConfigError(f"score network {text!r}: not a folder, a registered score model or a hub id (org/name)")
