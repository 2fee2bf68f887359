"""Per-image iterative patch optimisation (the baseline the generator replaces).

:func:`optimize_patches` runs signed-gradient descent (PGD on the patch pixels, projected to
[0, 1]) on one patch per face of a photo, with the same surrogates, placement and objective
as generator training (:func:`~facepriv.patch.losses.patch_objective`), on the same context
canvas. It is what
``facepriv patch`` makes unnecessary at apply time - and the yardstick its speed and
protection are measured against (benchmarks/patch_benchmark.py).
"""

from __future__ import annotations

import torch

from ..attacks.identity import SurrogateEnsemble
from ..core.align import align_faces, invert_affine
from .losses import PatchLossWeights, default_palette, patch_objective
from .placement import (
    PlacementEOT,
    PatchRegion,
    color_jitter,
    compose,
    get_region,
    patch_to_photo,
    paste_patch,
    photo_to_reference,
    place_on_canvas,
    random_placement_jitter,
)


def optimize_patches(image: torch.Tensor, landmarks: torch.Tensor, surrogates: SurrogateEnsemble, *,
                     region: str | PatchRegion = "forehead", patch_size: int = 64, steps: int = 50,
                     step_size: float = 4 / 255, final_step_size: float = 1 / 255,
                     weights: PatchLossWeights | None = None, target_ref: dict[str, torch.Tensor] | None = None,
                     eot: PlacementEOT | None = None, init: torch.Tensor | float = 0.5,
                     palette: torch.Tensor | None = None, context_scale: float = 1.5,
                     context_margin: float = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise one patch per face of ``image`` (3, H, W); returns (patched image, patches).

    Like generator training, the faces are first cut out on a context canvas (the ArcFace
    template at ``context_scale`` with a margin; every surrogate re-aligns from it) and the
    patch is optimised there; the final patch is pasted into the photo once, with the same
    placement. ``target_ref``: per-surrogate target embeddings (1, D) for impersonation;
    None = evasion. The step size decays linearly from ``step_size`` to ``final_step_size``.
    """
    from .train import context_template

    weights = weights or PatchLossWeights()
    eot = eot or PlacementEOT(enabled=False)
    region = get_region(region)
    lms = torch.as_tensor(landmarks, dtype=torch.float32, device=image.device).reshape(-1, 5, 2)
    n = lms.shape[0]
    if n == 0:
        return image.clone(), image.new_zeros(0, 3, patch_size, patch_size)
    tpl = context_template(context_scale, context_margin)
    canvas = align_faces(image, lms, tpl).crops.detach()
    ctx = tpl.tensor(image.device).expand(n, 5, 2)
    idx = torch.arange(n, device=image.device)
    mask = region.patch_mask(patch_size, device=image.device)
    p2r = region.patch_to_reference(patch_size, device=image.device).expand(n, 2, 3)
    to_canvas = invert_affine(photo_to_reference(ctx))
    src_ref = surrogates.reference(canvas, ctx, image_index=idx)
    tgt = None if target_ref is None else {k: v.expand(n, -1) for k, v in target_ref.items()}
    has_t = None if tgt is None else torch.ones(n, dtype=torch.bool, device=image.device)
    if torch.is_tensor(init):
        patch = init.detach().clone().to(image).expand(n, 3, patch_size, patch_size).contiguous()
    else:
        patch = torch.full((n, 3, patch_size, patch_size), float(init), device=image.device)
    palette = palette if palette is not None else default_palette()
    for i in range(steps):
        patch.requires_grad_(True)
        jit = random_placement_jitter(n, region, eot, device=image.device)
        patched, _ = place_on_canvas(canvas, color_jitter(patch, eot), region, compose(to_canvas, compose(jit, p2r)))
        emb = surrogates.embed(patched, ctx, image_index=idx)
        terms = patch_objective(emb, src_ref, tgt, has_t, patch, weights, mask=mask, palette=palette)
        grad, = torch.autograd.grad(terms["total"] * n, patch)
        alpha = step_size + (final_step_size - step_size) * (i / max(1, steps - 1))
        with torch.no_grad():
            patch = (patch - alpha * grad.sign()).clamp(0.0, 1.0)
    patch = patch.detach()
    with torch.no_grad():
        return paste_patch(image, patch, region, patch_to_photo(region, patch_size, lms)), patch
