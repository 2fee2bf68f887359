"""The audit's configuration (:class:`AuditConfig`) and the names of its fixed models."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import ConfigError
from ..core.secrets import redact

EXPRESSION_MODEL = "expr-fer7"  # --utility: the expression model whose reading must survive the protection


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
