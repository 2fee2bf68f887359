"""``facepriv patch``: a conditional adversarial patch generator (train once, apply in one pass).

    >>> from facepriv.patch import PatchTrainConfig, train_patch_generator, PatchApplier
    >>> res = train_patch_generator(PatchTrainConfig(data=["faces/"], targets=["targets/"], out="gen/"))
    >>> applier = PatchApplier("gen/", target="someone.jpg")      # or no target: evasion
    >>> protected = applier.apply(image, landmarks)               # (3, H, W) in [0, 1]

Modules: :mod:`.generator` (the network, save/load), :mod:`.placement` (regions, warps,
EOT), :mod:`.losses` (identity, TV, printability, latent prior), :mod:`.train`,
:mod:`.apply`. See docs/patch.md.
"""

from .apply import PatchApplier, PatchApplyConfig, run_patch_apply
from .generator import GeneratorConfig, LatentDecoder, PatchGenerator, resolve_autoencoder
from .losses import (
    LatentScorePrior,
    PatchLossWeights,
    default_palette,
    load_palette,
    non_printability,
    patch_objective,
    total_variation,
)
from .placement import BUILTIN_REGIONS, EOTConfig, PatchRegion, get_region, paste_patch, patch_to_photo
from .train import PatchTrainConfig, PatchTrainer, TrainResult, train_patch_generator

__all__ = [
    "BUILTIN_REGIONS", "EOTConfig", "GeneratorConfig", "LatentDecoder", "LatentScorePrior", "PatchApplier",
    "PatchApplyConfig", "PatchGenerator", "PatchLossWeights", "PatchRegion", "PatchTrainConfig", "PatchTrainer",
    "TrainResult", "default_palette", "get_region", "load_palette", "non_printability", "paste_patch",
    "patch_objective", "patch_to_photo", "resolve_autoencoder", "run_patch_apply", "total_variation",
    "train_patch_generator",
]
