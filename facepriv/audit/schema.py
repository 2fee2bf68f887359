"""The audit report as typed sections: :class:`AuditReport` and its parts.

``run_audit`` builds an :class:`AuditReport`; report.json, report.csv, report.html and the
terminal summary all read it. Every section is a dataclass with ``to_json()`` (the dict that
report.json holds, keys in the order written) and ``from_json()`` (a dict from report.json, or a
partial one: a missing key takes the field's default). A field marked optional is left out of
the JSON while it is None; keys a section does not know are kept in ``extra`` and written after
the known ones, so a report read and written again keeps them.

    >>> report = AuditReport.from_json(json.loads(Path("report/report.json").read_text()))
    >>> report.models["sface"].dodging.psr["1e-3"]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..models.thresholds import FARS

REPORT_KIND = "audit"
REPORT_VERSION = 1


def optional(**kw) -> Any:
    """A field written to the JSON only while it is not None."""
    return field(default=None, metadata={"optional": True, **kw})


def _plain(value: Any) -> Any:
    """The JSON form of a field value: sections as their ``to_json()``, dicts and lists copied."""
    if isinstance(value, Section):
        return value.to_json()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def json_of(value: Any) -> Any:
    """The JSON form of a section, or of a dict / list of sections."""
    return _plain(value)


def mapping_of(parse: Callable) -> Callable[[Mapping], dict]:
    """Parser of a ``{name: section}`` JSON object."""
    return lambda d: {k: parse(v) for k, v in d.items()}


@dataclass
class Section:
    """Shared ``to_json`` / ``from_json`` of the report's sections (fields in JSON order)."""

    extra: dict = field(default_factory=dict, repr=False, kw_only=True, metadata={"extra": True})

    def to_json(self) -> dict:
        out: dict = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.metadata.get("extra") or (v is None and f.metadata.get("optional")):
                continue
            out[f.name] = _plain(v)
        out.update(_plain(self.extra))
        return out

    @classmethod
    def from_json(cls, d: Mapping | None):
        d = d or {}
        kw: dict = {}
        known = set()
        for f in dataclasses.fields(cls):
            if f.metadata.get("extra"):
                continue
            known.add(f.name)
            if f.name in d:
                parse = f.metadata.get("parse")
                kw[f.name] = parse(d[f.name]) if parse is not None and d[f.name] is not None else d[f.name]
        return cls(**kw, extra={k: v for k, v in d.items() if k not in known})


# ------------------------------------------------------------------------------ thresholds
@dataclass
class ThresholdEntry(Section):
    """A model's thresholds: the value at each FAR (None: unknown), where they come from
    (``source``), their ``kind`` (file, protocol, calibrated, default, none) and a ``note``."""

    values: dict = field(default_factory=dict)
    source: str = ""
    kind: str | None = None
    note: str | None = optional()

    def at(self, far: str) -> float | None:
        return self.values.get(far)

    def to_json(self) -> dict:
        out = {far: self.values.get(far) for far in FARS}
        out.update({k: v for k, v in super().to_json().items() if k != "values"})
        return out

    @classmethod
    def from_json(cls, d: Mapping | None) -> ThresholdEntry:
        d = d or {}
        entry = super().from_json({k: v for k, v in d.items() if k not in FARS})
        entry.values = {far: d.get(far) for far in FARS}
        return entry


# ------------------------------------------------------------------------------ per-model results
@dataclass
class Before(Section):
    """The same comparisons made with the clean photo (the "before" baseline)."""

    n: int = 0
    psr: dict = field(default_factory=dict)
    mean_similarity: float | None = None
    protocol: str | None = optional()


@dataclass
class Rates(Section):
    """PSR at each FAR over ``n`` comparisons (``psr_faces``: per face, over ``n_faces``)."""

    n: int = 0
    n_faces: int | None = optional()
    psr: dict = field(default_factory=dict)
    psr_faces: dict | None = optional()
    mean_similarity: float | None = None


@dataclass
class ProtocolStats(Rates):
    """Dodging under one protocol (or both): rates, and the faces no longer detected."""

    not_detected: int | None = optional()
    reasons: dict | None = optional()  # self-verification: why the faces fell back to it


@dataclass
class Dodging(ProtocolStats):
    """Dodging over both protocols, each protocol alone (``by_protocol``) and the clean ``before``."""

    protocol: dict | None = optional()
    by_protocol: dict[str, ProtocolStats] | None = optional(parse=mapping_of(ProtocolStats.from_json))
    before: Before | None = optional(parse=Before.from_json)


@dataclass
class Impersonation(Rates):
    """Impersonation rates, the targets left out (``excluded``) and the clean ``before``."""

    excluded: dict | None = optional()
    before: Before = field(default_factory=Before, metadata={"parse": Before.from_json})


@dataclass
class Identification(Section):
    """Rank-1 / rank-5 identification rates before and after, over ``n`` gallery probes."""

    n: int = 0
    rank1_before: float | None = None
    rank1_after: float | None = None
    rank5_before: float | None = None
    rank5_after: float | None = None
    gallery_images: int | None = optional()
    gallery_identities: int | None = optional()


@dataclass
class RocCurve(Section):
    auc: float | None = None
    fpr: list = field(default_factory=list)
    tpr: list = field(default_factory=list)


@dataclass
class Roc(Section):
    """ROC before / after protection over the same genuine (other-photo) comparisons."""

    n_impostor: int | None = optional()
    n_genuine: int | None = optional()
    genuine_protocol: str | None = optional()
    self_left_out: int | None = optional()
    before: RocCurve | None = optional(parse=RocCurve.from_json)
    after: RocCurve | None = optional(parse=RocCurve.from_json)


@dataclass
class ModelResult(Section):
    """One recognition model: dodging, impersonation, identification, ROC, mixed precision."""

    dodging: Dodging = field(default_factory=Dodging, metadata={"parse": Dodging.from_json})
    impersonation: Impersonation | None = optional(parse=Impersonation.from_json)
    identification: Identification | None = optional(parse=Identification.from_json)
    roc: Roc | None = optional(parse=Roc.from_json)
    amp: str | None = None


# ------------------------------------------------------------------------------ quality, utility
@dataclass
class QualitySummary(Section):
    """PSNR (mean over non-identical pairs; ``n_identical`` left out), SSIM, LPIPS, FID, notes."""

    psnr: float | str | None = None
    n_identical: int | None = optional()
    ssim: float | None = None
    lpips: float | None = None
    fid: float | str | None = None
    n: int | None = optional()
    psnr_note: str | None = optional()
    fid_note: str | None = optional()
    lpips_model: str | None = optional()
    unavailable: dict | None = optional()
    left_out: dict | None = optional()


@dataclass
class UtilitySummary(Section):
    """Face still detected (with ``--aligned``: by a detector on padded crops) and expression kept."""

    face_detected_rate: float | None = None
    face_detection: str | None = optional()
    faces_judged: int | None = optional()
    faces_left_out: int | None = optional()
    expression_kept_rate: float | None = None
    expression_tv_mean: float | None = None
    n_faces: int = 0
    model: str | None = None
    unavailable: dict | None = optional()


@dataclass
class FaceCounts(Section):
    """Faces of the originals, how many were found again in the protected photos, and the
    protected photos in which no face at all was found (report.json ``faces``)."""

    original: int = 0
    matched: int = 0
    not_detected: int = 0
    images_no_face_after: int = 0

    def add(self, n_original: int, n_matched: int, n_protected: int) -> None:
        self.original += n_original
        self.matched += n_matched
        self.not_detected += n_original - n_matched
        self.images_no_face_after += int(n_protected == 0)


@dataclass
class Counts(Section):
    pairs: int = 0
    evaluated: int = 0
    identities_known: int = 0
    reference_photos: int = 0
    targets: int = 0
    gallery_images: int = 0


# ------------------------------------------------------------------------------ online APIs
@dataclass
class ApiProtocolStats(Section):
    """One provider's PSR at each of its threshold keys, for dodging or impersonation."""

    n: int = 0
    psr: dict = field(default_factory=dict)
    mean_score: float | None = None
    no_face_protected: int = 0
    no_face_other: int | None = optional()
    errors: int = 0
    cached: int | None = optional()
    thresholds_seen: dict | None = optional()
    protocol: dict | None = optional()


@dataclass
class ApiResult(Section):
    """One online provider: its settings, request counters (``stats``: the adapter's own, written
    beside ``calls``), ``status`` (ok | some-errors | failed | stopped) and PSR per protocol."""

    provider: dict | None = optional()
    calls: int = 0
    stats: dict = field(default_factory=dict)
    status: str | None = optional()
    stopped: str | None = None
    first_error: str | None = None
    pairs: int | None = optional()
    failed_pairs: int | None = optional()
    dodging: ApiProtocolStats | None = optional(parse=ApiProtocolStats.from_json)
    impersonation: ApiProtocolStats | None = optional(parse=ApiProtocolStats.from_json)

    def to_json(self) -> dict:
        out = super().to_json()
        stats = _plain(out.pop("stats"))
        keys = list(out)
        at = keys.index("calls") + 1
        return {k: out[k] for k in keys[:at]} | stats | {k: out[k] for k in keys[at:]}

    @classmethod
    def from_json(cls, d: Mapping | None) -> ApiResult:
        known = {f.name for f in dataclasses.fields(cls)} - {"stats", "extra"}
        d = d or {}
        result = super().from_json({k: v for k, v in d.items() if k in known})
        result.stats = {k: v for k, v in d.items() if k not in known}
        return result

    def counter(self, name: str) -> int:
        return self.stats.get(name, 0)


# ------------------------------------------------------------------------------ per image
@dataclass
class ImageModelRow(Section):
    """One model on one image: every face (dicts: protocol, scores, ranks), the highest dodging
    similarity and whether the image is protected at each FAR (None: no threshold)."""

    faces: list = field(default_factory=list)
    dodging_max: float | None = None
    protected_at: dict = field(default_factory=dict)


@dataclass
class ImageRow(Section):
    """One audited image (``error``: why it could not be audited)."""

    protected: str = ""
    original: str | None = None
    identity: str | None = None
    identity_source: str | None = None
    error: str | None = None
    models: dict[str, ImageModelRow] = field(default_factory=dict,
                                             metadata={"parse": mapping_of(ImageModelRow.from_json)})
    resized: str | None = optional()
    faces_original: int | None = optional()
    faces_protected: int | None = optional()
    faces_matched: int | None = optional()
    faces_not_detected: int | None = optional()
    references: list | None = optional()
    references_total: int | None = optional()
    impersonation_excluded: list | None = optional()
    utility: dict | None = optional()
    quality: dict | None = optional()
    apis: dict | None = optional()  # provider -> its comparisons (kind, reference, score, error, ...)


# ------------------------------------------------------------------------------ versions
@dataclass
class Versions(Section):
    """What produced the numbers: facepriv, torch, python, the models, detector and quality networks."""

    facepriv: str | None = None
    torch: str | None = None
    python: str | None = None
    detector: str | None = None
    models: dict = field(default_factory=dict)
    detector_model: dict | None = optional()
    expression_model: dict | None = optional()
    quality: dict | None = optional()


# ------------------------------------------------------------------------------ the report
@dataclass
class AuditReport(Section):
    """report.json: the settings (``config``, as :meth:`AuditConfig.to_json` wrote them), the
    versions, thresholds and results per model, quality, face counts, notes, one row per image,
    every score (for the histograms), errors, utility and online APIs where run, timings, the
    calibrations used and the files written (``outputs``)."""

    facepriv_report: str = REPORT_KIND
    version: int = REPORT_VERSION
    created: str = ""
    config: dict = field(default_factory=dict)
    versions: Versions = field(default_factory=Versions, metadata={"parse": Versions.from_json})
    thresholds: dict[str, ThresholdEntry] = field(default_factory=dict,
                                                  metadata={"parse": mapping_of(ThresholdEntry.from_json)})
    models: dict[str, ModelResult] = field(default_factory=dict, metadata={"parse": mapping_of(ModelResult.from_json)})
    quality: QualitySummary = field(default_factory=QualitySummary, metadata={"parse": QualitySummary.from_json})
    faces: FaceCounts = field(default_factory=FaceCounts, metadata={"parse": FaceCounts.from_json})
    counts: Counts = field(default_factory=Counts, metadata={"parse": Counts.from_json})
    protocol_notes: list = field(default_factory=list)
    images: list[ImageRow] = field(default_factory=list,
                                   metadata={"parse": lambda rows: [ImageRow.from_json(r) for r in rows]})
    scores: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    utility: UtilitySummary | None = optional(parse=UtilitySummary.from_json)
    apis: dict[str, ApiResult] | None = optional(parse=mapping_of(ApiResult.from_json))
    timings: dict | None = optional()
    calibration: dict | None = optional()
    outputs: dict | None = optional()

    def redacted(self) -> AuditReport:
        """A copy with every secret masked (:func:`facepriv.core.secrets.redact`)."""
        from ..core.secrets import redact

        return AuditReport.from_json(redact(self.to_json()))


def as_report(report: AuditReport | Mapping) -> AuditReport:
    """``report`` as an :class:`AuditReport` (a dict, e.g. a loaded report.json, is read)."""
    return report if isinstance(report, AuditReport) else AuditReport.from_json(report)
