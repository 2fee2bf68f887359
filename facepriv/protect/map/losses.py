"""The four MAP objectives, each a function of the regenerated faces ``x_hat``.

All images are aligned face crops in ``[0, 1]`` at the score network's template and
resolution (``template`` names it, e.g. ``"celebahq-256"``; ``size`` the crop side when it
differs from the template's own size). Each loss returns one value per face ``(N,)`` unless
said otherwise; lower is better for every one of them.

Summaries of the paper call the two goals ``L_A`` (adversarial identity: cosine discrepancy to
the target) and ``L_E`` (expression: aligning expression embeddings); here they are ``L_id`` and
``L_exp``, the names the rest of facepriv uses.

* ``L_id`` (:func:`aligned_identity_loss`, the paper's adversarial identity objective): the surrogate
  ensemble sees ``x_hat`` re-aligned to each model's own template;
  impersonation ``1 - cos(f(x_hat), f(target))``, dodging ``cos(f(x_hat), f(x_src))``.
* ``L_exp`` (:func:`expression_loss`): cross-entropy of the expression classifier toward a
  label, or ``1 - cos`` to the expression embedding of a reference face.
* ``L_smooth`` (:func:`laplacian_smoothness`): mean squared Laplacian of the change
  ``x_hat - x`` (kornia), which penalises high-frequency noise and favours smooth edits.
* ``L_sm`` (:func:`score_matching_loss`): the DDPM denoising loss on the source faces, which
  keeps the fine-tuned network a score model of natural faces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.filters import laplacian

from ...attacks.identity import IdentityReference, SurrogateEnsemble
from ...attacks.identity import identity_loss as _ensemble_identity_loss
from ...core.align import align_faces, get_template
from .ddim import alphas_cumprod_of, predict_noise


def template_points(template: str, size: int | tuple[int, int], n: int, device=None) -> torch.Tensor:
    """The template's five landmarks in a crop of ``size`` pixels, repeated ``n`` times."""
    tpl = get_template(template)
    h, w = (size, size) if isinstance(size, int) else size
    pts = tpl.tensor(device) * torch.tensor([w / tpl.size[1], h / tpl.size[0]], device=device)
    return pts.expand(n, 5, 2)


def realign(crops: torch.Tensor, template: str, dst_template: str, dst_size: tuple[int, int]) -> torch.Tensor:
    """Differentiably warp aligned crops from ``template`` to ``dst_template`` at ``dst_size``."""
    n = crops.shape[0]
    pts = template_points(template, tuple(crops.shape[-2:]), n, crops.device)
    idx = torch.arange(n, device=crops.device)
    return align_faces(crops, pts, dst_template, size=tuple(dst_size), image_index=idx).crops


def embed_crops(ensemble: SurrogateEnsemble, crops: torch.Tensor, template: str) -> dict[str, torch.Tensor]:
    """Surrogate embeddings of aligned crops at any resolution of ``template``."""
    n = crops.shape[0]
    pts = template_points(template, tuple(crops.shape[-2:]), n, crops.device)
    return ensemble.embed(crops, pts, image_index=torch.arange(n, device=crops.device))


def aligned_identity_loss(ensemble: SurrogateEnsemble, x_hat: torch.Tensor, template: str,
                  reference: IdentityReference) -> torch.Tensor:
    """``L_id`` per face: impersonation when ``reference.target`` is set, else dodging.

    ``reference.source`` holds one embedding per face of ``x_hat`` (``(N, D)`` per model);
    ``reference.target`` one embedding ``(1, D)`` shared by all.
    """
    emb = embed_crops(ensemble, x_hat, template)
    if reference.target is not None:
        return _ensemble_identity_loss(emb, IdentityReference(target=reference.target), pull=1.0, push=0.0)
    return _ensemble_identity_loss(emb, IdentityReference(source=reference.source), pull=0.0, push=1.0)


def expression_inputs(expression_model, x_hat: torch.Tensor, template: str) -> torch.Tensor:
    """``x_hat`` re-aligned to the expression model's template (differentiable)."""
    return realign(x_hat, template, expression_model.template, tuple(expression_model.input_size))


def expression_loss(expression_model, x_hat: torch.Tensor, template: str, *, label: int | None = None,
                    ref_features: torch.Tensor | None = None) -> torch.Tensor:
    """``L_exp`` per face: cross-entropy toward ``label``, or ``1 - cos`` to ``ref_features``."""
    faces = expression_inputs(expression_model, x_hat, template)
    if ref_features is not None:
        feats = expression_model.features(faces)
        return 1 - F.cosine_similarity(feats, ref_features.to(feats).expand_as(feats), dim=-1)
    if label is None:
        raise ValueError("expression_loss needs a label or reference features")
    logits = expression_model(faces)
    target = torch.full((logits.shape[0],), int(label), device=logits.device, dtype=torch.long)
    return F.cross_entropy(logits.float(), target, reduction="none")


def laplacian_smoothness(x_hat: torch.Tensor, x: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """``L_smooth`` per face: mean squared Laplacian of the edit ``x_hat - x`` (kornia)."""
    delta = x_hat - x
    return laplacian(delta, kernel_size=kernel_size, border_type="replicate").pow(2).mean(dim=(1, 2, 3))


def score_matching_loss(net, x0: torch.Tensor, scheduler, *, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                        t_range: tuple[int, int] | None = None) -> torch.Tensor:
    """``L_sm``: ``|| eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) - eps ||^2`` (scalar).

    ``x0`` in [-1, 1]; ``t`` (N,) and ``noise`` are drawn (uniform timesteps in ``t_range``,
    default the whole schedule; Gaussian noise) when not given.
    """
    abar = alphas_cumprod_of(scheduler).to(x0.device, torch.float32)
    n = x0.shape[0]
    if t is None:
        lo, hi = t_range or (0, abar.shape[0])
        t = torch.randint(lo, hi, (n,), generator=generator, device="cpu").to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0)
    a = abar[t].view(n, 1, 1, 1).to(x0.dtype)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    eps = predict_noise(net, x_t, t)
    return F.mse_loss(eps.float(), noise.float())
