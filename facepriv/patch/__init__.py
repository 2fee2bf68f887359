"""``facepriv patch``: a conditional adversarial patch generator (train once, apply in one pass).

    >>> from facepriv.patch import PatchTrainConfig, train_patch_generator, PatchApplier
    >>> res = train_patch_generator(PatchTrainConfig(data=["faces/"], targets=["targets/"], out="gen/"))
    >>> applier = PatchApplier("gen/", target="someone.jpg")      # or no target: evasion
    >>> protected = applier.apply(image, landmarks)               # (3, H, W) in [0, 1]

Modules: :mod:`.generator` (the network, save/load), :mod:`.placement` (regions, warps,
EOT), :mod:`.losses` (identity, TV, printability, latent prior), :mod:`.train`,
:mod:`.apply`. See docs/patch.md.
"""

from .apply import PatchApplier, PatchApplyConfig, generator_warning, run_patch_apply
from .generator import GeneratorConfig, LatentDecoder, PatchGenerator, read_validation, resolve_autoencoder
from .losses import (
    LatentScorePrior,
    PatchLossWeights,
    default_palette,
    load_palette,
    non_printability,
    patch_objective,
    total_variation,
)
from .placement import BUILTIN_REGIONS, PlacementEOT, PatchRegion, get_region, paste_patch, patch_to_photo
from .train import (
    APPLY_WARN_RATE,
    GOOD_EVASION_RATE,
    PatchTrainConfig,
    PatchTrainer,
    TrainResult,
    train_patch_generator,
    validate_generator,
    validation_lines,
)

__all__ = [
    "APPLY_WARN_RATE", "BUILTIN_REGIONS", "GOOD_EVASION_RATE", "PlacementEOT", "GeneratorConfig", "LatentDecoder",
    "LatentScorePrior", "PatchApplier", "PatchApplyConfig", "PatchGenerator", "PatchLossWeights", "PatchRegion",
    "PatchTrainConfig", "PatchTrainer", "TrainResult", "default_palette", "generator_warning", "get_region",
    "load_palette", "non_printability", "paste_patch", "patch_objective", "patch_to_photo", "read_validation",
    "resolve_autoencoder", "run_patch_apply", "total_variation", "train_patch_generator", "validate_generator",
    "validation_lines",
]
