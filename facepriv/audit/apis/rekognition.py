"""AWS Rekognition CompareFaces (boto3, the optional ``aws`` extra: ``pip install facepriv[aws]``).

``client.compare_faces(SourceImage={"Bytes": a}, TargetImage={"Bytes": b},
SimilarityThreshold=0)`` compares the largest face of the source with every face of the
target; the score is the highest ``Similarity`` (0-100) among ``FaceMatches`` (0 when the
target's faces are all ``UnmatchedFaces``). Rekognition's documented default decision
threshold is 80 (``--api-threshold rekognition=VALUE`` or ``similarity_threshold`` in the
config changes it).
``InvalidParameterException`` means no face in an image; ``ThrottlingException``,
``ProvisionedThroughputExceededException``, ``InternalServerError`` and
``ServiceUnavailableException`` are retried with backoff; bad or expired credentials stop
the adapter.

Credentials follow boto3's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, instance roles) or the ``[rekognition]`` section of the
API config file (``aws_access_key_id``, ``aws_secret_access_key``, ``region``); the region comes
from ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` or the config; ``--api-endpoint`` sets
``endpoint_url``.
"""

from __future__ import annotations

import os

from ...core.errors import ConfigError
from ..secrets import register_secret
from .base import APIError, CompareResult, FaceAPI, ImageLimits

DEFAULT_THRESHOLD = 80.0
RETRY_CODES = ("ThrottlingException", "ProvisionedThroughputExceededException", "InternalServerError",
               "ServiceUnavailableException", "LimitExceededException", "RequestTimeout")
AUTH_CODES = ("UnrecognizedClientException", "InvalidSignatureException", "AccessDeniedException",
              "ExpiredTokenException", "AccessDeniedException", "InvalidClientTokenId")
NO_FACE_CODES = ("InvalidParameterException",)


class Rekognition(FaceAPI):
    name = "rekognition"
    score_range = "similarity 0-100; default decision threshold 80"
    limits = ImageLimits(max_bytes=5 * 1024 * 1024, max_side=4096, min_side=80)

    def __init__(self, *, client=None, region: str | None = None, similarity_threshold: float = DEFAULT_THRESHOLD,
                 endpoint: str | None = None, credentials: dict | None = None, **kw):
        super().__init__(endpoint=endpoint, **kw)
        self.region = region
        self.threshold = float(similarity_threshold)
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            register_secret(os.environ.get(var))
        for v in (credentials or {}).values():
            register_secret(v)
        if client is None:
            try:
                import boto3
            except ImportError:
                raise ConfigError("AWS Rekognition needs boto3: pip install 'facepriv[aws]' (or pip install boto3)") from None
            from botocore.config import Config

            client = boto3.client("rekognition", region_name=region, endpoint_url=endpoint,
                                  config=Config(connect_timeout=self.timeout, read_timeout=self.timeout,
                                                retries={"max_attempts": 1}), **(credentials or {}))
        self.client = client

    def cache_identity(self) -> str:
        return f"{super().cache_identity()}|{self.region or ''}"

    def _call(self, a: bytes, b: bytes) -> dict:
        try:
            return self.client.compare_faces(SourceImage={"Bytes": a}, TargetImage={"Bytes": b},
                                             SimilarityThreshold=0.0)
        except Exception as exc:  # noqa: BLE001 - botocore errors are classified by their code
            resp = getattr(exc, "response", None) or {}
            code = (resp.get("Error") or {}).get("Code") or type(exc).__name__
            msg = (resp.get("Error") or {}).get("Message") or ""
            status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in AUTH_CODES:
                raise APIError(f"Rekognition refused the credentials ({code}); check the AWS credentials",
                               status=status, code=code, fatal=True) from None
            if code in NO_FACE_CODES:
                # CompareFaces answers InvalidParameterException when the *source* image has no face
                raise APIError(f"Rekognition: no face found in image 1 ({code}: {msg})", status=status,
                               code="NO_FACE_FOUND", no_face=True, no_face_in=1) from None
            if code in RETRY_CODES or (status or 0) >= 500 or type(exc).__name__ in (
                    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"):
                raise APIError(f"Rekognition {code}: {msg}", status=status, code=code, retryable=True) from None
            raise APIError(f"Rekognition {code}: {msg}", status=status, code=code) from None

    def _compare(self, img_a: bytes, img_b: bytes) -> CompareResult:
        body = self.call(lambda: self._call(img_a, img_b))
        matches = body.get("FaceMatches") or []
        unmatched = body.get("UnmatchedFaces") or []
        raw = {"matches": [round(float(m.get("Similarity", 0.0)), 4) for m in matches],
               "unmatched": len(unmatched),
               "source_confidence": (body.get("SourceImageFace") or {}).get("Confidence")}
        if not matches and not unmatched:
            return CompareResult(raw=raw, error="Rekognition: no face detected in image 2", code="NO_FACE_FOUND",
                                 no_face=True, no_face_in=2)
        score = max((float(m.get("Similarity", 0.0)) for m in matches), default=0.0)
        return CompareResult(score=score, thresholds={"default": self.threshold}, raw=raw)


def from_config(section: dict, *, endpoint: str | None = None, threshold: float | None = None, **kw) -> Rekognition:
    creds = {k: section[k] for k in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
             if section.get(k)}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or section.get("region")
    return Rekognition(region=region, endpoint=endpoint or section.get("endpoint"), credentials=creds or None,
                       similarity_threshold=float(threshold if threshold is not None
                                                  else section.get("similarity_threshold", DEFAULT_THRESHOLD)), **kw)
