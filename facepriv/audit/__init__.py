"""``facepriv audit``: how well do protected photos resist face recognition, and at what cost?

    >>> from facepriv.audit import AuditConfig, run_audit
    >>> report = run_audit(AuditConfig(protected="protected/", original="photos/",
    ...                                models=["dlib-resnet", "sface"], gallery="gallery/", out="report/"))
    >>> report["models"]["sface"]["dodging"]["psr"]["1e-3"]

* verification / dodging, impersonation and identification per recognition model, with
  thresholds at FAR 1e-1 / 1e-2 / 1e-3 (:mod:`~facepriv.models.thresholds`; calibrate your own
  with :func:`run_calibration`);
* image quality (PSNR, SSIM, LPIPS, FID) and optional utility (expression kept, face still
  detected);
* online services (Face++, AWS Rekognition, Azure Face) through :mod:`facepriv.audit.apis`;
* report.json / report.csv / self-contained report.html (:mod:`~facepriv.audit.report`), all
  read from one typed report, :class:`~facepriv.audit.schema.AuditReport` (``AuditReport.from_json``
  reads a report.json back).

The audit judges protections; it never imports the packages that make them (protect, patch,
deid, attacks).
"""

from .calibrate import CalibrationConfig, run_calibration
from .embed import FaceEmbeddingCache, ImageFaces
from .report import summarize, write_reports
from .runner import AuditConfig, run_audit
from .schema import AuditReport
from ..models.thresholds import FARS, ThresholdSet, calibrate_scores, resolve_thresholds

__all__ = ["FARS", "AuditConfig", "AuditReport", "CalibrationConfig", "FaceEmbeddingCache", "ImageFaces", "ThresholdSet",
           "calibrate_scores", "resolve_thresholds", "run_audit", "run_calibration", "summarize", "write_reports"]
