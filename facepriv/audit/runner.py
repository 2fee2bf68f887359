"""``run_audit(AuditConfig(...)) -> report``: how well protected photos resist face recognition.

Protocols (per recognition model, thresholds at FAR 1e-1 / 1e-2 / 1e-3):

* **Dodging (verification).** When the identity of a photo is known (identities CSV, gallery
  folders or a pairs file), its protected face is compared with every *other* clean photo of
  the same person (never the original of the same file): one verification attempt per
  (protected face, clean photo) pair; PSR = share of attempts below the threshold. When the
  identity is unknown (or the person has no other photo) the protected face is compared with
  its own original (the weaker *self-verification* protocol); each row says which protocol
  it used, the report splits the two (``dodging.by_protocol``) and notes how many faces fell
  back to self-verification. The headline ``psr`` counts the attempts of both protocols. The
  other-photo comparisons with the clean original in place of the protected photo give the
  "before" baseline (the clean false-reject rate); self-verification has no "before", so the
  ROC and the before/after histograms use the other-photo comparisons only.
* **Impersonation.** Each protected face against every target photo except the one(s) used
  to protect (``target_used``, required unless ``allow_target_reuse`` is set, which the report
  notes); PSR = share reaching the threshold. A target photo byte-identical to the image's own
  original, and for the labelled face a target photo of the same
  identity as the source person, is left out of that image's impersonation (flagged on the
  row, counted in ``impersonation.excluded`` and noted).
* **Identification.** Rank of the true identity among the gallery identities (best score per
  identity) for the clean original and the protected photo; rank-1 / rank-5 before and after.
  Gallery photos identical to the original are left out.

Whole photos may hold several faces: original and protected faces are matched by box IoU,
after the protected boxes are scaled by original size / protected size (a protected photo
saved at another size); pre-aligned crops (``aligned``) hold one face each and are paired
directly. A face the detector no longer finds in the protected photo counts as protected (dodging) /
failed (impersonation), and is counted separately (``faces.not_detected``). The identity
label of an image refers to its largest face; other faces use self-verification.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.device import resolve_device
from ..core.errors import ConfigError
from ..core.io import load_image
from ..core.progress import make_progress
from . import inputs as inp
from .embed import FaceEmbeddingCache, ImageFaces, model_metric
from .metrics import QualityMeter, expression_change, match_faces, mean_or_none, psr, rank_k
from ..core.secrets import redact
from ..models.thresholds import FARS, ThresholdSet, calibration_mismatch, resolve_thresholds, roc_curve

EXPRESSION_MODEL = "expr-fer7"
MAX_IMPOSTOR_PAIRS = 20000
REF_SEED = 0  # seed of the per-image sample of reference photos (--max-refs)
UTILITY_PAD = 0.5  # --aligned --utility: crops get a border of this share of their size on each side
QUALITY_CHUNK_PIXELS = 24_000_000  # pixels (protected + original) measured at once: ~290 MB as float
RANK_CHUNK = 1024  # identification probes scored per matrix product (at most)
RANK_CELLS = 1 << 24  # ... and at most this many probe x gallery scores per product (~128 MB in float64)
PROTOCOLS = ("other-photos", "self")  # dodging: vs other clean photos of the person | vs its own original
SELF_REASONS = ("identity-unknown", "no-other-photo", "secondary-face")  # why a face fell back to "self"
TARGET_EXCLUSIONS = ("own-original", "source-identity")  # why a target was left out of an image's impersonation


@dataclass
class AuditConfig:
    protected: Path
    original: Path
    models: list[str] = field(default_factory=lambda: ["dlib-resnet"])
    out: Path | None = None
    gallery: Path | None = None
    target: Path | None = None
    target_used: list[Path] = field(default_factory=list)
    allow_target_reuse: bool = False  # no target_used: measure against every target photo (noted, optimistic)
    pairs: Path | None = None
    pairs_root: Path | None = None
    identities: Path | None = None
    aligned: bool = False
    aligned_template: str = "arcface-112"
    detector: str = "mtcnn"
    min_face_size: float = 20.0
    landmarks: str = "protected"  # protected: detect in the protected photo | original: use the original's
    iou: float = 0.3
    max_refs: int = 20  # dodging: other clean photos compared per face (fixed-seed sample); 0 = all
    thresholds: Path | None = None
    device: str = "auto"
    batch_size: int = 32
    amp: bool | None = None  # None: on for CUDA (checked per model), off elsewhere
    workers: int = 2
    quality: bool = True
    lpips: str | None = "lpips-alex"
    fid: bool = True
    download: bool = True  # may quality metrics download their weights
    utility: bool = False
    apis: list[str] = field(default_factory=list)
    api_endpoint: dict | list | str | None = None  # {provider: URL}; "NAME=URL" strings; a bare URL for one --api
    api_threshold: dict | list | str | float | None = None  # {provider: threshold} (rekognition, azure)
    api_config: Path | None = None
    api_concurrency: int = 2
    api_rate: float | None = 2.0
    api_max_refs: int = 1
    api_cache: Path | None = None
    api_timeout: float = 30.0
    api_retries: int = 4
    glob: str | None = None
    max_images: int | None = None
    max_pixels: int | None = None  # None: FACEPRIV_MAX_PIXELS or the default; 0: no limit
    html_max_images: int = 60
    progress: bool = True

    def __post_init__(self):
        for name in ("protected", "original", "out", "gallery", "target", "pairs", "pairs_root", "identities",
                     "thresholds", "api_config", "api_cache"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Path):
                setattr(self, name, Path(v))
        self.target_used = [Path(p) for p in self.target_used]
        self.models = [m.strip() for m in self.models if m and m.strip()]
        if not self.models:
            raise ConfigError("give at least one recognition model (--models dlib-resnet,sface,...)")
        if self.landmarks not in ("protected", "original"):
            raise ConfigError("landmarks must be 'protected' (detect in the protected photo) or 'original'")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        if self.max_refs < 0:
            raise ConfigError("--max-refs must be 0 (all) or more")
        if self.api_max_refs < 1:
            raise ConfigError("--api-max-refs must be at least 1")
        if self.target is not None and not self.target_used and not self.allow_target_reuse:
            raise ConfigError("impersonation needs a *different* photo of the target than the one used to protect: "
                              "give that photo with --target-used PHOTO (it is excluded), or pass "
                              "--allow-target-reuse to measure against every --target photo anyway (optimistic; "
                              "noted in the report)")
        if self.api_timeout <= 0:
            raise ConfigError("--api-timeout must be positive")
        if self.api_retries < 0:
            raise ConfigError("--api-retries must be 0 or more")
        if self.api_endpoint or self.api_threshold is not None:
            from .apis import per_provider

            self.api_endpoint = per_provider(self.api_endpoint or None, self.apis, "--api-endpoint")
            self.api_threshold = per_provider(self.api_threshold, self.apis, "--api-threshold", float)
        else:
            self.api_endpoint, self.api_threshold = {}, {}

    def to_json(self) -> dict:
        """The configuration for report.json, every path resolved to an absolute one (a report
        read later, from another folder, still says which files were audited)."""
        d = asdict(self)
        return redact({k: (_abs(v) if isinstance(v, Path) else [_abs(x) for x in v] if k == "target_used" else v)
                       for k, v in d.items()})


def _abs(p: Path) -> str:
    return str(Path(p).expanduser().resolve())


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image as :func:`~facepriv.core.io.load_image` returns it (EXIF
    orientation applied), read from the header only; None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - the embedding pass reports unreadable files
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def size_ratio(original: tuple[int, int], protected: tuple[int, int]) -> tuple[float, float]:
    """(sx, sy) mapping protected-image pixels to original-image pixels."""
    if not original or not protected or not all(original) or not all(protected):
        return 1.0, 1.0
    return original[0] / protected[0], original[1] / protected[1]


# ------------------------------------------------------------------------------ helpers
def _sim(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    from ..models.recognition import similarity_matrix

    return similarity_matrix(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), metric)


def _r(v, nd: int = 6):
    if v is None:
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return v
    return round(float(v), nd)


def load_recognizers(names: list[str], device) -> dict:
    from ..models import create_model, get_spec

    out = {}
    for n in names:
        spec = get_spec(n)
        if spec.task != "recognition":
            raise ConfigError(f"{n} is a {spec.task} model, not a face-recognition model")
        out[spec.name] = create_model(spec.name, device=device)
    return out


def registry_weights(name: str | None) -> dict:
    """What the registry knows of a model's weights: where they are read from (``weights``), the
    pinned ``sha256`` and the package ``version`` of their source (None where it has none, e.g.
    imported files or unregistered models)."""
    out: dict = {"weights": None, "sha256": None, "version": None}
    if not name:
        return out
    try:
        from ..models import availability

        a = availability(name)
    except Exception:  # noqa: BLE001 - injected / unregistered models
        return out
    out["weights"] = a.where
    src = a.source
    if src is not None:
        out["sha256"] = getattr(src, "sha256", None) or getattr(src, "digest", None)
        out["version"] = getattr(src, "version", None)
    return out


def _model_entry(m, injected: bool = False) -> dict:
    spec = getattr(m, "spec", None)
    entry = {"architecture": getattr(spec, "architecture", type(m).__name__),
             "template": getattr(spec, "template", None), "input_size": getattr(spec, "input_size", None),
             "metric": getattr(spec, "metric", None), "runtime": getattr(spec, "runtime", None),
             **registry_weights(getattr(spec, "name", None))}
    if injected:
        entry["injected"] = "model object supplied by the caller; weights as the registry knows the name"
    return entry


def model_versions(models: dict, detector_name: str | None, *, detector_role: str | None = None,
                   detector_injected: bool = False, expression=None, expression_amp: str | None = None,
                   expression_injected: bool = False, quality_meter=None, quality_injected: bool = False,
                   injected: bool = False) -> dict:
    """Versions of everything that produced the numbers: facepriv, torch, python; each
    recognition model (architecture, template, weights with sha256 / version); the detector
    (``detector``: its name; ``detector_model``: its weights and what it was used for); the
    expression model (with ``--utility``, with its mixed-precision decision) and the LPIPS / FID
    networks the quality metrics actually used (``quality``)."""
    import platform

    from .. import __version__

    info: dict = {"facepriv": __version__, "torch": torch.__version__, "python": platform.python_version(),
                  "detector": detector_name, "models": {}}
    for name, m in models.items():
        info["models"][name] = _model_entry(m, injected)
    if detector_name:
        det = {"name": detector_name, "role": detector_role, **registry_weights(detector_name)}
        if detector_injected:
            det["injected"] = "detector object supplied by the caller; weights as the registry knows the name"
        info["detector_model"] = det
    if expression is not None:
        info["expression_model"] = {"name": EXPRESSION_MODEL, **_model_entry(expression, expression_injected),
                                    "amp": expression_amp}
    if quality_meter is not None:
        q: dict = {}
        if getattr(quality_meter, "lpips", None) is not None:
            q["lpips"] = {"name": getattr(quality_meter, "lpips_name", None),
                          **registry_weights(getattr(quality_meter, "lpips_name", None))}
        if getattr(quality_meter, "fid_model", None) is not None:
            q["fid"] = {"name": "fid-inception", **registry_weights("fid-inception")}
        if quality_injected:
            for v in q.values():
                v["injected"] = "quality meter supplied by the caller; weights as the registry knows the name"
        info["quality"] = q
    return info


class _Identities:
    """Identity of clean photos from the identities CSV, the gallery layout or a pairs file."""

    def __init__(self, cfg: AuditConfig, digest: inp.DigestCache, gallery: list[inp.GalleryImage]):
        self.digest = digest
        self.by_name: set[Path] = set()  # photos labelled from the identities CSV by bare file name
        self.csv = None
        if cfg.identities is not None:
            root = cfg.original if cfg.original.is_dir() else cfg.original.parent
            self.csv = inp.read_identities(cfg.identities, root=root)
        self.gallery_ids = {g.identity for g in gallery}
        self.gallery = inp.IdentityIndex(source="gallery")
        for g in gallery:
            self.gallery.add(g.path, g.identity, digest=digest(g.path))
        self.pairs = None
        self.pair_list: list[inp.LabelledPair] = []
        if cfg.pairs is not None:
            self.pair_list = inp.read_pairs(cfg.pairs, cfg.pairs_root)
            comp = inp.pair_components(self.pair_list)
            self.pairs = inp.IdentityIndex(source="pairs")
            for p, ident in comp.items():
                self.pairs.add(p, ident, digest=digest(p) if p.is_file() else None)

    def __call__(self, path: Path, rel: str | None = None) -> tuple[str | None, str | None]:
        d = self.digest(path)
        if self.csv is not None:
            hit, how = self.csv.lookup_how(path, rel=rel, digest=d)
            if hit:
                if how == "name":
                    self.by_name.add(Path(path).resolve())
                    return hit, "identities (file name)"
                return hit, "identities"
        if self.gallery_ids:
            parts = Path(rel).parts if rel else ()
            if len(parts) >= 2 and parts[0] in self.gallery_ids:
                return parts[0], "gallery-folder"
            hit = self.gallery.lookup(path, digest=d)
            if hit:
                return hit, "gallery"
        if self.pairs is not None:
            hit = self.pairs.lookup(path, digest=d)
            if hit:
                return hit, "pairs"
        return None, None

    def of_target(self, path: Path) -> str | None:
        """Identity of a target photo by path or content only (never by bare file name, and
        without counting it among the name-labelled originals)."""
        d = self.digest(path)
        for index in (self.csv, self.gallery if self.gallery_ids else None, self.pairs):
            if index is None:
                continue
            hit, how = index.lookup_how(path, digest=d)
            if hit and how != "name":
                return hit
        return None


def sample_refs(refs: list, k: int, key: str, seed: int = REF_SEED) -> list:
    """At most ``k`` of ``refs`` (all when ``k`` is 0 or there are no more): a sample drawn with a
    generator seeded by ``seed`` and ``key`` (the image's relative path), so the same image gets
    the same references in every run whatever the order of the images; the order of ``refs`` is kept."""
    if k <= 0 or len(refs) <= k:
        return list(refs)
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
    idx = np.random.default_rng(h).choice(len(refs), k, replace=False)
    return [refs[i] for i in sorted(idx.tolist())]


def gallery_ranks(gallery: torch.Tensor, gallery_ids: list[str], probes: torch.Tensor, true_ids: list[str],
                  exclude: list[list[int]] | None, metric: str, chunk: int = RANK_CHUNK) -> list[int | None]:
    """For each probe, the 1-based rank of its true identity among the gallery identities, each
    scored by its best photo, leaving out the gallery photos ``exclude[k]`` of probe ``k``; ties
    count against (as :func:`~facepriv.audit.metrics.identity_rank`, whose per-probe loop this
    replaces). None when the true identity has no photo left.

    One similarity matrix per chunk of probes, the best score per identity by ``scatter_reduce``
    (amax) over the gallery's identity index. Scores are computed in float64, so a rank never
    depends on the chunking (float32 matrix products of different shapes round differently,
    which could swap two identities within ~1e-8 of each other); exact ties stay ties."""
    uids = sorted(set(gallery_ids))
    pos = {u: i for i, u in enumerate(uids)}
    gidx = torch.tensor([pos[g] for g in gallery_ids], dtype=torch.long)
    n_id, n_g = len(uids), len(gallery_ids)
    chunk = max(1, min(chunk, RANK_CELLS // max(1, n_g)))  # bounded memory whatever the gallery's size
    gallery64 = gallery.double()
    out: list[int | None] = []
    for s in range(0, len(probes), chunk):
        P = probes[s: s + chunk]
        n = len(P)
        S = _sim(P.double(), gallery64, metric)  # float64: scores independent of the chunking
        keep = torch.ones(n, n_g, dtype=torch.bool)
        if exclude is not None:
            for r, ex in enumerate(exclude[s: s + chunk]):
                if ex:
                    keep[r, ex] = False
        S = S.masked_fill(~keep, -math.inf)
        idx = gidx.expand(n, -1)
        best = torch.full((n, n_id), -math.inf, dtype=S.dtype).scatter_reduce(1, idx, S, reduce="amax", include_self=True)
        present = torch.zeros(n, n_id).scatter_add(1, idx, keep.float()) > 0
        t = torch.tensor([pos.get(x, -1) for x in true_ids[s: s + chunk]], dtype=torch.long)
        rows = torch.arange(n)
        has = (t >= 0) & present[rows, t.clamp(min=0)]
        target = best[rows, t.clamp(min=0)]
        ahead = (best >= target[:, None]) & present
        ahead[rows, t.clamp(min=0)] = False
        ranks = 1 + ahead.sum(1)
        out += [int(r) if h else None for r, h in zip(ranks.tolist(), has.tolist())]
    return out


def pad_for_detection(rgb: np.ndarray, pad: float = UTILITY_PAD) -> np.ndarray:
    """A pre-aligned crop with a constant mid-grey border of ``pad`` x its size on every side:
    the face then fills about half of the image side. Detectors such as MTCNN miss faces that
    fill a tight crop."""
    h, w = rgb.shape[:2]
    py, px = int(round(h * pad)), int(round(w * pad))
    return np.pad(rgb, ((py, py), (px, px), (0, 0)), mode="constant", constant_values=127)


def aligned_face_detection(cfg: AuditConfig, pairs, detector) -> dict[str, dict]:
    """``--aligned --utility``: is the face of each pre-aligned crop still found by a real
    detector? The original and the protected crop are padded (:func:`pad_for_detection`) and
    run through ``detector``; the largest face of the original (at least ``min_face_size``) must
    have a face in the protected crop overlapping it (IoU >= ``cfg.iou`` after scaling by the
    crops' size ratio). Returns rel -> ``{"in_original": bool, "in_protected": bool | None}``
    (None: no face in the original, so nothing to keep), or ``{"error": ...}``."""
    def faces(path: Path):
        rgb = pad_for_detection(load_image(path, max_pixels=cfg.max_pixels).rgb)
        found = [f for f in detector.detect(rgb) if f.size >= cfg.min_face_size]
        return sorted(found, key=lambda f: f.width * f.height, reverse=True), rgb.shape[:2]

    def one(fp) -> dict:
        try:
            fo, (ho, wo) = faces(fp.original)
            if not fo:
                return {"in_original": False, "in_protected": None}
            fpr, (hp, wp) = faces(fp.protected)
            hit = match_faces([fo[0].box], [f.box for f in fpr], cfg.iou, scale=size_ratio((wo, ho), (wp, hp)))[0]
            return {"in_original": True, "in_protected": hit is not None}
        except Exception as exc:  # noqa: BLE001 - the embedding pass reports unreadable files
            return {"error": f"{type(exc).__name__}: {exc}"}

    out: dict[str, dict] = {}
    with make_progress(enabled=cfg.progress) as bar, ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        task = bar.add_task("utility: detecting faces in the crops", total=len(pairs))
        for fp, res in zip(pairs, pool.map(one, pairs)):
            out[fp.rel] = res
            bar.advance(task)
    return out


def build_apis(cfg: AuditConfig) -> dict:
    """The online adapters ``cfg.apis`` asks for, created (keys, boto3, config file and endpoint
    checked) before any work: a missing key is a :class:`ConfigError` here, not after the
    embedding. Adapters are keyed by the name given; a provider named twice is used once."""
    if not cfg.apis:
        return {}
    from .apis import canonical_name, create_api

    adapters: dict = {}
    seen: set[str] = set()
    for name in cfg.apis:
        key = canonical_name(name)
        if key in seen:
            continue
        seen.add(key)
        adapters[name] = create_api(name, endpoint=cfg.api_endpoint.get(key), config=cfg.api_config,
                                    threshold=cfg.api_threshold.get(key), concurrency=cfg.api_concurrency,
                                    rate=cfg.api_rate, cache=cfg.api_cache, timeout=cfg.api_timeout,
                                    retries=cfg.api_retries)
    return adapters


# ------------------------------------------------------------------------------ the audit
def run_audit(cfg: AuditConfig, *, recognizers: dict | None = None, detector=None, apis: dict | None = None,
              quality_meter: QualityMeter | None = None, expression_model=None) -> dict:
    """Run the audit described by ``cfg``; returns the report dict (and writes it when ``cfg.out``).

    ``recognizers`` / ``detector`` / ``apis`` / ``quality_meter`` / ``expression_model`` replace
    the registry models or API adapters (for library use and tests).
    """
    t_start = time.perf_counter()
    # online adapters first: a missing key / boto3 / config file is a usage error before any work
    adapters = dict(apis) if apis is not None else build_apis(cfg)
    device = resolve_device(cfg.device)
    pairs, errors = inp.match_files(cfg.protected, cfg.original, glob=cfg.glob)
    if cfg.max_images:
        pairs = pairs[: cfg.max_images]
    if not pairs:
        raise ConfigError(f"no protected image under {cfg.protected} has an original under {cfg.original}")
    digest = inp.DigestCache()
    gallery = inp.read_gallery(cfg.gallery, glob=cfg.glob) if cfg.gallery is not None else []
    identities = _Identities(cfg, digest, gallery)

    # ---- models
    models = dict(recognizers) if recognizers is not None else load_recognizers(cfg.models, device)
    detector_injected = detector is not None
    # pre-aligned crops need no detector, except for the utility check "face still detected"
    # (a crop is one face by construction: only a real detector can say whether it still is)
    utility_detector_error = None
    if detector is None and not cfg.aligned:
        from ..models import create_model

        detector = create_model(cfg.detector, device=device)
    elif detector is None and cfg.utility:
        # pre-aligned crops: the detector only serves "face still detected"; without it the rest
        # of the audit runs and the utility section says what is missing
        from ..models import create_model

        try:
            detector = create_model(cfg.detector, device=device)
        except Exception as exc:  # noqa: BLE001 - weights missing offline, a bad name, ...
            utility_detector_error = f"{cfg.detector} could not be loaded: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    utility_detector = detector if cfg.aligned and cfg.utility else None
    expression_injected = expression_model is not None
    file_data = None
    if cfg.thresholds is not None:
        from ..models.thresholds import _read_threshold_file

        file_data = _read_threshold_file(cfg.thresholds)
    thresholds: dict[str, ThresholdSet] = {
        name: resolve_thresholds(name, spec=getattr(m, "spec", None), file=cfg.thresholds, file_data=file_data)
        for name, m in models.items()}
    embed_models = dict(models)
    if cfg.utility:
        if expression_model is None:
            from ..models import create_model

            expression_model = create_model(EXPRESSION_MODEL, device=device)
        embed_models[EXPRESSION_MODEL] = expression_model
    cache = FaceEmbeddingCache(embed_models, detector=None if cfg.aligned else detector, device=device, batch_size=cfg.batch_size,
                               aligned=cfg.aligned, aligned_template=cfg.aligned_template, amp=cfg.amp,
                               workers=cfg.workers, min_face_size=cfg.min_face_size, max_pixels=cfg.max_pixels)

    # ---- identities and the clean reference pool
    notes: list[str] = []
    pair_ident = {}
    for fp in pairs:
        pair_ident[fp.rel] = identities(fp.original, fp.original_rel)
    pool: list[tuple[Path, str]] = []
    seen_digest: set[str] = set()

    def add_pool(path: Path, ident: str | None):
        if ident is None or not path.is_file():
            return
        d = digest(path)
        if d in seen_digest:
            return
        seen_digest.add(d)
        pool.append((path.resolve(), ident))

    for fp in pairs:
        add_pool(fp.original, pair_ident[fp.rel][0])
    for g in gallery:
        add_pool(g.path, g.identity)
    for lp in identities.pair_list:
        for p in (lp.a, lp.b):
            if p.is_file():
                add_pool(p, identities(p)[0])
    known = sum(1 for v in pair_ident.values() if v[0] is not None)
    if identities.by_name:
        notes.append(f"{len(identities.by_name)} photo(s) got their identity from the identities CSV by bare file "
                     "name only (no row with their relative path); check that those names are unique "
                     "(identity_source 'identities (file name)')")

    # ---- targets
    targets: list[Path] = []
    if cfg.target is not None:
        all_targets = [p for _, p in inp._images(cfg.target, cfg.glob, "--target")]
        used = {digest(p) for p in cfg.target_used}
        targets = [p for p in all_targets if digest(p) not in used]
        if not targets:
            raise ConfigError("no target photo is left once the photo(s) used for protection are excluded; "
                              "give another photo of the target identity")
        if not cfg.target_used:
            notes.append(f"--allow-target-reuse: impersonation is measured against all {len(all_targets)} target "
                         "photo(s), which probably include the one used to protect (optimistic); the usual "
                         "protocol excludes it (--target-used) and uses other photos of the target")

    # ---- embed everything
    clean_paths = [fp.original for fp in pairs] + [p for p, _ in pool] + [g.path for g in gallery] + targets
    t_embed = time.perf_counter()
    cache.process(clean_paths, progress=cfg.progress, description="clean photos")
    extra = {}
    if cfg.landmarks == "original":
        for fp in pairs:
            o = cache.get(fp.original)
            if o.faces:
                lms = np.stack([f.landmarks for f in o.faces]).astype(np.float32)
                sx, sy = size_ratio(o.size, image_size(fp.protected))
                extra[fp.protected.resolve()] = lms / np.array([sx, sy], dtype=np.float32)
    cache.process([fp.protected for fp in pairs], extra=extra, progress=cfg.progress, description="protected photos")
    embed_seconds = time.perf_counter() - t_embed

    def faces_of(path: Path, ex=None) -> ImageFaces:
        return cache.get(path, ex)

    # gallery embeddings per model
    gal_rows = [(g, faces_of(g.path)) for g in gallery]
    gal_ok = [(g, r) for g, r in gal_rows if not r.error and r.faces]
    if gallery and len(gal_ok) < len(gallery):
        notes.append(f"{len(gallery) - len(gal_ok)} gallery photo(s) without a detected face were left out")
    gal_digest = [digest(g.path) for g, _ in gal_ok]
    gal_ids = [g.identity for g, _ in gal_ok]
    gal_emb = {m: torch.stack([r.embeddings[m][0] for _, r in gal_ok]) for m in models} if gal_ok else {}
    target_ok = [p for p in targets if faces_of(p).faces and not faces_of(p).error]
    if targets and not target_ok:
        raise ConfigError("no face was found in any target photo")
    target_emb = {m: torch.stack([faces_of(t).embeddings[m][0] for t in target_ok]) for m in models} if target_ok else {}
    pool_by_id: dict[str, list[Path]] = {}
    for path, ident in pool:
        pool_by_id.setdefault(ident, []).append(path)
    target_digest = [digest(t) for t in target_ok]
    target_ident = [identities.of_target(t) for t in target_ok]
    target_label = [_rel_label(t, cfg) for t in target_ok]

    # ---- per image
    rows: list[dict] = []
    per_model = {m: {"dod_after": [], "dod_before": [], "dod_face": [], "imp_after": [], "imp_before": [],
                     "imp_face": [], "rank_before": [], "rank_after": [], "protocol": {"other-photos": 0, "self": 0},
                     "dod_by": {k: {"after": [], "face": []} for k in PROTOCOLS},
                     "self_reasons": {k: 0 for k in SELF_REASONS},
                     "imp_excluded": {k: 0 for k in TARGET_EXCLUSIONS}}
                 for m in models}
    face_counts = {"original": 0, "matched": 0, "not_detected": 0, "images_no_face_after": 0}
    utility_rows: list[dict] = []
    refs_sampled: list[int] = []  # per image whose references were sampled: how many it had
    id_probes: list[dict] = []  # identification probes (primary faces of images whose identity is in the gallery)
    gal_by_digest: dict[str, list[int]] = {}
    for k, d in enumerate(gal_digest):
        gal_by_digest.setdefault(d, []).append(k)
    aligned_detection = (aligned_face_detection(cfg, pairs, utility_detector)
                         if utility_detector is not None else {})
    api_jobs: list[tuple] = []  # (row index, kind, protected, reference, ref label, dodging protocol)
    for fp in pairs:
        ident, ident_src = pair_ident[fp.rel]
        row: dict = {"protected": fp.rel, "original": fp.original_rel, "identity": ident,
                     "identity_source": ident_src, "error": None, "models": {}}
        o = faces_of(fp.original)
        p = faces_of(fp.protected, extra.get(fp.protected.resolve()))
        if o.error or p.error:
            row["error"] = o.error or p.error
            errors.append({"file": fp.rel, "error": row["error"]})
            rows.append(row)
            continue
        if not o.faces:
            row["error"] = "no face detected in the original"
            errors.append({"file": fp.rel, "error": row["error"]})
            rows.append(row)
            continue
        if cfg.aligned:  # one pre-aligned face per crop, whatever the crops' sizes
            detected = [0 if p.faces else None for _ in o.faces]
        else:
            scale = size_ratio(o.size, p.size)
            detected = match_faces([f.box for f in o.faces], [f.box for f in p.faces], cfg.iou, scale=scale)
            if scale != (1.0, 1.0):
                row["resized"] = (f"protected {p.size[0]}x{p.size[1]} vs original {o.size[0]}x{o.size[1]}: faces "
                                  "matched after scaling")
        matched = list(range(len(o.faces))) if cfg.landmarks == "original" else detected
        n_det = sum(1 for j in detected if j is not None)
        row.update(faces_original=len(o.faces), faces_protected=len(p.faces), faces_matched=n_det,
                   faces_not_detected=len(o.faces) - n_det)
        face_counts["original"] += len(o.faces)
        face_counts["matched"] += n_det
        face_counts["not_detected"] += len(o.faces) - n_det
        face_counts["images_no_face_after"] += int(len(p.faces) == 0)
        d_orig = digest(fp.original)
        refs = [path for path in pool_by_id.get(ident, []) if digest(path) != d_orig and path != fp.protected.resolve()]
        # the clean photos the primary face is compared with: those with a face, at most
        # max_refs of them (a fixed-seed sample per image); labels once per image, not per model
        ref_ok = [r for r in refs if not faces_of(r).error and faces_of(r).faces]
        n_ref_all = len(ref_ok)
        ref_ok = sample_refs(ref_ok, cfg.max_refs, fp.rel)
        if ref_ok:
            row["references"] = [_rel_label(r, cfg) for r in ref_ok]
            if len(ref_ok) < n_ref_all:
                row["references_total"] = n_ref_all
                refs_sampled.append(n_ref_all)
        id_probe = None
        if gal_ok and ident is not None and ident in identities.gallery_ids:
            d_prot = digest(fp.protected)
            id_probe = {"ident": ident, "exclude": gal_by_digest.get(d_orig, []) + (
                gal_by_digest.get(d_prot, []) if d_prot != d_orig else []), "frows": {}, "before": {}, "after": {}}
            id_probes.append(id_probe)
        # impersonation targets this image must not be measured against: its own original (every
        # face), and for the labelled (largest) face a photo of the source person themself
        own = {k for k, d in enumerate(target_digest) if d == d_orig}
        same_id = {k for k, t_id in enumerate(target_ident)
                   if ident is not None and t_id == ident and k not in own}
        if own or same_id:
            row["impersonation_excluded"] = (
                [{"target": target_label[k], "reason": "own-original", "faces": "all"} for k in sorted(own)]
                + [{"target": target_label[k], "reason": "source-identity", "faces": [0]} for k in sorted(same_id)])
        for m, model in models.items():
            metric = model_metric(model)
            pm = per_model[m]
            mrow: dict = {"faces": []}
            o_emb = o.embeddings[m]
            p_emb = p.extra[m] if cfg.landmarks == "original" else p.embeddings[m]
            R = torch.stack([faces_of(r).embeddings[m][0] for r in ref_ok]) if ref_ok else None
            for i in range(len(o.faces)):
                j = matched[i]
                pe = p_emb[j] if j is not None else None
                frow: dict = {"face": i, "detected": detected[i] is not None}
                if i == 0 and R is not None:
                    after = _sim(pe, R, metric)[0].tolist() if pe is not None else [None] * len(R)
                    before = _sim(o_emb[i], R, metric)[0].tolist()
                    frow["protocol"] = "other-photos"  # scores in the order of row["references"]
                else:
                    after = [float(_sim(pe, o_emb[i], metric)[0, 0])] if pe is not None else [None]
                    before = []
                    frow["protocol"] = "self"
                    frow["self_reason"] = ("secondary-face" if i > 0 else "identity-unknown" if ident is None
                                           else "no-other-photo")
                    pm["self_reasons"][frow["self_reason"]] += 1
                pm["protocol"][frow["protocol"]] += 1
                frow["dodging"] = [_r(s) for s in after]
                frow["dodging_before"] = [_r(s) for s in before]
                face_max = max(after) if pe is not None else None
                pm["dod_after"] += after
                pm["dod_before"] += before
                pm["dod_face"].append(face_max)
                pm["dod_by"][frow["protocol"]]["after"] += after
                pm["dod_by"][frow["protocol"]]["face"].append(face_max)
                if target_ok:
                    skip = own | (same_id if i == 0 else set())
                    keep = [k for k in range(len(target_ok)) if k not in skip]
                    ia: list = []
                    ib: list = []
                    if keep:
                        T = target_emb[m][keep]
                        ia = _sim(pe, T, metric)[0].tolist() if pe is not None else [None] * len(T)
                        ib = _sim(o_emb[i], T, metric)[0].tolist()
                        pm["imp_face"].append(max((s for s in ia if s is not None), default=None))
                    frow["impersonation"] = [_r(s) for s in ia]
                    frow["impersonation_before"] = [_r(s) for s in ib]
                    if skip:  # the scores above are for the targets left after these
                        frow["impersonation_excluded"] = [target_label[k] for k in sorted(skip)]
                        pm["imp_excluded"]["own-original"] += len(own)
                        pm["imp_excluded"]["source-identity"] += len(skip) - len(own)
                    pm["imp_after"] += ia
                    pm["imp_before"] += ib
                if i == 0 and id_probe is not None:  # ranked for all probes at once below
                    id_probe["frows"][m] = frow
                    id_probe["before"][m] = o_emb[0]
                    id_probe["after"][m] = pe
                mrow["faces"].append(frow)
            th = thresholds[m].values
            mrow["dodging_max"] = _r(max((s for f in mrow["faces"] for s in f["dodging"] if s is not None), default=None))
            mrow["protected_at"] = {far: None if th[far] is None else
                                    all(s is None or s < th[far] for f in mrow["faces"] for s in f["dodging"])
                                    for far in FARS}
            row["models"][m] = mrow
        if cfg.utility:
            u = _utility(o, p, matched, detected, expression_model, cfg.landmarks == "original",
                         aligned_detection.get(fp.rel, {"error": utility_detector_error or "not checked"}) if cfg.aligned else None)
            row["utility"] = u
            utility_rows.append(u)
        # API jobs: the primary face's comparisons, at most api_max_refs references
        if adapters:
            if ref_ok:  # the same (sampled) references as the local models, at most api_max_refs
                for r in ref_ok[: cfg.api_max_refs]:
                    api_jobs.append((len(rows), "dodging", fp.protected, r, _rel_label(r, cfg), "other-photos"))
            else:
                api_jobs.append((len(rows), "dodging", fp.protected, fp.original, fp.original_rel, "self"))
            api_targets = [k for k in range(len(target_ok)) if k not in own and k not in same_id]
            for k in api_targets[: cfg.api_max_refs]:
                api_jobs.append((len(rows), "impersonation", fp.protected, target_ok[k], target_label[k], None))
        rows.append(row)

    # ---- identification: every probe against the gallery, one matrix product per model (chunked)
    if id_probes:
        for m, model in models.items():
            metric = model_metric(model)
            excl = [pr["exclude"] for pr in id_probes]
            true_ids = [pr["ident"] for pr in id_probes]
            rb = gallery_ranks(gal_emb[m], gal_ids, torch.stack([pr["before"][m] for pr in id_probes]), true_ids,
                               excl, metric)
            has_after = [k for k, pr in enumerate(id_probes) if pr["after"][m] is not None]
            ra: list = [None] * len(id_probes)
            if has_after:
                got = gallery_ranks(gal_emb[m], gal_ids, torch.stack([id_probes[k]["after"][m] for k in has_after]),
                                    [true_ids[k] for k in has_after], [excl[k] for k in has_after], metric)
                for k, r in zip(has_after, got):
                    ra[k] = r
            for pr, b, a in zip(id_probes, rb, ra):
                if b is None:  # the true identity has no gallery photo left once the probe's own are excluded
                    continue
                pr["frows"][m]["rank_before"], pr["frows"][m]["rank_after"] = b, a
                per_model[m]["rank_before"].append(b)
                per_model[m]["rank_after"].append(a)
    if refs_sampled:
        notes.append(f"dodging: {len(refs_sampled)} image(s) had more other clean photos of their person than "
                     f"--max-refs {cfg.max_refs} (up to {max(refs_sampled)}); each was compared with a fixed-seed "
                     f"sample of {cfg.max_refs} of them (row references / references_total; --max-refs 0 compares "
                     "with all)")

    # ---- aggregate per model
    report_models: dict = {}
    scores: dict = {}
    for m, pm in per_model.items():
        th = thresholds[m].values
        entry: dict = {}
        # headline: every attempt of both protocols; by_protocol: each protocol alone; before: the
        # other-photo comparisons (self-verification has no clean "before")
        entry["dodging"] = {
            **_dodging_stats(pm["dod_after"], pm["dod_face"], th),
            "protocol": dict(pm["protocol"]),
            "by_protocol": {k: _dodging_stats(pm["dod_by"][k]["after"], pm["dod_by"][k]["face"], th)
                            for k in PROTOCOLS},
            "before": {"n": len(pm["dod_before"]), "psr": psr(pm["dod_before"], th, mode="dodging"),
                       "mean_similarity": _r(mean_or_none(pm["dod_before"])), "protocol": "other-photos"},
        }
        entry["dodging"]["by_protocol"]["self"]["reasons"] = dict(pm["self_reasons"])
        if target_ok:
            entry["impersonation"] = {
                "n": len(pm["imp_after"]), "n_faces": len(pm["imp_face"]),
                "psr": psr(pm["imp_after"], th, mode="impersonation"),
                "psr_faces": psr(pm["imp_face"], th, mode="impersonation"),
                "mean_similarity": _r(mean_or_none(pm["imp_after"])),
                "excluded": dict(pm["imp_excluded"]),
                "before": {"n": len(pm["imp_before"]), "psr": psr(pm["imp_before"], th, mode="impersonation"),
                           "mean_similarity": _r(mean_or_none(pm["imp_before"]))},
            }
        if gallery:
            n_id = len(pm["rank_before"])
            entry["identification"] = {
                "n": n_id,
                "rank1_before": rank_k(pm["rank_before"], 1), "rank1_after": rank_k(pm["rank_after"], 1),
                "rank5_before": rank_k(pm["rank_before"], 5), "rank5_after": rank_k(pm["rank_after"], 5),
                "gallery_images": len(gal_ok), "gallery_identities": len({g.identity for g, _ in gal_ok}),
            }
        roc = _roc_entry(pm, pool, models[m], m, faces_of)
        if roc:
            entry["roc"] = roc
        entry["amp"] = cache.amp_report().get(m)
        report_models[m] = entry
        scores[m] = {"dodging_after": [_r(s) for s in pm["dod_after"]], "dodging_before": [_r(s) for s in pm["dod_before"]],
                     "dodging_after_other_photos": [_r(s) for s in pm["dod_by"]["other-photos"]["after"]],
                     "dodging_self": [_r(s) for s in pm["dod_by"]["self"]["after"]],
                     "impersonation_after": [_r(s) for s in pm["imp_after"]],
                     "impersonation_before": [_r(s) for s in pm["imp_before"]]}
    notes += _protocol_notes(per_model, known, bool(target_ok))

    # ---- quality
    quality_injected = quality_meter is not None
    if cfg.quality:
        quality_meter = quality_meter or QualityMeter(lpips=cfg.lpips, fid=cfg.fid, device=device,
                                                      download=cfg.download)
        quality = _quality(cfg, pairs, rows, device, quality_meter)
    else:
        quality_meter = None
        quality = {"psnr": None, "ssim": None, "lpips": None, "fid": None,
                   "unavailable": {"all": "disabled (--no-quality)"}}
    notes += _thin_statistics_notes(report_models, thresholds)
    if cfg.utility and cfg.aligned:
        notes += _aligned_utility_notes(aligned_detection, cfg.detector)

    report: dict = {
        "facepriv_report": "audit", "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": cfg.to_json(),
        "versions": model_versions(
            models, cfg.detector if (not cfg.aligned or utility_detector is not None) else None,
            injected=recognizers is not None,
            detector_role=(None if cfg.aligned and utility_detector is None else "utility: face still detected in the padded crops"
                           if cfg.aligned else "faces of every photo"),
            detector_injected=detector_injected, expression=expression_model if cfg.utility else None,
            expression_amp=cache.amp_report().get(EXPRESSION_MODEL) if cfg.utility else None,
            expression_injected=expression_injected, quality_meter=quality_meter, quality_injected=quality_injected),
        "thresholds": {m: t.to_json() for m, t in thresholds.items()},
        "models": report_models,
        "quality": quality,
        "faces": face_counts,
        "counts": {"pairs": len(pairs), "evaluated": sum(1 for r in rows if not r["error"]),
                   "identities_known": known, "reference_photos": len(pool), "targets": len(target_ok),
                   "gallery_images": len(gal_ok)},
        "protocol_notes": notes + [t.note for t in thresholds.values() if t.note] + [
            n for t in thresholds.values()
            if (n := calibration_mismatch(t, detector=None if cfg.aligned else cfg.detector, aligned=cfg.aligned,
                                          aligned_template=cfg.aligned_template))],
        "images": rows,
        "scores": scores,
        "errors": errors,
    }
    if cfg.utility:
        report["utility"] = _utility_summary(utility_rows, face_counts, cfg.aligned, cfg.detector)
        if utility_detector_error:
            report["utility"]["face_detected_rate"] = None
            report["utility"]["unavailable"] = {"face_detection": utility_detector_error}
    if adapters:
        report["apis"] = _run_apis(cfg, rows, api_jobs, adapters)
    report["timings"] = {"total_s": round(time.perf_counter() - t_start, 3), "embedding_s": round(embed_seconds, 3),
                         **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in cache.timings.items()}}
    report["calibration"] = {m: t.calibration for m, t in thresholds.items() if t.calibration}
    report = redact(report)
    if cfg.out is not None:
        from .report import write_reports

        report["outputs"] = {k: str(v) for k, v in write_reports(report, cfg.out, cfg).items()}
    return report


def _dodging_stats(after: list, faces: list, th: dict) -> dict:
    return {"n": len(after), "n_faces": len(faces), "psr": psr(after, th, mode="dodging"),
            "psr_faces": psr(faces, th, mode="dodging"), "mean_similarity": _r(mean_or_none(after)),
            "not_detected": sum(1 for s in after if s is None)}


def _protocol_notes(per_model: dict, known: int, impersonation: bool) -> list[str]:
    """Notes on the dodging protocol mix and on impersonation targets left out (the counts are
    per model; they are the same for every model, so the first one's are given)."""
    if not per_model:
        return []
    pm = next(iter(per_model.values()))
    notes = []
    n_self, n_other = pm["protocol"]["self"], pm["protocol"]["other-photos"]
    if n_self:
        why = {"identity-unknown": "identity unknown" + (
                   " (no --identities, --gallery or --pairs matched the originals)" if known == 0 else ""),
               "no-other-photo": "no other clean photo of the person",
               "secondary-face": "secondary face of a photo (the identity label is the largest face's)"}
        reasons = "; ".join(f"{why[k]}: {v}" for k, v in pm["self_reasons"].items() if v)
        n_cmp_other = len(pm["dod_by"]["other-photos"]["after"])
        text = (f"dodging: {n_self} of {n_self + n_other} face(s) fell back to self-verification (protected face vs "
                f"its own original: weaker, no 'before'): {reasons}. ")
        if n_other:
            text += (f"{n_other} face(s) were compared with other clean photos of the same person ({n_cmp_other} "
                     "comparison(s)). The headline dodging PSR counts both protocols (dodging.by_protocol splits "
                     "them); the 'before' baseline, the ROC and the before/after histograms use the other-photo "
                     "comparisons only, self-verification is shown apart in the histograms.")
        else:
            text += "There is no 'before' baseline and no ROC (they need other photos of the same person)."
        notes.append(text)
    ex = pm["imp_excluded"]
    if impersonation and any(ex.values()):
        parts = []
        if ex["own-original"]:
            parts.append(f"{ex['own-original']} with a target photo byte-identical to the image's own original")
        if ex["source-identity"]:
            parts.append(f"{ex['source-identity']} with a target photo of the source person's own identity")
        notes.append(f"impersonation: {sum(ex.values())} comparison(s) left out of the impersonation PSR and its "
                     "'before' (impersonating oneself is not an attack): " + ", ".join(parts)
                     + "; the rows list them (impersonation_excluded)")
    return notes


def _rel_label(path: Path, cfg: AuditConfig) -> str:
    for root in (cfg.original, cfg.gallery, cfg.pairs_root or (cfg.pairs.parent if cfg.pairs else None), cfg.target):
        if root is not None and root.is_dir():
            try:
                return Path(path).resolve().relative_to(root.resolve()).as_posix()
            except ValueError:
                continue
    return Path(path).name


def _roc_entry(pm: dict, pool: list, model, name: str, faces_of) -> dict | None:
    """ROC before/after protection: genuine = (photo, other photo of the same person) pairs,
    impostors = clean photos of different people. "before" and "after" use the same genuine
    comparisons (other-photos protocol); self-verification, which has no "before", is left out."""
    gen_after = pm["dod_by"]["other-photos"]["after"]
    if not pm["dod_before"]:
        return None
    by_id: dict[str, list[torch.Tensor]] = {}
    for path, ident in pool:
        r = faces_of(path)
        if not r.error and r.faces:
            by_id.setdefault(ident, []).append(r.embeddings[name][0])
    if len(by_id) < 2:
        return None
    embs = torch.stack([e for es in by_id.values() for e in es])
    ids = np.array([i for i, es in by_id.items() for _ in es])
    metric = model_metric(model)
    n = len(ids)
    if n * (n - 1) // 2 <= 2 * MAX_IMPOSTOR_PAIRS:
        S = _sim(embs, embs, metric).numpy()
        iu = np.triu_indices(n, 1)
        imp = S[iu][ids[iu[0]] != ids[iu[1]]]
    else:  # large pools: a fixed random sample of impostor pairs instead of the full matrix
        rng = np.random.default_rng(0)
        a, b = rng.integers(0, n, 4 * MAX_IMPOSTOR_PAIRS), rng.integers(0, n, 4 * MAX_IMPOSTOR_PAIRS)
        sel = ids[a] != ids[b]
        a, b = a[sel][:MAX_IMPOSTOR_PAIRS], b[sel][:MAX_IMPOSTOR_PAIRS]
        from ..models.recognition import similarity

        imp = similarity(embs[torch.from_numpy(a)], embs[torch.from_numpy(b)], metric).numpy()
    if len(imp) == 0:
        return None
    if len(imp) > MAX_IMPOSTOR_PAIRS:
        imp = np.random.default_rng(0).choice(imp, MAX_IMPOSTOR_PAIRS, replace=False)
    out = {"n_impostor": int(len(imp)), "n_genuine": len(pm["dod_before"]), "genuine_protocol": "other-photos",
           "self_left_out": len(pm["dod_by"]["self"]["after"])}
    from ..models.thresholds import _downsample_roc, auc_score

    finite = [s for s in gen_after + pm["dod_before"] if s is not None]
    floor = float(min(imp.min(), min(finite, default=imp.min()))) - 1.0  # "never verifies" (face not detected)
    for key, gen in (("before", pm["dod_before"]), ("after", gen_after)):
        g = np.array([(floor if s is None else s) for s in gen], dtype=np.float64)
        if len(g) == 0:
            continue
        fpr, tpr, thr = roc_curve(g, imp)
        out[key] = {"auc": _r(auc_score(fpr, tpr)), **{k: v for k, v in _downsample_roc(fpr, tpr, thr, 200).items()
                                                        if k != "threshold"}}
    return out


def _utility(o: ImageFaces, p: ImageFaces, matched, detected, expr, at_original: bool,
             aligned: dict | None = None) -> dict:
    """Utility of one image: faces still detected and, per face (``face``: its index among the
    original's faces), whether the expression was kept. Pre-aligned crops (``aligned``: the
    result of :func:`aligned_face_detection`) say whether a real detector found the face in the
    original crop (``face_in_original``) and still finds it in the protected one
    (``faces_detected_after`` 1 / 0; None when it missed the original's face already)."""
    from ..models.expression import LABELS

    if aligned is not None:
        ok = "error" not in aligned
        out: dict = {"faces": len(o.faces), "face_in_original": aligned.get("in_original") if ok else None,
                     "faces_detected_after": (int(aligned["in_protected"]) if ok and aligned.get("in_original")
                                              else None)}
        if not ok:
            out["detection_error"] = aligned["error"]
    else:
        out = {"faces_detected_after": sum(1 for j in detected if j is not None), "faces": len(o.faces)}
    if expr is None or EXPRESSION_MODEL not in o.embeddings:
        return out
    if aligned is not None and out.get("faces_detected_after") == 0:
        # the detector finds no face left in the protected crop: an expression read from it
        # would be a reading of no face (the crop is still embedded for dodging)
        out["expression"] = []
        out["expression_skipped"] = "no face detected in the protected crop"
        return out
    labels = getattr(expr, "labels", LABELS)
    per_face = []
    for i, j in enumerate(matched):
        if j is None:
            continue
        p_logits = p.extra[EXPRESSION_MODEL][i] if at_original else p.embeddings[EXPRESSION_MODEL][j]
        per_face.append({"face": i, **expression_change(o.embeddings[EXPRESSION_MODEL][i].softmax(-1),
                                                         p_logits.softmax(-1), labels)})
    out["expression"] = per_face
    return out


def _utility_summary(rows: list[dict], faces: dict, aligned: bool = False, detector: str | None = None) -> dict:
    ex = [f for r in rows for f in r.get("expression", [])]
    extra: dict = {}
    if aligned:  # a real detector on the padded crops; crops whose original it missed are left out
        judged = [r for r in rows if r.get("faces_detected_after") is not None]
        rate = (sum(r["faces_detected_after"] for r in judged) / len(judged)) if judged else None
        extra = {"face_detection": f"{detector} on padded crops", "faces_judged": len(judged),
                 "faces_left_out": len(rows) - len(judged)}
    else:
        rate = (faces["matched"] / faces["original"]) if faces["original"] else None
    return {"face_detected_rate": rate, **extra,
            "expression_kept_rate": (sum(f["expression_kept"] for f in ex) / len(ex)) if ex else None,
            "expression_tv_mean": float(np.mean([f["expression_tv"] for f in ex])) if ex else None,
            "n_faces": len(ex), "model": EXPRESSION_MODEL}


def _aligned_utility_notes(detection: dict[str, dict], detector: str) -> list[str]:
    missed = sum(1 for d in detection.values() if d.get("in_original") is False)
    if not missed:
        return []
    judged = sum(1 for d in detection.values() if d.get("in_original"))
    return [f"utility: the detector ({detector}) found no face in {missed} original crop(s), even padded; they are "
            "left out of 'face still detected' (" + (f"{judged} crop(s) judged)" if judged else
                                                     "none left: the rate is null)")]


def _thin_statistics_notes(report_models: dict, thresholds: dict[str, ThresholdSet]) -> list[str]:
    """Notes where a figure is decided by the size of the test rather than by the protection:
    rank-5 over a gallery of 5 identities or fewer (100 % by definition), an ROC from fewer than
    1/FAR impostor pairs (its low-FAR end is not resolved), FAR thresholds calibrated on fewer
    than 1/FAR impostor pairs (their own note says so, when they carry one)."""
    notes = []
    for m, e in report_models.items():
        ident = e.get("identification")
        if ident and ident.get("n") and ident.get("gallery_identities", 0) <= 5:
            notes.append(f"identification ({m}): the gallery has only {ident['gallery_identities']} identit"
                         f"{'y' if ident['gallery_identities'] == 1 else 'ies'}, so rank-5 is 100% by definition; "
                         "only rank-1 says anything")
        roc = e.get("roc")
        if roc and roc.get("n_impostor") is not None:
            n = roc["n_impostor"]
            bad = [f for f in FARS if n < math.ceil(1 / float(f))]
            if bad:
                notes.append(f"ROC ({m}): only {n} impostor pair(s): the curve cannot resolve FAR "
                             f"{', '.join(bad)} (each needs at least 1/FAR impostor pairs)")
    for m, t in thresholds.items():
        cal = t.calibration or {}
        n = cal.get("n_impostor")
        if n is None or t.kind not in ("calibrated", "file") or "impostor pairs" in (t.note or ""):
            continue
        bad = [f for f in FARS if n < math.ceil(1 / float(f))]
        if bad:
            notes.append(f"thresholds ({m}): calibrated on only {n} impostor pair(s): FAR {', '.join(bad)} cannot be "
                         "resolved (each needs at least 1/FAR impostor pairs); those thresholds only sit above the "
                         "highest impostor scores seen")
    return notes


def _quality(cfg: AuditConfig, pairs, rows, device, meter: QualityMeter | None) -> dict:
    """Quality of every pair, with bounded memory whatever the photos' size.

    Images are read ahead by ``cfg.workers`` threads (at most ``workers + 2`` pairs waiting,
    kept as decoded 8/16-bit arrays, not float) and fed to the meter in chunks of at most
    ``cfg.batch_size`` pairs and :data:`QUALITY_CHUNK_PIXELS` pixels (so a chunk of 24 MP photos
    is one or two pairs, a chunk of small crops a whole batch); only the chunk being measured is
    float. ``add_many`` is used where the meter has it, else ``add`` per pair. An unreadable
    image fails only its own row; a chunk the meter rejects is redone pair by pair, so only the
    pair at fault fails."""
    meter = meter or QualityMeter(lpips=cfg.lpips, fid=cfg.fid, device=device, download=cfg.download)
    by_rel = {r["protected"]: r for r in rows}
    add_many = getattr(meter, "add_many", None)

    def load(fp):
        try:
            return fp, (load_image(fp.protected, max_pixels=cfg.max_pixels),
                        load_image(fp.original, max_pixels=cfg.max_pixels)), None
        except Exception as exc:  # noqa: BLE001 - quality of one image never stops the audit
            return fp, None, str(exc)

    def pixels(pair) -> int:
        return sum(im.size[0] * im.size[1] for im in pair)

    def fmt(q: dict) -> dict:
        return {k: (_r(v) if isinstance(v, float) else v) for k, v in q.items()}

    def one(fp, pair):
        try:
            by_rel[fp.rel]["quality"] = fmt(meter.add(pair[0].to_tensor(), pair[1].to_tensor()))
        except Exception as exc:  # noqa: BLE001
            by_rel[fp.rel]["quality"] = {"error": str(exc)}

    def feed(chunk: list) -> None:
        if not chunk:
            return
        if add_many is None or len(chunk) == 1:
            for fp, pair in chunk:
                one(fp, pair)
            return
        try:
            qs = add_many([(a.to_tensor(), b.to_tensor()) for _, (a, b) in chunk])
        except Exception:  # noqa: BLE001 - find the pair at fault
            for fp, pair in chunk:
                one(fp, pair)
            return
        for (fp, _), q in zip(chunk, qs):
            by_rel[fp.rel]["quality"] = fmt(q)

    batch = max(1, cfg.batch_size)
    ahead = max(1, cfg.workers) + 2
    with make_progress(enabled=cfg.progress) as bar, ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        task = bar.add_task("quality", total=len(pairs))
        queue: deque = deque()
        it = iter(pairs)
        for fp in it:
            queue.append(pool.submit(load, fp))
            if len(queue) >= ahead:
                break
        chunk: list = []
        chunk_px = 0
        while queue:
            fp, pair, err = queue.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                queue.append(pool.submit(load, nxt))
            if err is not None:
                by_rel[fp.rel]["quality"] = {"error": err}
                bar.advance(task)
                continue
            px = pixels(pair)
            if chunk and chunk_px + px > QUALITY_CHUNK_PIXELS:  # this pair would overflow the chunk
                feed(chunk)
                bar.advance(task, len(chunk))
                chunk, chunk_px = [], 0
            chunk.append((fp, pair))
            chunk_px += px
            if len(chunk) >= batch:
                feed(chunk)
                bar.advance(task, len(chunk))
                chunk, chunk_px = [], 0
        feed(chunk)
        bar.advance(task, len(chunk))
    out = meter.summary()
    return {k: (_r(v) if isinstance(v, float) else v) for k, v in out.items()}


def _run_apis(cfg: AuditConfig, rows: list[dict], jobs: list, adapters: dict) -> dict:
    """Send the jobs to every adapter (built by :func:`build_apis` before the audit started)."""
    out = {}
    for name, api in adapters.items():
        results = api.compare_many([(j[2], j[3]) for j in jobs], progress=cfg.progress,
                                   description=f"{name} ({len(jobs)} comparisons)")
        records: dict[str, list] = {}
        protocols: dict[str, int] = {}
        for (ri, kind, _, _, ref, protocol), res in zip(jobs, results):
            rec = {"kind": kind, "reference": ref, "score": res.score, "thresholds": res.thresholds,
                   "error": res.error, "no_face_in": res.no_face_in if res.no_face else None, "cached": res.cached}
            if getattr(res, "note", None):  # what the adapter did to the images (re-encoded, upscaled)
                rec["note"] = res.note
            if protocol:
                rec["protocol"] = protocol
                protocols[protocol] = protocols.get(protocol, 0) + 1
            rows[ri].setdefault("apis", {}).setdefault(name, []).append(rec)
            records.setdefault(kind, []).append(res)
        summary = {"provider": api.describe(), "calls": api.calls, **api.stats, **_api_status(api, results)}
        for kind, recs in records.items():
            summary[kind] = _api_summary(recs, kind)
        if "dodging" in summary:
            summary["dodging"]["protocol"] = protocols
        out[name] = summary
    return redact(out)


def _api_status(api, results: list) -> dict:
    """Whether a provider worked: ``status`` ok | some-errors | failed (every pair failed) |
    stopped (a fatal error, e.g. rejected credentials, stopped the adapter), with ``stopped``
    (the adapter's stop reason) and ``first_error`` (already redacted by the adapter)."""
    failed = [r for r in results if not r.ok and not r.no_face]
    stopped = getattr(api, "stopped_reason", None)
    if not stopped:
        gone = next((r.error for r in failed if r.code == "ADAPTER_STOPPED" and r.error), None)
        stopped = gone.removeprefix("not sent: ") if gone else None
    first = next((r.error for r in failed if r.error and r.code != "ADAPTER_STOPPED"), None)
    first = first or next((r.error for r in failed if r.error), None)
    if stopped:
        status = "stopped"
    elif results and len(failed) == len(results):
        status = "failed"
    elif failed:
        status = "some-errors"
    else:
        status = "ok"
    return {"status": status, "stopped": redact(stopped) if stopped else None,
            "first_error": redact(first) if first else None, "pairs": len(results), "failed_pairs": len(failed)}


def _api_summary(results: list, kind: str) -> dict:
    """PSR of one provider at each of its threshold keys (Face++: per-response thresholds).

    A protected photo in which the service finds no face counts as protected (dodging) /
    failed (impersonation); a reference without a face, and errors, are left out and counted.
    """
    ok = [r for r in results if r.ok]
    keys = sorted({k for r in ok for k in r.thresholds})
    prot_no_face = [r for r in results if not r.ok and r.no_face and r.no_face_in == 1]
    outcome: dict[str, list[bool]] = {}
    seen: dict[str, list[float]] = {}
    for k in keys:
        ver = [r.score >= r.thresholds[k] for r in ok if k in r.thresholds]
        ver += [False] * len(prot_no_face)
        outcome[k] = ver
        vals = [r.thresholds[k] for r in ok if k in r.thresholds]
        seen[k] = [min(vals), max(vals)]
    if kind == "dodging":
        rates = {k: (sum(1 for v in vs if not v) / len(vs)) if vs else None for k, vs in outcome.items()}
    else:
        rates = {k: (sum(1 for v in vs if v) / len(vs)) if vs else None for k, vs in outcome.items()}
    return {"n": len(ok) + len(prot_no_face), "psr": rates, "mean_score": _r(mean_or_none([r.score for r in ok])),
            "no_face_protected": len(prot_no_face),
            "no_face_other": sum(1 for r in results if not r.ok and r.no_face and r.no_face_in != 1),
            "errors": sum(1 for r in results if not r.ok and not r.no_face),
            "cached": sum(1 for r in results if r.cached), "thresholds_seen": seen}
