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

import math
import time
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
from .metrics import QualityMeter, expression_change, identity_rank, match_faces, mean_or_none, psr, rank_k
from .secrets import redact
from .thresholds import FARS, ThresholdSet, calibration_mismatch, resolve_thresholds, roc_curve

EXPRESSION_MODEL = "expr-fer7"
MAX_IMPOSTOR_PAIRS = 20000
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
        d = asdict(self)
        return redact({k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if k == "target_used" else v)
                       for k, v in d.items()})


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


def model_versions(models: dict, detector_name: str | None) -> dict:
    import platform

    from .. import __version__

    info: dict = {"facepriv": __version__, "torch": torch.__version__, "python": platform.python_version(),
                  "detector": detector_name, "models": {}}
    for name, m in models.items():
        spec = getattr(m, "spec", None)
        entry = {"architecture": getattr(spec, "architecture", type(m).__name__),
                 "template": getattr(spec, "template", None), "input_size": getattr(spec, "input_size", None),
                 "metric": getattr(spec, "metric", None), "runtime": getattr(spec, "runtime", None)}
        try:
            from ..models import availability

            entry["weights"] = availability(spec.name).where if spec is not None else None
        except Exception:  # noqa: BLE001 - injected / unregistered models
            entry["weights"] = None
        info["models"][name] = entry
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
    if detector is None and not cfg.aligned:
        from ..models import create_model

        detector = create_model(cfg.detector, device=device)
    file_data = None
    if cfg.thresholds is not None:
        from .thresholds import _read_threshold_file

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
    cache = FaceEmbeddingCache(embed_models, detector=detector, device=device, batch_size=cfg.batch_size,
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

    def primary_emb(path: Path, model: str) -> torch.Tensor | None:
        r = faces_of(path)
        if r.error or not r.faces:
            return None
        return r.embeddings[model][0]

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
            ref_embs = [(r, primary_emb(r, m)) for r in refs]
            ref_embs = [(r, e) for r, e in ref_embs if e is not None]
            for i in range(len(o.faces)):
                j = matched[i]
                pe = p_emb[j] if j is not None else None
                frow: dict = {"face": i, "detected": detected[i] is not None}
                if i == 0 and ref_embs:
                    R = torch.stack([e for _, e in ref_embs])
                    after = _sim(pe, R, metric)[0].tolist() if pe is not None else [None] * len(R)
                    before = _sim(o_emb[i], R, metric)[0].tolist()
                    frow["protocol"] = "other-photos"
                    frow["references"] = [_rel_label(r, cfg) for r, _ in ref_embs]
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
                if i == 0 and gal_ok and ident is not None and ident in identities.gallery_ids:
                    d_prot = digest(fp.protected)
                    keep = [k for k, d in enumerate(gal_digest) if d not in (d_orig, d_prot)]
                    ids = [gal_ids[k] for k in keep]
                    if ident in ids:
                        E = gal_emb[m][keep]
                        rb = identity_rank(_sim(o_emb[0], E, metric)[0], ids, ident)
                        ra = identity_rank(_sim(pe, E, metric)[0], ids, ident) if pe is not None else None
                        frow["rank_before"], frow["rank_after"] = rb, ra
                        pm["rank_before"].append(rb)
                        pm["rank_after"].append(ra)
                mrow["faces"].append(frow)
            th = thresholds[m].values
            mrow["dodging_max"] = _r(max((s for f in mrow["faces"] for s in f["dodging"] if s is not None), default=None))
            mrow["protected_at"] = {far: None if th[far] is None else
                                    all(s is None or s < th[far] for f in mrow["faces"] for s in f["dodging"])
                                    for far in FARS}
            row["models"][m] = mrow
        if cfg.utility:
            u = _utility(o, p, matched, detected, expression_model, cfg.landmarks == "original")
            row["utility"] = u
            utility_rows.append(u)
        # API jobs: the primary face's comparisons, at most api_max_refs references
        if adapters:
            if refs:
                for r in refs[: cfg.api_max_refs]:
                    api_jobs.append((len(rows), "dodging", fp.protected, r, _rel_label(r, cfg), "other-photos"))
            else:
                api_jobs.append((len(rows), "dodging", fp.protected, fp.original, fp.original_rel, "self"))
            api_targets = [k for k in range(len(target_ok)) if k not in own and k not in same_id]
            for k in api_targets[: cfg.api_max_refs]:
                api_jobs.append((len(rows), "impersonation", fp.protected, target_ok[k], target_label[k], None))
        rows.append(row)

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
    quality = _quality(cfg, pairs, rows, device, quality_meter) if cfg.quality else {
        "psnr": None, "ssim": None, "lpips": None, "fid": None, "unavailable": {"all": "disabled (--no-quality)"}}

    report: dict = {
        "facepriv_report": "audit", "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": cfg.to_json(),
        "versions": model_versions(models, None if cfg.aligned else cfg.detector),
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
        report["utility"] = _utility_summary(utility_rows, face_counts)
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
    from .thresholds import _downsample_roc, auc_score

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


def _utility(o: ImageFaces, p: ImageFaces, matched, detected, expr, at_original: bool) -> dict:
    from ..models.expression import LABELS

    out: dict = {"faces_detected_after": sum(1 for j in detected if j is not None), "faces": len(o.faces)}
    if expr is None or EXPRESSION_MODEL not in o.embeddings:
        return out
    labels = getattr(expr, "labels", LABELS)
    per_face = []
    for i, j in enumerate(matched):
        if j is None:
            continue
        p_logits = p.extra[EXPRESSION_MODEL][i] if at_original else p.embeddings[EXPRESSION_MODEL][j]
        per_face.append(expression_change(o.embeddings[EXPRESSION_MODEL][i].softmax(-1), p_logits.softmax(-1), labels))
    out["expression"] = per_face
    return out


def _utility_summary(rows: list[dict], faces: dict) -> dict:
    ex = [f for r in rows for f in r.get("expression", [])]
    return {"face_detected_rate": (faces["matched"] / faces["original"]) if faces["original"] else None,
            "expression_kept_rate": (sum(f["expression_kept"] for f in ex) / len(ex)) if ex else None,
            "expression_tv_mean": float(np.mean([f["expression_tv"] for f in ex])) if ex else None,
            "n_faces": len(ex), "model": EXPRESSION_MODEL}


def _quality(cfg: AuditConfig, pairs, rows, device, meter: QualityMeter | None) -> dict:
    meter = meter or QualityMeter(lpips=cfg.lpips, fid=cfg.fid, device=device, download=cfg.download)
    by_rel = {r["protected"]: r for r in rows}
    with make_progress(enabled=cfg.progress) as bar:
        task = bar.add_task("quality", total=len(pairs))
        for fp in pairs:
            row = by_rel[fp.rel]
            try:
                a = load_image(fp.protected, max_pixels=cfg.max_pixels).to_tensor()
                b = load_image(fp.original, max_pixels=cfg.max_pixels).to_tensor()
                q = meter.add(a, b)
                row["quality"] = {k: (_r(v) if isinstance(v, float) else v) for k, v in q.items()}
            except Exception as exc:  # noqa: BLE001 - quality of one image never stops the audit
                row["quality"] = {"error": str(exc)}
            bar.advance(task)
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
