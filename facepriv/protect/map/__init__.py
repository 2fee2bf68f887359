"""MAP (Machine Pareidolia): protect faces by fine-tuning a diffusion score network.

* :mod:`.ddim` - deterministic, differentiable DDIM inversion and generation;
* :mod:`.losses` - ``L_id``, ``L_exp``, ``L_smooth``, ``L_sm``;
* :mod:`.projection` - gradient projection between the identity and expression objectives;
* :mod:`.tuner` - :class:`MAPConfig`, :class:`MAPTuner` (fine-tune + protect + save) and
  :class:`MAPEditor` (protect with a saved network).
"""

from .ddim import ddim_generate, ddim_invert, ddim_reconstruct, ddim_step, timestep_grid
from .loading import load_base_score_model
from .losses import aligned_identity_loss, expression_loss, laplacian_smoothness, score_matching_loss
from .projection import ConflictStats, EMAGradients, pcgrad_combine
from .tuner import MAPConfig, MAPEditor, MAPTuner, align_for_score_model, paste_protected

__all__ = [
    "ConflictStats", "EMAGradients", "MAPConfig", "MAPEditor", "MAPTuner", "align_for_score_model",
    "aligned_identity_loss", "ddim_generate", "ddim_invert", "ddim_reconstruct", "ddim_step", "expression_loss",
    "laplacian_smoothness", "load_base_score_model", "paste_protected", "pcgrad_combine", "score_matching_loss",
    "timestep_grid",
]
