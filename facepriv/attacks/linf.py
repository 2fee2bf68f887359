"""L-inf attacks on the pixels of the original photo: PGD, MI-FGSM, TI-DIM, TIP-IM.

The perturbation lives on the photo itself, inside each face's region, and reaches the
surrogate models through the same differentiable alignment the models use at inference
(:meth:`SurrogateEnsemble.embed`), so what is optimised is exactly what is saved:

* the work happens on one crop around the faces (the union of their regions and of the areas
  every surrogate's alignment reads, plus a margin for input diversity): embeddings on the
  crop equal embeddings on the full photo, and a 24-megapixel photo costs what its faces cost;
* the budget is per pixel, ``epsilon x region mask``: pixels outside the region never change
  and a feathered edge tapers the change to zero;
* the result is rounded to the output's levels (``cfg.quantize``, 255 for 8-bit files) and
  re-clipped onto grid values inside the budget, so the saved file satisfies
  ``|x_adv - x| <= epsilon`` exactly, not only the float tensor.

All faces of a photo are attacked in one batch; with ``early_stop`` a face leaves the batch
(its pixels freeze) once every surrogate is past its threshold by the margin.

TIP-IM (Yang et al., "Towards Face Encryption by Generating Adversarial Identity Masks",
ICCV 2021) is reproduced in its core: targeted identity protection with an objective that pulls
the face towards a target identity and pushes it from the source (``push_weight``), a
naturalness term weighted by gamma (``naturalness_weight``; MMD as in the paper, over patches,
or the high-frequency proxy), momentum with input diversity, and, when several target
identities are given, a per-iteration choice among them by the paper's gain function
(``log(1 + max_t exp(sim(x, t) - sim(x, source)))``, the "gain3" of the public code, with cosine
similarities). Not reproduced: the paper's L2-norm variant, its models and its LFW protocol; the
target set is whatever the caller passes (one or several target photos), not a curated one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.align import get_template, invert_affine, similarity_transform, transform_points
from ..core.errors import ConfigError
from ..core.faces import Face
from .config import METHODS, AttackConfig, AttackResult
from .crop import FaceCrop, face_crop
from .identity import IdentityReference, SurrogateEnsemble, identity_loss
from .naturalness import naturalness_loss
from .transforms import diversify, scaled_kernel, ti_smooth


# ----------------------------------------------------------------------------- helpers
MOVED_TOL = 1e-4  # a surrogate "moved" when its similarity or its cosine to the clean face changed by more


def quantize_within(x: torch.Tensor, x_adv: torch.Tensor, budget: torch.Tensor | float,
                    levels: int | None = 255) -> torch.Tensor:
    """Round ``x_adv`` to ``levels`` and re-clip it onto grid values within ``|. - x| <= budget``.

    Where no grid value lies inside the budget (budget below one level and ``x`` off the grid),
    the original value is kept. With ``levels=None`` only the clip to [0, 1] and the budget apply.
    """
    dtype = x.dtype
    f64 = torch.float64 if x.device.type != "mps" else torch.float32  # MPS has no float64
    xd, ad = x.to(f64), x_adv.to(f64)
    budget = torch.as_tensor(budget, device=x.device).to(f64)
    lo = (xd - budget).clamp(0.0, 1.0)
    hi = (xd + budget).clamp(0.0, 1.0)
    if levels is None:
        return torch.maximum(torch.minimum(ad, hi), lo).to(dtype)
    L = float(levels)
    tol = 1e-6 if f64 is torch.float64 else 1e-3  # in levels: absorbs the float error of x * L only
    q = torch.round(ad.clamp(0.0, 1.0) * L) / L
    glo = torch.ceil(lo * L - tol) / L
    ghi = torch.floor(hi * L + tol) / L
    q = torch.maximum(torch.minimum(q, ghi), glo)
    return torch.where(glo > ghi, xd, q).to(dtype)


def _calibrated(name: str, far: str) -> float | None:
    """A threshold calibrated earlier with ``facepriv audit calibrate`` (FACEPRIV_HOME/thresholds)."""
    from ..models.thresholds import load_calibrated

    cal = load_calibrated(name)
    t = (cal or {}).get("thresholds", {}).get(far)
    return None if t is None else float(t)


def surrogate_thresholds(ensemble: SurrogateEnsemble, cfg: AttackConfig, *, required: bool) -> dict[str, float | None]:
    """Per-surrogate thresholds in the model's similarity units.

    Order: ``cfg.thresholds[name]``, the spec's published protocol threshold at FAR ``cfg.far``,
    a calibration stored by ``facepriv audit calibrate``, the spec's shipped (LFW) threshold at
    that FAR, the spec's ``default`` operating threshold.
    """
    out: dict[str, float | None] = {}
    missing = []
    for name, m in zip(ensemble.names, ensemble.members):
        spec_t = dict(getattr(m.spec, "thresholds", {}) or {})
        t = (cfg.thresholds or {}).get(name)
        shipped = getattr(m.spec, "threshold_kind", "protocol") == "shipped"
        if t is None and not shipped:  # published protocol values win over a stored calibration
            t = spec_t.get(cfg.far)
        if t is None:
            t = _calibrated(name, cfg.far)
        if t is None:  # values facepriv ships (LFW) give way to the user's own calibration
            t = spec_t.get(cfg.far)
        if t is None:
            t = spec_t.get("default")
        out[name] = None if t is None else float(t)
        if t is None:
            missing.append(name)
    if required and missing:
        raise ConfigError(
            f"early stopping needs a verification threshold for every surrogate; none known for "
            f"{', '.join(missing)} (pass thresholds={{name: value}} in the attack config, in the "
            f"model's similarity units, run `facepriv audit calibrate` for it, or turn early_stop off)")
    return out


def _metric_sim(metric: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from ..models.recognition import similarity

    return similarity(a, b.expand_as(a), metric)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b.expand_as(a), dim=-1)


def _ensemble_device(ensemble: SurrogateEnsemble, fallback: torch.device) -> torch.device:
    for p in ensemble.parameters():
        return p.device
    for b in ensemble.buffers():
        return b.device
    return fallback


def _read_extents(ensemble: SurrogateEnsemble, lm: torch.Tensor, grow: float) -> torch.Tensor:
    """(N, 4) x0, y0, x1, y1 of the photo area each face's alignments read, for all surrogates."""
    boxes = []
    for m in ensemble.members:
        tpl = get_template(m.spec.template)
        h, w = tuple(m.spec.input_size or tpl.size)
        dst = tpl.tensor(lm.device) * torch.tensor([w / tpl.size[1], h / tpl.size[0]], device=lm.device)
        mats = similarity_transform(lm, dst)
        inv = invert_affine(mats)
        corners = torch.tensor([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], dtype=torch.float32, device=lm.device)
        pts = transform_points(inv, corners[None].expand(lm.shape[0], 4, 2))
        scale = torch.linalg.det(mats[:, :, :2]).abs().sqrt()
        margin = 4.0 / scale + 2.0
        lo, hi = pts.min(1).values, pts.max(1).values
        pad = (hi - lo) * grow + margin[:, None]
        boxes.append(torch.cat([lo - pad, hi + pad], 1))
    b = torch.stack(boxes, 0)
    return torch.cat([b[..., :2].min(0).values, b[..., 2:].max(0).values], 1)


def _normalise(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """g / mean |g| over the mask (the L1 normalisation of MI-FGSM, size-independent)."""
    w = mask.expand_as(g)
    return g / ((g.abs() * w).sum() / w.sum().clamp_min(1.0)).clamp_min(1e-12)


def _as_rows(t: torch.Tensor, device) -> torch.Tensor:
    t = torch.as_tensor(t).detach().to(device, torch.float32)
    return t.reshape(1, -1) if t.dim() == 1 else t.reshape(t.shape[0], -1)


# ----------------------------------------------------------------------------- the attack
@dataclass
class _Problem:
    """What one attack works on, fixed for its whole run.

    ``crop``: the working crop (see :mod:`facepriv.attacks.crop`; ``x``, ``lm``, ``masks``,
    ``union``, ``owner``, ``sizes`` are its fields); ``budget``: ``epsilon x union``, per pixel;
    ``ti_k``: the TI kernel scaled to the faces (0: none); ``src``: the clean embeddings
    {surrogate: (n, D)}; ``tgt_rows``: the target embeddings {surrogate: (T, D)} or None when
    dodging; ``thresholds`` and ``metrics`` per surrogate; ``dev``: the ensemble's device.
    """

    cfg: AttackConfig
    ensemble: SurrogateEnsemble
    crop: FaceCrop
    budget: torch.Tensor
    ti_k: object
    src: dict[str, torch.Tensor]
    tgt_rows: dict[str, torch.Tensor] | None
    thresholds: dict[str, float | None]
    metrics: dict[str, str]
    dev: torch.device

    @property
    def n(self) -> int:
        """Number of faces attacked (those with a region on the image)."""
        return len(self.crop.ids)

    @property
    def n_targets(self) -> int:
        """Candidate target identities (1 when dodging or for a single-target method)."""
        return 1 if self.tgt_rows is None else next(iter(self.tgt_rows.values())).shape[0]


@dataclass
class _State:
    """What changes during the run: the perturbation ``delta`` and momentum ``acc`` (crop-sized),
    the first-step ``probe`` offset (or None), and per face whether it is still ``active``,
    ``steps_used``, whether it ``stopped`` early and the ``chosen`` target index (tipim)."""

    delta: torch.Tensor
    acc: torch.Tensor
    probe: torch.Tensor | None
    active: torch.Tensor
    steps_used: torch.Tensor
    stopped: torch.Tensor
    chosen: torch.Tensor


def _diversity_grow(cfg: AttackConfig) -> float:
    """Extra read margin (fraction of each alignment's area) the input-diversity transforms need."""
    return (cfg.diversity_scale + cfg.diversity_shift + math.sin(math.radians(cfg.diversity_rotate))) \
        if cfg.diversity_prob > 0 else 0.0


def _target_rows(ensemble: SurrogateEnsemble, cfg: AttackConfig, target_ref: dict[str, torch.Tensor] | None,
                 dev) -> dict[str, torch.Tensor] | None:
    """The target embeddings as (T, D) rows per surrogate; one identity's centroid unless tipim."""
    if target_ref is None:
        return None
    missing = [nm for nm in ensemble.names if nm not in target_ref]
    if missing:
        raise ConfigError(f"the target reference has no embedding for surrogate(s) {', '.join(missing)}")
    tgt_rows = {nm: _as_rows(target_ref[nm], dev) for nm in ensemble.names}
    if not METHODS[cfg.method].multi_target:
        tgt_rows = {nm: t.mean(0, keepdim=True) for nm, t in tgt_rows.items()}  # one identity's centroid
    return tgt_rows


def _prepare(crop: FaceCrop, ensemble: SurrogateEnsemble, cfg: AttackConfig,
             target_ref: dict[str, torch.Tensor] | None, dev) -> _Problem:
    """Thresholds, metrics, budget, TI kernel and the clean / target references for ``crop``."""
    thresholds = surrogate_thresholds(ensemble, cfg, required=cfg.early_stop)
    metrics = {n: getattr(m.spec, "metric", None) or "cosine" for n, m in zip(ensemble.names, ensemble.members)}
    budget = cfg.epsilon * crop.union
    ti_k = scaled_kernel(cfg.ti_kernel, float(crop.sizes.median()))
    with torch.no_grad():
        src = {k: v.detach() for k, v in ensemble.embed(crop.x, crop.lm).items()}
    tgt_rows = _target_rows(ensemble, cfg, target_ref, dev)
    return _Problem(cfg, ensemble, crop, budget, ti_k, src, tgt_rows, thresholds, metrics, dev)


def _start(p: _Problem, gen: torch.Generator | None) -> _State:
    """The initial state: a random start inside the budget, or zero with a first-step probe when dodging."""
    x, cfg, union = p.crop.x, p.cfg, p.crop.union
    n, dev = p.n, p.dev
    chosen = torch.zeros(n, dtype=torch.long, device=dev)
    delta = torch.zeros_like(x)
    probe = None
    if cfg.random_start:
        noise = (torch.rand(x.shape, generator=gen) * 2 - 1).to(dev)
        delta = (x + noise * p.budget).clamp(0, 1) - x
    elif p.tgt_rows is None:
        # The clean photo is a stationary point of the dodging objective: cos(e, e_clean) is at
        # its maximum there, so its gradient is zero up to float rounding. Started from zero, the
        # first step would follow the sign of rounding noise, or - where the rounding cancels
        # exactly - leave every pixel where it is, and so would every later step (delta stays 0).
        # The first gradient is therefore taken at a nearby point, seeded noise of one step_size
        # inside the region; the perturbation itself still starts at zero.
        noise = (torch.rand(x.shape, generator=gen) * 2 - 1).to(dev)
        probe = (x + noise * min(cfg.step_size, cfg.epsilon) * union).clamp(0, 1) - x
    return _State(delta=delta, acc=torch.zeros_like(x), probe=probe,
                  active=torch.ones(n, dtype=torch.bool, device=dev),
                  steps_used=torch.zeros(n, dtype=torch.long), stopped=torch.zeros(n, dtype=torch.bool),
                  chosen=chosen)


def _objective_refs(p: _Problem, ai: torch.Tensor, j: int) -> tuple[IdentityReference, float, float]:
    """The identity objective's references for faces ``ai`` and target ``j``, with pull / push weights."""
    source = {k: v[ai] for k, v in p.src.items()}
    if p.tgt_rows is None:
        return IdentityReference(source=source), 0.0, 1.0
    target = {k: v[j: j + 1] for k, v in p.tgt_rows.items()}
    return IdentityReference(source=source, target=target), 1.0, float(p.cfg.push_weight)


def _step_from(p: _Problem, g_id: torch.Tensor, delta_now: torch.Tensor, acc_now: torch.Tensor,
               act_pix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One signed step from the identity gradient ``g_id``: TI smoothing, L1 normalisation, the
    naturalness gradient, momentum; clipped to the budget and to [0, 1]. Returns (delta, acc)."""
    cfg, x, union, budget = p.cfg, p.crop.x, p.crop.union, p.budget
    g = g_id * union
    if p.ti_k:
        g = ti_smooth(g, p.ti_k)
    g = _normalise(g, union)
    if cfg.naturalness_weight > 0:
        d = delta_now.clone().requires_grad_(True)
        nat = naturalness_loss(cfg.naturalness, x + d, x, union, cfg.epsilon)
        gn = torch.autograd.grad(nat, d)[0] * union
        if gn.abs().sum() > 0:
            g = g + cfg.naturalness_weight * _normalise(gn, union)
    if cfg.momentum > 0:
        acc_new = cfg.momentum * acc_now + g
        direction = acc_new.sign()
    else:
        acc_new = acc_now
        direction = g.sign()
    new = delta_now - cfg.step_size * direction * act_pix
    new = torch.maximum(torch.minimum(new, budget), -budget)
    new = (x + new).clamp(0, 1) - x
    return new, acc_new


def _reached(p: _Problem, delta: torch.Tensor, ai: torch.Tensor) -> torch.Tensor:
    """Per face of ``ai``: every surrogate is past its threshold by the margin on the quantised image."""
    cfg, x = p.cfg, p.crop.x
    with torch.no_grad():
        xq = quantize_within(x, x + delta, p.budget, cfg.quantize)
        emb_q = p.ensemble.embed(xq, p.crop.lm[ai])
        done = torch.ones(len(ai), dtype=torch.bool, device=p.dev)
        for nm, e in emb_q.items():
            t = p.thresholds[nm]
            if p.tgt_rows is None:
                s = _metric_sim(p.metrics[nm], e, p.src[nm][ai])
                done &= s < t - cfg.early_stop_margin
            else:
                s = torch.stack([_metric_sim(p.metrics[nm], e, r[None]) for r in p.tgt_rows[nm]], 0).amax(0)
                done &= s >= t + cfg.early_stop_margin
    return done


def _attack_step(p: _Problem, s: _State, step: int, gen: torch.Generator | None) -> None:
    """One iteration on the active faces: gradient(s), the step (TIP-IM: per-face best target),
    the step count and the early-stop bookkeeping. Updates ``s`` in place."""
    cfg, x, crop = p.cfg, p.crop.x, p.crop
    ai = torch.nonzero(s.active).flatten()
    act_pix = (crop.masks[ai].amax(0) > 0).to(x.dtype)
    d = (s.delta + s.probe if s.probe is not None and step == 0 else s.delta).clone().requires_grad_(True)
    xin, lmi = x + d, crop.lm[ai]
    if cfg.diversity_prob > 0 and float(torch.rand(1, generator=gen)) < cfg.diversity_prob:
        xin, lmi = diversify(xin, lmi, crop.sizes[ai], scale=cfg.diversity_scale, shift=cfg.diversity_shift,
                             rotate=cfg.diversity_rotate, generator=gen)
    emb = p.ensemble.embed(xin, lmi)
    n_targets = p.n_targets
    candidates = []
    for j in range(n_targets):
        ref, pull, push = _objective_refs(p, ai, j)
        loss = identity_loss(emb, ref, pull=pull, push=push).sum()
        g = torch.autograd.grad(loss, d, retain_graph=j < n_targets - 1)[0]
        candidates.append(_step_from(p, g, s.delta.detach(), s.acc, act_pix))
    if n_targets == 1:
        s.delta, s.acc = candidates[0]
    else:
        s.delta, s.acc, best = _select_targets(candidates, x, crop.lm, ai, p.src, p.tgt_rows, p.ensemble,
                                               crop.owner, s.delta, s.acc)
        s.chosen[ai] = best
    s.steps_used[ai.cpu()] += 1
    if cfg.early_stop:
        done = _reached(p, s.delta, ai)
        with torch.no_grad():
            s.stopped[ai[done].cpu()] = True
            s.active[ai[done]] = False


def _optimise(p: _Problem, s: _State, gen: torch.Generator | None, progress=None) -> None:
    """Up to ``cfg.steps`` iterations, until no face is active; advances ``progress`` per step."""
    cfg, n = p.cfg, p.n
    task = progress.add_task(f"{cfg.method} ({n} face{'s' if n != 1 else ''})", total=cfg.steps) if progress is not None else None
    for step in range(cfg.steps):
        if not bool(s.active.any()):
            break
        _attack_step(p, s, step, gen)
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.update(task, completed=cfg.steps, visible=False)


def _face_similarities(p: _Problem, k: int, emb_after: dict[str, torch.Tensor],
                       chosen: torch.Tensor) -> tuple[dict[str, dict], dict[str, dict], bool]:
    """For attacked face ``k``: the ``similarity`` rows per surrogate (before / after against the
    objective's reference, threshold, passed, metric), the ``target_cosine`` rows (with a target)
    and whether any surrogate moved."""
    sim: dict[str, dict] = {}
    tcos: dict[str, dict] = {}
    moved = False
    src, tgt_rows = p.src, p.tgt_rows
    for nm in p.ensemble.names:
        metric = p.metrics[nm]
        if tgt_rows is None:
            before = float(_metric_sim(metric, src[nm][k: k + 1], src[nm][k: k + 1])) + 0.0  # no -0.0
            after = float(_metric_sim(metric, emb_after[nm][k: k + 1], src[nm][k: k + 1]))
        else:
            j = int(chosen[k])
            ref = tgt_rows[nm][j: j + 1]
            before = float(_metric_sim(metric, src[nm][k: k + 1], ref))
            after = float(_metric_sim(metric, emb_after[nm][k: k + 1], ref))
            tcos[nm] = {"before": round(float(_cos(src[nm][k: k + 1], ref)), 5),
                        "after": round(float(_cos(emb_after[nm][k: k + 1], ref)), 5)}
        src_cos = float(_cos(emb_after[nm][k: k + 1], src[nm][k: k + 1]))
        moved |= abs(after - before) > MOVED_TOL or 1.0 - src_cos > MOVED_TOL
        t = p.thresholds[nm]
        passed = None
        if t is not None:
            passed = after < t if tgt_rows is None else after >= t
        sim[nm] = {"before": round(before, 5), "after": round(after, 5), "threshold": t, "passed": passed,
                   "metric": metric}
    return sim, tcos, moved


def _face_row(p: _Problem, s: _State, k: int, i: int, mode: str, emb_after: dict[str, torch.Tensor],
              linf_face: float) -> dict:
    """The ``per_face`` entry of attacked face ``k`` (``faces[i]``); see :func:`attack_faces`."""
    src = p.src
    sim, tcos, moved = _face_similarities(p, k, emb_after, s.chosen)
    row = {"face": i, "status": "attacked", "mode": mode, "steps": int(s.steps_used[k]),
           "early_stopped": bool(s.stopped[k]), "similarity": sim,
           "source_cosine": {nm: round(float(_cos(emb_after[nm][k: k + 1], src[nm][k: k + 1])), 5)
                             for nm in p.ensemble.names},
           "linf": linf_face}
    if linf_face == 0:
        row.update(status="failed", reason="the attack changed no pixel")
    elif not moved:
        row.update(status="failed", reason="no surrogate moved")
    if p.tgt_rows is not None:
        row["target_cosine"] = tcos
        if METHODS[p.cfg.method].multi_target:
            row["target_index"] = int(s.chosen[k])
    return row


def _finish(p: _Problem, s: _State, x_full: torch.Tensor, image: torch.Tensor, per_face: list[dict],
            mode: str) -> AttackResult:
    """The final image (quantised inside the budget, pasted into the photo) and the report."""
    x, crop = p.crop.x, p.crop
    q = quantize_within(x, x + s.delta, p.budget, p.cfg.quantize)
    out = crop.paste(x_full, q)
    with torch.no_grad():
        emb_after = p.ensemble.embed(q, crop.lm)
    linf_faces = [float(((q - x).abs() * (crop.masks[k] > 0)).amax()) for k in range(p.n)]
    for k, i in enumerate(crop.ids):
        per_face[i] = _face_row(p, s, k, i, mode, emb_after, linf_faces[k])
    linf = float((q - x).abs().max())
    return AttackResult(out.to(image.device, image.dtype), per_face, linf, p.cfg.to_json())


def attack_faces(image: torch.Tensor, faces: list[Face], ensemble: SurrogateEnsemble, cfg: AttackConfig,
                 target_ref: dict[str, torch.Tensor] | None = None, progress=None) -> AttackResult:
    """Protect ``faces`` of ``image`` (3, H, W) in [0, 1] against the surrogates of ``ensemble``.

    Dodging (``target_ref`` None): push each face away from its own clean embedding.
    Impersonation (``target_ref`` {surrogate: (D,) or (T, D)}): pull it towards the target; for
    pgd / mifgsm / tidim several rows are photos of one target identity (their mean is used), for tipim they are candidate target identities (the best is chosen per step).

    Returns an :class:`AttackResult` whose ``per_face[i]`` describes ``faces[i]``: ``status``
    (attacked | failed | skipped; ``reason`` with the last two: "the attack changed no pixel",
    "no surrogate moved", "region outside the image"; a failed or skipped face is unprotected),
    ``mode``, ``steps`` used, ``early_stopped``, ``similarity`` per surrogate
    ``{before, after, threshold, passed, metric}`` against the objective's reference
    (the clean face when dodging, the target when impersonating; model similarity units,
    higher = same), ``source_cosine`` (cosine to the clean face after the attack),
    ``target_cosine`` {before, after} with a target, ``target_index`` (tipim) and ``linf``.
    ``progress``: an optional rich Progress (one task, advanced per step).
    """
    cfg = cfg.resolved()
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"attack_faces expects an RGB image (3, H, W), got {tuple(image.shape)}")
    if METHODS[cfg.method].needs_target and target_ref is None:
        raise ConfigError(f"{cfg.method} is a targeted method: give a target identity (target image)")
    dev = _ensemble_device(ensemble, image.device)
    x_full = image.detach().to(dev, torch.float32)
    mode = "impersonation" if target_ref is not None else "dodging"
    per_face: list[dict] = [{"face": i, "status": "skipped", "reason": "region outside the image", "mode": mode,
                             "steps": 0, "early_stopped": False} for i in range(len(faces))]
    crop = face_crop(x_full, faces, ensemble, region=cfg.region, feather=cfg.feather, grow=_diversity_grow(cfg))
    if crop is None:
        return AttackResult(image.detach().clone(), per_face, 0.0, cfg.to_json())
    p = _prepare(crop, ensemble, cfg, target_ref, dev)
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator().manual_seed(int(cfg.seed))
    s = _start(p, gen)
    _optimise(p, s, gen, progress)
    return _finish(p, s, x_full, image, per_face, mode)


def _select_targets(candidates, x, lm, ai, src, tgt_rows, ensemble, owner, delta, acc):
    """TIP-IM's per-step target choice: per face, keep the candidate step with the largest gain."""
    n_t = len(candidates)
    with torch.no_grad():
        imgs = torch.stack([x + c[0] for c in candidates], 0)  # (T, 3, h, w)
        k = len(ai)
        lms = lm[ai].repeat(n_t, 1, 1)
        idx = torch.arange(n_t, device=x.device).repeat_interleave(k)
        emb = ensemble.embed(imgs, lms, image_index=idx)
        gains = torch.zeros(n_t, k, device=x.device)
        for nm, e in emb.items():
            e = F.normalize(e, dim=-1).reshape(n_t, k, -1)
            s_src = (e * F.normalize(src[nm][ai], dim=-1)[None]).sum(-1)  # (T, k)
            s_tgt = e @ F.normalize(tgt_rows[nm], dim=-1).T  # (T, k, n_targets)
            gains += torch.log1p(torch.exp(s_tgt - s_src[..., None]).amax(-1))
        best = gains.argmax(0)  # (k,)
    new_delta, new_acc = delta.clone(), acc.clone()
    for kk, face in enumerate(ai.tolist()):
        pix = (owner == face)[None]
        new_delta = torch.where(pix, candidates[int(best[kk])][0], new_delta)
        new_acc = torch.where(pix, candidates[int(best[kk])][1], new_acc)
    return new_delta, new_acc, best
