"""Find a score network from what a user typed: a registry name, a hub id or a folder."""

from __future__ import annotations

from pathlib import Path

import torch


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
    or any other Hugging Face hub id of a ``UNet2DModel`` repository
    (:func:`facepriv.models.resolve_pretrained` decides which).
    """
    from ...models import create_model, resolve_pretrained
    from ...models.diffusion import load_score_model

    resolved = resolve_pretrained(ref, task="score", what="score network")
    if resolved.kind == "registry":
        return create_model(resolved.name, device=device)
    return load_score_model(resolved.local_path(), device=device)
