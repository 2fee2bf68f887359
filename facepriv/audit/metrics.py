"""Privacy and quality measures.

* :func:`psr` - protection success rate at each FAR threshold (dodging: share of comparisons
  that stay *below* the threshold; impersonation: share that *reach* it).
* :func:`identity_rank` / :func:`rank_k` - closed-set identification against a gallery.
* :class:`QualityMeter` - PSNR and SSIM (kornia.metrics) per image, LPIPS (the registry's
  ``lpips-*`` models) per image, FID (the registry's ``fid-inception`` + pytorch-fid's
  Fréchet distance) over the sets. A metric whose weights cannot be had is recorded in
  ``unavailable`` with the reason; the others still run. Weights that are not cached while
  downloads are off (``FACEPRIV_OFFLINE``, ``download=False``) or fail for want of a network
  (the registry's :class:`~facepriv.models.NotAvailableError` / ``OfflineError``) are *left
  out*: a short reason per metric, and :func:`left_out_line` sums them up in one line saying
  how to enable them (the registry's long error is kept in ``left_out["detail"]``). Everything
  runs on the meter's ``device``; :meth:`QualityMeter.add_many` batches the LPIPS and FID
  forward passes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import FaceprivError
from ..core.faces import box_iou
from ..models.thresholds import FARS

# LPIPS and the FID Inception (which resizes to 299 itself) run on images downscaled to at most
# this many pixels per side
LPIPS_MAX_SIDE = 512
# pytorch-fid's guidance: at least as many images as the feature size (2048), else the
# covariance is rank-deficient and FID is strongly biased
FID_MIN_IMAGES = 2048
SSIM_WINDOW = 11


def psr(similarities: Sequence[float | None], thresholds: Mapping[str, float], *, mode: str = "dodging"
        ) -> dict[str, float | None]:
    """Share of comparisons that defeat recognition at each FAR's threshold.

    ``None`` entries are faces the recogniser never saw (not detected): they count as protected
    for dodging and as failures for impersonation.
    """
    if mode not in ("dodging", "impersonation"):
        raise ValueError(f"mode must be dodging or impersonation, not {mode!r}")
    n = len(similarities)
    out: dict[str, float | None] = {}
    for far in FARS:
        if n == 0:
            out[far] = None
            continue
        t = thresholds[far]
        if t is None:  # no threshold known for this model
            out[far] = None
            continue
        if mode == "dodging":
            ok = sum(1 for s in similarities if s is None or s < t)
        else:
            ok = sum(1 for s in similarities if s is not None and s >= t)
        out[far] = ok / n
    return out


def mean_or_none(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def identity_rank(scores: torch.Tensor, gallery_ids: Sequence[str], true_id: str) -> int | None:
    """1-based rank of ``true_id`` when identities are ordered by their best gallery score.

    ``scores``: (G,) similarity of one probe to every gallery image. ``None`` when the true
    identity is not in the gallery.
    """
    best: dict[str, float] = {}
    for s, gid in zip(scores.tolist(), gallery_ids):
        if gid not in best or s > best[gid]:
            best[gid] = s
    if true_id not in best:
        return None
    target = best[true_id]
    # ties are resolved pessimistically (the true identity ranks after equal scores)
    return 1 + sum(1 for gid, s in best.items() if gid != true_id and s >= target)


def rank_k(ranks: Sequence[int | None], k: int) -> float | None:
    """Share of probes whose true identity is within the top ``k`` (``None`` rank = a miss)."""
    if not ranks:
        return None
    return sum(1 for r in ranks if r is not None and r <= k) / len(ranks)


# ------------------------------------------------------------------------------ quality
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] ((3, H, W) or batched); ``inf`` when identical."""
    mse = float(F.mse_loss(a.double(), b.double()))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = SSIM_WINDOW) -> float:
    """Mean SSIM (Gaussian window 11, sigma 1.5, as Wang et al.) via kornia.metrics."""
    from kornia.metrics import ssim as kssim

    a4, b4 = (a if a.dim() == 4 else a[None]), (b if b.dim() == 4 else b[None])
    h, w = a4.shape[-2:]
    win = min(window, (min(h, w) // 2) * 2 - 1)
    if win < 3:
        return float("nan")
    return float(kssim(a4.float(), b4.float(), win).mean())


def _fit(img: torch.Tensor, max_side: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    s = max_side / max(h, w)
    if s >= 1:
        return img
    size = (max(1, round(h * s)), max(1, round(w * s)))
    return F.interpolate(img[None] if img.dim() == 3 else img, size=size, mode="bilinear",
                         align_corners=False, antialias=True)[0]


def _groups_by_shape(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by shape (first-seen order), one batch per group."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape), []).append(i)
    return list(groups.values())


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, eps: float = 1e-6
                     ) -> tuple[float, str | None]:
    """Fréchet distance between two Gaussians (the FID formula), computed by pytorch-fid's own
    :func:`pytorch_fid.fid_score.calculate_frechet_distance`.

    Returns (distance, note): the note repeats what pytorch-fid says about a singular product
    (it regularises it with ``eps`` on the diagonals and prints a line, which is captured here so
    that it never reaches stdout). pytorch-fid raises ``ValueError`` when the matrix square root
    keeps a large imaginary component; that error is passed on.
    """
    import contextlib
    import io

    from pytorch_fid.fid_score import calculate_frechet_distance

    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        d = calculate_frechet_distance(mu1, s1, mu2, s2, eps=eps)
    note = buf.getvalue().strip() or None
    return float(d), (f"pytorch-fid: {note}" if note else None)


class QualityMeter:
    """Accumulates quality metrics over (protected, original) image pairs."""

    def __init__(self, *, lpips: str | None = "lpips-alex", fid: bool = True, device: str | torch.device = "cpu",
                 download: bool = True, lpips_model=None, fid_model=None):
        self.device = torch.device(device)
        self.unavailable: dict[str, str] = {}
        # metric -> {"model", "why": offline | no-download | no-network, "detail"}: weights not
        # cached and not to be had now (see left_out_line)
        self.left_out: dict[str, dict] = {}
        self._download_failed = False
        self.rows: list[dict] = []
        self._fid_feats: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self.fid_notes: list[str] = []
        self.lpips_name = lpips
        self.lpips = lpips_model
        self.fid_model = fid_model
        if lpips and self.lpips is None:
            self.lpips = self._load(lpips, "lpips", download)
        elif not lpips:
            self.unavailable["lpips"] = "disabled"
        if fid and self.fid_model is None:
            self.fid_model = self._load("fid-inception", "fid", download)
        elif not fid:
            self.unavailable["fid"] = "disabled"

    def _leave_out(self, metric: str, name: str, why: str, detail: str | None = None) -> None:
        reason = {"offline": "the offline switch is on",
                  "no-download": "downloads are off (--no-download)",
                  "no-network": "could not be downloaded (no network?)"}[why]
        self.left_out[metric] = {"model": name, "why": why, **({"detail": detail} if detail else {})}
        self.unavailable[metric] = (f"{name} weights not cached and {reason}: `facepriv models fetch {name}` "
                                    f"(or `facepriv models import {name} FILE`)")

    def _load(self, name: str, metric: str, download: bool):
        from ..models import NotAvailableError, availability, create_model, get_spec
        from ..models.hub import OfflineError, is_offline

        try:
            avail = availability(get_spec(name))
        except FaceprivError as exc:  # an unknown model name
            self.unavailable[metric] = f"{name} unavailable: {_first_line(exc)}"
            return None
        if not avail.available and (is_offline() or not download):
            self._leave_out(metric, name, "offline" if is_offline() else "no-download")
            return None
        if not avail.available and self._download_failed:  # one failed download is enough to know
            self._leave_out(metric, name, "no-network")
            return None
        try:
            return create_model(name, device=self.device, progress=False)
        except (NotAvailableError, OfflineError) as exc:  # the download failed: no network
            self._download_failed = not avail.available
            self._leave_out(metric, name, "offline" if is_offline() else "no-network", detail=str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - broken weights, a missing package: only this metric is lost
            self.unavailable[metric] = f"{name} unavailable: {_first_line(exc)}"
            return None

    def add(self, protected: torch.Tensor, original: torch.Tensor) -> dict:
        """Quality of one protected image (3, H, W) against its original; returns the row."""
        return self.add_many([(protected, original)])[0]

    def add_many(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
        """Quality of several (protected, original) pairs of (3, H, W) images; returns their rows
        in order, the same as :meth:`add` on each in turn (within float tolerance).

        PSNR and SSIM run per pair at full resolution on the meter's device; LPIPS and the FID
        features run one forward pass per group of equally sized (downscaled) images. All or
        nothing: when it raises, no row or FID feature of ``pairs`` has been recorded (a caller
        can then retry pair by pair with :meth:`add` to isolate the bad one).
        """
        rows: list[dict] = []
        fitted: list[tuple[torch.Tensor, torch.Tensor]] = []  # per pair, downscaled (protected, original)
        for protected, original in pairs:
            if protected.dim() != 3 or original.dim() != 3:
                raise ValueError(f"expected (3, H, W) images, got {tuple(protected.shape)} and {tuple(original.shape)}")
            row: dict = {}
            protected = protected.to(self.device)
            original = original.to(self.device)
            if protected.shape != original.shape:
                row["resized"] = (f"protected {tuple(protected.shape[-2:])} resized to the original's "
                                  f"{tuple(original.shape[-2:])}")
                protected = F.interpolate(protected[None].float(), size=original.shape[-2:], mode="bilinear",
                                          align_corners=False, antialias=True)[0]
            row["psnr"] = psnr(protected, original)
            row["ssim"] = ssim(protected, original)
            rows.append(row)
            if self.lpips is not None or self.fid_model is not None:
                fitted.append((_fit(protected.float(), LPIPS_MAX_SIDE), _fit(original.float(), LPIPS_MAX_SIDE)))
            del protected, original
        if self.lpips is not None:
            for idx in _groups_by_shape([a for a, _ in fitted]):
                with torch.no_grad():
                    d = self.lpips(torch.stack([fitted[i][0] for i in idx]), torch.stack([fitted[i][1] for i in idx]))
                for i, v in zip(idx, d.reshape(len(idx), -1)[:, 0].tolist()):
                    rows[i]["lpips"] = float(v)
        feats: tuple[list, list] = ([], [])
        if self.fid_model is not None:
            fid_in = [t for pair in fitted for t in pair]  # protected, original, protected, ...
            out: list[torch.Tensor | None] = [None] * len(fid_in)
            for idx in _groups_by_shape(fid_in):
                with torch.no_grad():
                    f = self.fid_model(torch.stack([fid_in[i] for i in idx])).double().cpu()
                for j, i in enumerate(idx):
                    out[i] = f[j: j + 1]
            feats = (out[0::2], out[1::2])
        self._fid_feats[0].extend(feats[0])
        self._fid_feats[1].extend(feats[1])
        self.rows.extend(rows)
        return rows

    def fid(self) -> float | None:
        if self.fid_model is None:
            return None
        a, b = self._fid_feats
        if len(a) < 2:
            self.unavailable["fid"] = f"FID needs at least 2 images per set (got {len(a)})"
            return None
        fa, fb = torch.cat(a).numpy(), torch.cat(b).numpy()
        try:
            d, note = frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
        except ImportError as exc:
            self.unavailable["fid"] = f"pytorch-fid is not installed ({exc}); pip install pytorch-fid"
            return None
        except ValueError as exc:  # pytorch-fid: "Imaginary component ..." (too few images for the features)
            self.unavailable["fid"] = (f"pytorch-fid could not compute the Fréchet distance ({exc}); FID needs "
                                       "many more images than this set has")
            return None
        if note:
            self.fid_notes.append(note)
        return d

    def summary(self) -> dict:
        """Means over the pairs. PSNR is averaged over the pairs that differ: identical pairs
        (infinite PSNR) are counted in ``n_identical`` instead (PSNR is ``inf`` when every pair
        is identical)."""
        def agg(key):
            vals = [r[key] for r in self.rows if key in r and r[key] is not None and not math.isnan(r[key])]
            if not vals:
                return None
            finite = [v for v in vals if math.isfinite(v)]
            return float(np.mean(finite)) if finite else math.inf

        n_identical = sum(1 for r in self.rows if r.get("psnr") == math.inf)
        out = {"psnr": agg("psnr"), "n_identical": n_identical, "ssim": agg("ssim"),
               "lpips": agg("lpips") if self.lpips is not None else None, "fid": self.fid(), "n": len(self.rows)}
        if n_identical and out["psnr"] is not None and math.isfinite(out["psnr"]):
            out["psnr_note"] = (f"{n_identical} of {len(self.rows)} protected image(s) are identical to their "
                                "original (infinite PSNR) and are left out of the PSNR mean")
        if out["fid"] is not None and len(self.rows) < FID_MIN_IMAGES:
            out["fid_note"] = (f"FID over {len(self.rows)} images is strongly biased: pytorch-fid recommends at "
                               f"least {FID_MIN_IMAGES} (the Inception feature size); compare it only between "
                               "runs on the same set")
        if out["fid"] is not None and self.fid_notes:
            out["fid_note"] = "; ".join([*([out["fid_note"]] if "fid_note" in out else []), *self.fid_notes])
        if out["lpips"] is not None:
            out["lpips_model"] = self.lpips_name
        out["unavailable"] = dict(self.unavailable)
        if self.left_out:
            out["left_out"] = {"metrics": list(self.left_out), "models": [v["model"] for v in self.left_out.values()],
                               "why": sorted({v["why"] for v in self.left_out.values()}),
                               "line": left_out_line(self.left_out),
                               "detail": {k: v["detail"] for k, v in self.left_out.items() if v.get("detail")}}
        return out


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


_METRIC_NAMES = {"lpips": "LPIPS", "fid": "FID"}


def left_out_line(left_out: Mapping[str, Mapping]) -> str | None:
    """One line for the quality metrics left out for want of cached weights, e.g. ``LPIPS and
    FID left out: their weights are not cached and the offline switch is on; fetch with
    `facepriv models fetch lpips-alex fid-inception` or pass --lpips none --no-fid``."""
    if not left_out:
        return None
    metrics = list(left_out)
    names = [_METRIC_NAMES.get(m, m.upper()) for m in metrics]
    what = " and ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + " and " + names[-1]
    whys = {v.get("why") for v in left_out.values()}
    if "offline" in whys:
        reason = "the offline switch is on"
    elif "no-download" in whys:
        reason = "downloads are off (--no-download)"
    else:
        reason = "could not be downloaded (no network?)"
    models = " ".join(str(v.get("model")) for v in left_out.values())
    skip = " ".join(o for m, o in (("lpips", "--lpips none"), ("fid", "--no-fid")) if m in left_out)
    their = "their weights are" if len(metrics) > 1 else "its weights are"
    return (f"{what} left out: {their} not cached and {reason}; fetch with `facepriv models fetch {models}`"
            f"{' or pass ' + skip if skip else ''}")


# ------------------------------------------------------------------------------ utility
def expression_change(p_orig: torch.Tensor, p_prot: torch.Tensor, labels: Sequence[str]) -> dict:
    """Expression kept (same top label) and total-variation distance of the class probabilities."""
    a, b = int(p_orig.argmax()), int(p_prot.argmax())
    return {"expression_before": labels[a], "expression_after": labels[b], "expression_kept": a == b,
            "expression_tv": float(0.5 * (p_orig - p_prot).abs().sum())}


def match_faces(orig_boxes: Sequence[np.ndarray], prot_boxes: Sequence[np.ndarray], min_iou: float = 0.3, *,
                scale: tuple[float, float] = (1.0, 1.0)) -> list[int | None]:
    """For each original face, the index of the protected face it corresponds to (greedy by IoU).

    ``scale`` = (sx, sy) maps protected-image pixels to original-image pixels (original size /
    protected size): a protected photo saved at another size has its boxes in another frame.
    """
    sx, sy = scale
    if (sx, sy) != (1.0, 1.0):
        f = np.array([sx, sy, sx, sy], dtype=np.float64)
        prot_boxes = [np.asarray(b, dtype=np.float64)[:4] * f for b in prot_boxes]
    iou = box_iou(np.asarray([np.asarray(b, np.float64)[:4] for b in orig_boxes]).reshape(-1, 4),
                  np.asarray([np.asarray(b, np.float64)[:4] for b in prot_boxes]).reshape(-1, 4))
    cands = sorted(((float(iou[i, j]), i, j) for i in range(iou.shape[0]) for j in range(iou.shape[1])), reverse=True)
    out: list[int | None] = [None] * len(orig_boxes)
    used = set()
    for iou, i, j in cands:
        if iou < min_iou:
            break
        if out[i] is None and j not in used:
            out[i] = j
            used.add(j)
    return out
