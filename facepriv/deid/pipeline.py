"""Run de-identification methods over photos and folders."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core.batch import BatchSummary, collect_inputs, run_batch
from ..core.faces import Face, FacePolicy
from ..core.pipeline import SaveOptions, process_photo
from .base import DeidMethod, create_method


@dataclass
class DeidConfig:
    methods: list[str] = field(default_factory=lambda: ["blur"])
    strength: float = 1.0
    region: str = "face"
    feather: float | None = None
    detector: str = "mtcnn"
    options: dict = field(default_factory=dict)  # per-method extra keyword arguments


def build_methods(cfg: DeidConfig) -> list[DeidMethod]:
    return [create_method(m, strength=cfg.strength, region=cfg.region, feather=cfg.feather,
                          **cfg.options.get(m, {})) for m in cfg.methods]


def deidentify(image: torch.Tensor, faces: list[Face], methods: list[DeidMethod]) -> torch.Tensor:
    """Apply ``methods`` in sequence to the faces of one image (3, H, W) in [0, 1]."""
    out = image
    for m in methods:
        out = m.apply(out, faces)
    return out


def run_deid(inputs: list[str | Path], out: str | Path, cfg: DeidConfig, *, policy: FacePolicy | None = None,
             save: SaveOptions | None = None, device: str | torch.device = "cpu", glob: str | None = None,
             resume: bool = False, output_suffix: str | None = None, progress: bool = True,
             verbose: bool = False) -> BatchSummary:
    """De-identify every face in every input photo, mirroring the inputs under ``out``."""
    from ..models import create_model

    policy = policy or FacePolicy()
    save = save or SaveOptions()
    out = Path(out)
    items = collect_inputs(inputs, glob=glob, exclude=[out])
    methods = build_methods(cfg)
    detector = create_model(cfg.detector, device=device)

    def process(item, dst):
        return process_photo(item, dst, detector=detector, policy=policy, save=save, device=device,
                             edit=lambda x, faces, _img: deidentify(x, faces, methods))

    config = {"command": "deid", **asdict(cfg), "policy": asdict(policy), "save": asdict(save),
              "suffix": output_suffix}
    return run_batch(items, process, out_dir=out, config=config, resume=resume, output_suffix=output_suffix,
                     description=f"deid {'+'.join(cfg.methods)}", progress=progress, verbose=verbose,
                     command="deid")
