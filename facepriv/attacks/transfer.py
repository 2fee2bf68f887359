"""Protective noise made to hold against face-recognition models it never saw.

Noise optimised against a few models (PGD and friends) defeats those models and barely moves
others. This attack combines what the literature shows buys transfer, each piece switchable:

* **hardest-model weighting**: the per-model losses are mixed by a softmax over how far each
  surrogate still is above its own threshold (``hardest`` = temperature; 0 = plain mean), so
  the model that still recognises the face gets the effort, not the one already fooled;
* **model augmentation**: random dropout on the surrogates' convolution outputs (DFANet) and
  blurred input copies (LowKey), see :mod:`.eot`;
* **expectation over transformation**: each step averages the gradient over ``copies`` random
  views (landmark jitter, rescale / rotation / shift of the alignment, resize, blur,
  differentiable JPEG), so the protection survives re-detection, resizing and re-upload;
* **an identity-level objective**: the face is pushed away from the centre of the person's
  embeddings (the clean face plus the person's other photos when given), not only from itself;
  optionally pulled towards an anchor identity;
* **a perceptual budget** (:mod:`.budget`): a texture-shaped L-inf cap and a face-region PSNR
  floor instead of uniform ``±epsilon`` sign noise; updates are normalised gradients with light
  Gaussian smoothing (no sign), so the change is smooth at the photo's own resolution;
* **verified escalation**: the budget starts at ``start_psnr`` and is raised level by level
  (``psnr_step`` dB) down to the ``min_psnr`` floor only while a *checker* still matches the
  face; checkers are held-out recognisers (never surrogates) when given, else the surrogates.

:func:`transfer_attack` returns an :class:`~facepriv.attacks.config.AttackResult` whose per-face
rows carry the similarity before/after of every surrogate and checker, the verdicts at the
FAR threshold, the face-region PSNR and the PSNR level reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d

from ..core.align import align_faces
from ..core.config import ConfigBase
from ..core.errors import ConfigError
from ..core.faces import Face
from ..core.regions import REGIONS
from .budget import allowed_mse, masked_psnr, project_psnr, texture_weights
from .config import AttackResult
from .crop import FaceCrop, face_crop
from .eot import EOTConfig, feature_dropout, random_views


@dataclass
class TransferConfig(ConfigBase):
    """Settings of :func:`transfer_attack` (each technique can be switched off on its own).

    min_psnr / start_psnr / psnr_step: the quality floor of each face region (dB), the level the
    budget starts at, and how much it is raised per escalation (start = floor: no escalation).
    steps / level_steps: optimisation steps at the first level / at each further level.
    person_steps / refine_steps: steps of a person's shared pattern (:func:`person_pattern`) and
    first-level steps of a photo warm-started from it.
    copies: random views per step (EOT); ``eot`` None = views are the plain crop.
    hardest: softmax temperature of the hardest-model weighting (0 = plain mean).
    dropout: feature-dropout probability in the surrogates (0 = off).
    texture: how strongly local texture shapes the L-inf cap (0 = uniform).
    linf_cap: largest change of any pixel; smooth: gradient smoothing sigma, pixels of a 100 px face.
    pull: weight of the pull towards the anchor identity (when one is given).
    check_margin: a checker counts as fooled when its similarity is below threshold - margin.
    """

    config_name = "transfer option"

    min_psnr: float = 32.0
    start_psnr: float = 36.0
    psnr_step: float = 2.0
    steps: int = 16
    level_steps: int = 8
    person_steps: int = 12  # steps of the per-person pattern (OPOM-style warm start), 3 photos each
    refine_steps: int = 6  # first-level steps of a photo that starts from its person's pattern
    copies: int = 2
    eot: EOTConfig | None = field(default_factory=EOTConfig)
    hardest: float = 0.05
    dropout: float = 0.05
    texture: float = 0.7
    linf_cap: float = 16 / 255
    smooth: float = 1.0
    momentum: float = 0.8
    step_scale: float = 0.5
    pull: float = 0.5
    check_margin: float = 0.0
    region: str = "face"
    feather: float = 0.1
    far: str = "1e-2"
    quantize: int | None = 255
    seed: int | None = 0

    def __post_init__(self):
        if isinstance(self.eot, dict):
            self.eot = EOTConfig.from_dict({**self.eot, "jpeg_quality": tuple(self.eot.get("jpeg_quality", (60, 95)))})

    def validate(self) -> TransferConfig:
        if not 10.0 <= self.min_psnr <= 60.0:
            raise ConfigError(f"min_psnr must be between 10 and 60 dB, not {self.min_psnr}")
        if self.start_psnr < self.min_psnr:
            raise ConfigError(f"start_psnr ({self.start_psnr}) must be >= min_psnr ({self.min_psnr})")
        if self.psnr_step <= 0:
            raise ConfigError("psnr_step must be > 0")
        if self.steps < 1 or self.level_steps < 0 or self.copies < 1:
            raise ConfigError("steps and copies must be >= 1, level_steps >= 0")
        if not 0.0 < self.linf_cap <= 64 / 255:
            raise ConfigError(f"linf_cap must be in (0, 64/255], not {self.linf_cap}")
        if not 0.0 <= self.dropout < 1.0 or self.hardest < 0 or not 0.0 <= self.texture <= 1.0:
            raise ConfigError("dropout must be in [0, 1), hardest >= 0, texture in [0, 1]")
        if self.region not in REGIONS:
            raise ConfigError(f"unknown region {self.region!r}; use one of {', '.join(REGIONS)}")
        return self

    def levels(self) -> list[float]:
        """The PSNR targets, from ``start_psnr`` down to (and including) ``min_psnr``."""
        out, p = [], self.start_psnr
        while p > self.min_psnr + 1e-6:
            out.append(round(p, 3))
            p -= self.psnr_step
        return [*out, self.min_psnr]


# ----------------------------------------------------------------------------- embeddings
def embed_views(models, views: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Embeddings ``{name: (V * N, D)}`` of N faces in each of V views, one forward per model."""
    out = {}
    for name, m in zip(models.names, models.members):
        crops = [align_faces(xv, lv, m.spec.template, size=tuple(m.spec.input_size)).crops for xv, lv in views]
        out[name] = m(torch.cat(crops, 0))
    return out


def cosine_thresholds(models, thresholds: dict[str, float | None]) -> dict[str, float]:
    """Each model's threshold as a cosine (euclidean models: ``1 - d^2 / 2`` on unit vectors)."""
    out = {}
    for name, m in zip(models.names, models.members):
        t = thresholds.get(name)
        if t is None:
            out[name] = 0.3
        elif (getattr(m.spec, "metric", None) or "cosine") == "euclidean":
            out[name] = 1.0 - (float(t) ** 2) / 2.0
        else:
            out[name] = float(t)
    return out


def identity_centres(own: dict[str, torch.Tensor], person: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Unit centres ``{name: (N, D)}``: each face's own embedding averaged with the person's other photos."""
    out = {}
    for name, e in own.items():
        e = F.normalize(e, dim=-1)
        if person is not None and name in person and person[name].numel():
            others = F.normalize(person[name].to(e), dim=-1)
            e = F.normalize((e + others.sum(0, keepdim=True)) / (1 + others.shape[0]), dim=-1)
        out[name] = e
    return out


def transfer_loss(emb: dict[str, torch.Tensor], centres: dict[str, torch.Tensor], cthr: dict[str, float],
                  hardest: float, anchor: dict[str, torch.Tensor] | None = None, pull: float = 0.0) -> torch.Tensor:
    """Loss per (view x face) row: hardest-weighted cosine to the identity centre (lower = better)."""
    names = list(emb)
    n = next(iter(emb.values())).shape[0]
    cos = torch.stack([F.cosine_similarity(emb[k], centres[k].repeat(n // centres[k].shape[0], 1), dim=-1)
                       for k in names], -1)  # (rows, models)
    if hardest > 0:
        margin = cos.detach() - torch.tensor([cthr[k] for k in names], device=cos.device)
        w = torch.softmax(margin / hardest, dim=-1)
    else:
        w = torch.full_like(cos, 1.0 / len(names))
    loss = (w * cos).sum(-1)
    if anchor is not None and pull > 0:
        a = torch.stack([F.cosine_similarity(emb[k], anchor[k].to(emb[k]).expand_as(emb[k]), dim=-1)
                         for k in names], -1)
        loss = loss - pull * a.mean(-1)
    return loss


# ----------------------------------------------------------------------------- the attack
@dataclass
class _State:
    crop: FaceCrop
    delta: torch.Tensor
    acc: torch.Tensor
    cap: torch.Tensor
    active: torch.Tensor
    level: list[float]
    steps: list[int]


def _smooth(g: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.3:
        return g
    k = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur2d(g[None], (k, k), (sigma, sigma), border_type="reflect")[0]


def _unit_rms(g: torch.Tensor, pix: torch.Tensor) -> torch.Tensor:
    """``g`` divided by its root mean square over the pixels where ``pix`` is set."""
    n = (pix.sum() * g.shape[0]).clamp_min(1.0)
    return g / ((g * pix).pow(2).sum() / n).sqrt().clamp_min(1e-12)


def _step(st: _State, ensemble, centres, cthr, cfg: TransferConfig, psnr: float, anchor, rng) -> None:
    """One optimisation step of the active faces at the PSNR level ``psnr``."""
    c = st.crop
    ai = torch.nonzero(st.active).flatten()
    pix = (c.masks[ai].amax(0) > 0).to(c.x.dtype)
    d = st.delta.clone().requires_grad_(True)
    xin = (c.x + d).clamp(0, 1)
    views = random_views(xin, c.lm[ai], c.sizes[ai], cfg.copies, cfg.eot, rng)
    with feature_dropout(list(ensemble.members), cfg.dropout, rng):
        emb = embed_views(ensemble, views)
    cen = {k: v[ai] for k, v in centres.items()}
    loss = transfer_loss(emb, cen, cthr, cfg.hardest, anchor, cfg.pull).sum() / len(views)
    g = torch.autograd.grad(loss, d)[0] * c.union
    g = _smooth(g, cfg.smooth * float(c.sizes.median()) / 100.0)
    st.acc = cfg.momentum * st.acc + _unit_rms(g, pix)
    rms = math.sqrt(allowed_mse(psnr))
    shape = st.cap / st.cap.amax().clamp_min(1e-12)  # texture-shaped step: more where the cap is larger
    new = st.delta - cfg.step_scale * rms * _unit_rms(st.acc, pix) * pix * shape
    new = torch.maximum(torch.minimum(new, st.cap), -st.cap)
    new = (c.x + new).clamp(0, 1) - c.x
    new = project_psnr(new, c.masks, c.owner, psnr)
    keep = (c.owner[None] >= 0) & torch.isin(c.owner, ai)[None]
    st.delta = torch.where(keep, new, st.delta).detach()
    for k in ai.tolist():
        st.steps[k] += 1


def _quantised(st: _State, cfg: TransferConfig, psnr_of: list[float]) -> torch.Tensor:
    """The crop rounded to the output's levels inside the budget, with every face at its PSNR floor."""
    from .linf import quantize_within

    c = st.crop
    q = quantize_within(c.x, c.x + st.delta, st.cap, cfg.quantize)
    for k, p in enumerate(psnr_of):
        # rounding can add up to half a level per pixel; shrink a face that fell under its level
        for _ in range(6):
            if masked_psnr(q, c.x, c.masks[k]) >= p:
                break
            sel = (c.owner == k)[None]
            q = torch.where(sel, quantize_within(c.x, c.x + (q - c.x) * 0.97, st.cap, cfg.quantize), q)
    return q


@torch.no_grad()
def _still_matched(models, q: torch.Tensor, crop: FaceCrop, refs, thresholds, margin: float) -> torch.Tensor:
    """(N,) True where any model still verifies the protected face against its reference."""
    emb = models.embed(q, crop.lm)
    hit = torch.zeros(len(crop.ids), dtype=torch.bool, device=q.device)
    for name, m in zip(models.names, models.members):
        t = thresholds.get(name)
        if t is None:
            continue
        s = _similarity(m, emb[name], refs[name])
        hit |= s >= (t - margin)
    return hit


def _similarity(model, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from ..models.recognition import similarity

    return similarity(a, b.expand_as(a), getattr(model.spec, "metric", None) or "cosine")


class _Models:
    """Several model groups seen as one (for the crop's read extents)."""

    def __init__(self, *groups):
        self.members = [m for g in groups if g is not None for m in g.members]


def _reference(own: dict[str, torch.Tensor], person: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """What "still matches" is checked against: the person's other photos (mean) when given, else the face itself."""
    if person is None:
        return own
    return {k: person[k].to(v).mean(0, keepdim=True).expand_as(v) if k in person and person[k].numel() else v
            for k, v in own.items()}


def transfer_attack(image: torch.Tensor, faces: list[Face], ensemble, cfg: TransferConfig | None = None, *,
                    checkers=None, person: dict[str, torch.Tensor] | None = None,
                    anchor: dict[str, torch.Tensor] | None = None, pattern: PersonPattern | None = None,
                    progress=None) -> AttackResult:
    """Protect ``faces`` of ``image`` (3, H, W) in [0, 1]; see the module docstring.

    ensemble: the surrogates (:class:`~facepriv.attacks.SurrogateEnsemble`); checkers: held-out
    recognisers (same interface, used without gradients) that decide the escalation and the
    verdict; person: ``{model: (M, D)}`` embeddings of the person's other photos, for every
    surrogate and checker; anchor: ``{surrogate: (1, D)}`` identity to pull towards; pattern:
    the person's shared pattern (:func:`person_pattern`) to start from, then ``refine_steps``.
    """
    from .linf import _ensemble_device, surrogate_thresholds

    cfg = (cfg or TransferConfig()).validate()
    dev = _ensemble_device(ensemble, image.device)
    x_full = image.detach().to(dev, torch.float32)
    e = cfg.eot
    grow = (e.scale + e.shift + math.sin(math.radians(e.rotate)) + 3 * e.jitter) if e is not None else 0.0
    crop = face_crop(x_full, faces, _Models(ensemble, checkers), region=cfg.region, feather=cfg.feather, grow=grow)
    rows = [{"face": i, "status": "skipped", "reason": "region outside the image", "method": "transfer",
             "steps": 0} for i in range(len(faces))]
    if crop is None:
        return AttackResult(image.detach().clone(), rows, 0.0, cfg.to_json())
    with torch.no_grad():
        own = ensemble.embed(crop.x, crop.lm)
        own_chk = checkers.embed(crop.x, crop.lm) if checkers is not None else {}
    thr = surrogate_thresholds(ensemble, _far_cfg(cfg), required=False)
    thr_chk = surrogate_thresholds(checkers, _far_cfg(cfg), required=False) if checkers is not None else {}
    centres = identity_centres(own, person)
    cap = cfg.linf_cap * crop.union * texture_weights(crop.x, crop.union, strength=cfg.texture)
    n = len(crop.ids)
    st = _State(crop, torch.zeros_like(crop.x), torch.zeros_like(crop.x), cap,
                torch.ones(n, dtype=torch.bool, device=dev), [cfg.levels()[0]] * n, [0] * n)
    rng = torch.Generator().manual_seed(int(cfg.seed)) if cfg.seed is not None else None
    # start a hair away from the clean photo: there the dodging loss is at its maximum and its
    # gradient can be exactly zero (views without jitter); a quarter level of seeded noise breaks it
    st.delta = (torch.rand(crop.x.shape, generator=rng) * 2 - 1).to(dev) * (0.25 / 255.0) * crop.union
    if pattern is not None:
        d = torch.maximum(torch.minimum(pattern.render(crop), cap), -cap)
        st.delta = project_psnr((crop.x + d).clamp(0, 1) - crop.x, crop.masks, crop.owner, cfg.levels()[0])
        cfg = cfg.replace(steps=cfg.refine_steps)
    judge, jthr = (checkers, thr_chk) if checkers is not None else (ensemble, thr)
    jref = _reference(own_chk if checkers is not None else own, person)
    q = _escalate(st, ensemble, centres, cosine_thresholds(ensemble, thr), cfg, anchor, rng, judge, jref, jthr,
                  progress)
    rows = _report(rows, st, q, ensemble, checkers, person, {**thr, **thr_chk})
    out = crop.paste(x_full, q)
    return AttackResult(out.to(image.device, image.dtype), rows, float((q - crop.x).abs().max()), cfg.to_json())


def _far_cfg(cfg: TransferConfig):
    from .config import AttackConfig

    return AttackConfig(far=cfg.far)


def _escalate(st: _State, ensemble, centres, cthr, cfg: TransferConfig, anchor, rng, judge, jref, jthr,
              progress) -> torch.Tensor:
    """Optimise level by level; a face leaves once ``judge`` no longer matches it. Returns the quantised crop."""
    levels = cfg.levels()
    total = cfg.steps + cfg.level_steps * (len(levels) - 1)
    task = progress.add_task(f"transfer ({len(st.active)} face(s))", total=total) if progress is not None else None
    q = st.crop.x
    for li, psnr in enumerate(levels):
        for k in torch.nonzero(st.active).flatten().tolist():
            st.level[k] = psnr
        for _ in range(cfg.steps if li == 0 else cfg.level_steps):
            if cfg.steps == 0 and li == 0:
                break
            _step(st, ensemble, centres, cthr, cfg, psnr, anchor, rng)
            if task is not None:
                progress.advance(task)
        q = _quantised(st, cfg, st.level)
        st.active &= _still_matched(judge, q, st.crop, jref, jthr, cfg.check_margin)
        if not bool(st.active.any()):
            break
    if task is not None:
        progress.update(task, completed=total, visible=False)
    return q


@torch.no_grad()
def face_verdicts(groups, x: torch.Tensor, q: torch.Tensor, lm: torch.Tensor, thresholds: dict,
                  person: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """Per face: every model's similarity to the original (``similarity``) and to the person's
    other photos (``person_similarity``), before and after, with the verdict at its threshold.

    groups: ``[(role, models)]`` (role "surrogate" or "held-out"); x / q: original and protected
    image (the same crop or photo); lm (N, 5, 2) landmarks in it. ``passed`` is True when the
    model no longer matches, None when no threshold is known for it.
    """
    out = [{"similarity": {}, "person_similarity": {}} for _ in range(lm.shape[0])]
    for role, models in groups:
        before, after = models.embed(x, lm), models.embed(q, lm)
        for name, m in zip(models.names, models.members):
            t = thresholds.get(name)
            metric = getattr(m.spec, "metric", None) or "cosine"
            refs = [("similarity", before[name])]
            if person is not None and name in person and person[name].numel():
                refs.append(("person_similarity", person[name].to(before[name]).mean(0, keepdim=True)))
            for key, ref in refs:
                for k in range(lm.shape[0]):
                    r = ref[k: k + 1] if key == "similarity" else ref
                    b = float(_similarity(m, before[name][k: k + 1], r)) + 0.0  # no -0.0
                    a = float(_similarity(m, after[name][k: k + 1], r)) + 0.0
                    out[k][key][name] = {"role": role, "before": round(b, 5), "after": round(a, 5), "threshold": t,
                                         "passed": None if t is None else a < t, "metric": metric}
    return out


def _report(rows, st: _State, q, ensemble, checkers, person, thresholds) -> list[dict]:
    """Per-face rows: similarity of every surrogate and checker before/after, verdicts, PSNR, level."""
    c = st.crop
    groups = [("surrogate", ensemble)] + ([("held-out", checkers)] if checkers is not None else [])
    verdicts = face_verdicts(groups, c.x, q, c.lm, thresholds, person)
    for k, i in enumerate(c.ids):
        moved = any(v["after"] != v["before"] for v in verdicts[k]["similarity"].values())
        linf = float(((q - c.x).abs() * (c.masks[k] > 0)).amax())
        row = {"face": i, "status": "attacked" if linf > 0 and moved else "failed", "method": "transfer",
               "mode": "dodging", "steps": st.steps[k], "psnr_level": st.level[k],
               "face_psnr": round(masked_psnr(q, c.x, c.masks[k]), 3), "linf": linf, **verdicts[k]}
        if row["status"] == "failed":
            row["reason"] = "the attack changed no pixel of this face" if linf == 0 else "no model moved"
        if not row["person_similarity"]:
            del row["person_similarity"]
        rows[i] = row
    return rows


# ----------------------------------------------------------------------------- per person
@dataclass
class PersonPattern:
    """One perturbation pattern shared by all photos of a person (OPOM, Zhong & Deng 2022),
    kept in an aligned face frame (``template`` at ``size`` px) and warped into each photo."""

    delta: torch.Tensor  # (3, size, size)
    template: str = "facenet-160"
    size: int = 128

    def render(self, crop: FaceCrop, delta: torch.Tensor | None = None) -> torch.Tensor:
        """The pattern in the crop's pixels (3, h, w), inside the faces' regions (differentiable)."""
        from kornia.geometry.transform import warp_affine

        from ..core.align import get_template, invert_affine, similarity_transform

        p = self.delta if delta is None else delta
        tpl = get_template(self.template)
        dst = tpl.tensor(crop.x.device) * torch.tensor([self.size / tpl.size[1], self.size / tpl.size[0]],
                                                       device=crop.x.device)
        inv = invert_affine(similarity_transform(crop.lm, dst))  # aligned frame -> crop pixels
        h, w = crop.x.shape[-2:]
        out = torch.zeros_like(crop.x)
        for k in range(crop.lm.shape[0]):
            warped = warp_affine(p[None], inv[k: k + 1], dsize=(h, w), mode="bilinear", padding_mode="zeros",
                                 align_corners=True)[0]
            out = out + warped * (crop.owner == k)[None]
        return out * crop.union


def person_pattern(samples: list[tuple[torch.Tensor, Face]], ensemble, cfg: TransferConfig | None = None, *,
                   batch: int = 3, progress=None) -> PersonPattern:
    """Optimise one pattern over ``samples`` (photo (3, H, W), the person's face) for
    ``cfg.person_steps`` steps, pushing every photo from the centre of the person's embeddings
    at the ``min_psnr`` budget; a few per-photo steps from it then finish each photo."""
    cfg = (cfg or TransferConfig()).validate()
    dev = next((p.device for p in ensemble.parameters()), torch.device("cpu"))
    e = cfg.eot
    grow = (e.scale + e.shift + math.sin(math.radians(e.rotate)) + 3 * e.jitter) if e is not None else 0.0
    crops = [c for c in (face_crop(x.to(dev), [f], ensemble, region=cfg.region, feather=cfg.feather, grow=grow)
                         for x, f in samples) if c is not None]
    if not crops:
        raise ConfigError("no usable face among the person's photos")
    from .linf import surrogate_thresholds

    with torch.no_grad():
        embs = [ensemble.embed(c.x, c.lm) for c in crops]
    centre = {k: F.normalize(torch.cat([F.normalize(e_[k], dim=-1) for e_ in embs]).mean(0, keepdim=True), dim=-1)
              for k in ensemble.names}
    cthr = cosine_thresholds(ensemble, surrogate_thresholds(ensemble, _far_cfg(cfg), required=False))
    pat = PersonPattern(torch.zeros(3, 128, 128, device=dev))
    acc = torch.zeros_like(pat.delta)
    rms = math.sqrt(allowed_mse(cfg.min_psnr))
    rng = torch.Generator().manual_seed(int(cfg.seed)) if cfg.seed is not None else None
    task = progress.add_task("person pattern", total=cfg.person_steps) if progress is not None else None
    for step in range(cfg.person_steps):
        p = pat.delta.clone().requires_grad_(True)
        loss = 0.0
        for c in (crops[(step * batch + j) % len(crops)] for j in range(min(batch, len(crops)))):
            xin = (c.x + torch.clamp(pat.render(c, p), -cfg.linf_cap, cfg.linf_cap)).clamp(0, 1)
            views = random_views(xin, c.lm, c.sizes, cfg.copies, cfg.eot, rng)
            with feature_dropout(list(ensemble.members), cfg.dropout, rng):
                emb = embed_views(ensemble, views)
            loss = loss + transfer_loss(emb, {k: v.expand(len(c.ids), -1) for k, v in centre.items()}, cthr,
                                        cfg.hardest).sum() / len(views)
        g = torch.autograd.grad(loss, p)[0]
        acc = cfg.momentum * acc + g / g.pow(2).mean().sqrt().clamp_min(1e-12)
        d = pat.delta - cfg.step_scale * rms * acc / acc.pow(2).mean().sqrt().clamp_min(1e-12)
        d = d.clamp(-cfg.linf_cap, cfg.linf_cap)
        pat.delta = (d * min(1.0, 1.5 * rms / float(d.pow(2).mean().sqrt().clamp_min(1e-12)))).detach()
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.update(task, visible=False)
    return pat
