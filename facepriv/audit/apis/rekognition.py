"""AWS Rekognition CompareFaces (boto3, the optional ``aws`` extra: ``pip install facepriv[aws]``).

``client.compare_faces(SourceImage={"Bytes": a}, TargetImage={"Bytes": b},
SimilarityThreshold=0)`` compares the largest face of the source with every face of the
target; the score is the highest ``Similarity`` (0-100) among ``FaceMatches`` (0 when the
target's faces are all ``UnmatchedFaces``). Rekognition's documented default decision
threshold is 80 (``--api-threshold rekognition=VALUE`` or ``similarity_threshold`` in the
config changes it).
A target image without any face answers with empty ``FaceMatches`` and ``UnmatchedFaces`` (no
face in image 2). CompareFaces answers ``InvalidParameterException`` when it finds no face in
the source image, but AWS uses that exception for other invalid input too, and its message is
often the generic "Request has invalid parameters". So the adapter asks ``DetectFaces`` (at most
one call per image, only after such an answer) which image has no face: an image with zero
``FaceDetails`` is the one without a face (image 1 first; this needs the
``rekognition:DetectFaces`` permission, and is skipped once refused). When both have a face, or
DetectFaces cannot tell, the answer is recorded as an error, not as a missing face; only a message that
itself says no face was found ("There are no faces in the image...") counts as "no face" then,
in an unknown image (``no_face_in`` None, so it never counts as a protected photo).
``ThrottlingException``, ``ProvisionedThroughputExceededException``, ``InternalServerError``
and ``ServiceUnavailableException`` are retried with backoff; bad or expired credentials stop
the adapter.

Credentials follow boto3's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, instance roles) or the ``[rekognition]`` section of the
API config file (``aws_access_key_id``, ``aws_secret_access_key``, ``region``); the region comes
from ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` or the config; ``--api-endpoint`` sets
``endpoint_url``.
"""

from __future__ import annotations

import os
import re

from ...core.errors import ConfigError
from ...core.secrets import redact_text, register_secret
from .base import APIError, CompareResult, FaceAPI, ImageLimits, register_provider

DEFAULT_THRESHOLD = 80.0
RETRY_CODES = ("ThrottlingException", "ProvisionedThroughputExceededException", "InternalServerError",
               "ServiceUnavailableException", "LimitExceededException", "RequestTimeout")
AUTH_CODES = ("UnrecognizedClientException", "InvalidSignatureException", "AccessDeniedException",
              "ExpiredTokenException", "AccessDeniedException", "InvalidClientTokenId")
INVALID_CODE = "InvalidParameterException"  # no face in the source image, or other invalid input
_NO_FACE_MESSAGE = re.compile(r"\bno faces?\b|\bfaces? (?:was |were )?not (?:found|detected)\b|\bzero faces\b",
                              re.IGNORECASE)


def says_no_face(message: str | None) -> bool:
    """Does an InvalidParameterException's message itself say that no face was found?"""
    return bool(message) and bool(_NO_FACE_MESSAGE.search(message))


@register_provider("rekognition", env=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                                       "AWS_DEFAULT_REGION"),
                   config_keys=("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "region",
                                "endpoint", "similarity_threshold"), extra="boto3", aliases=("aws",))
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
        self._probe = True  # DetectFaces checks after InvalidParameterException (off once refused)

    def cache_identity(self) -> str:
        return f"{super().cache_identity()}|{self.region or ''}"

    def _request(self, op: str, fn, *, probe: bool = False) -> dict:
        """One request; botocore errors become :class:`APIError` (retryable, fatal, or plain).

        ``probe``: a DetectFaces check; a refusal (e.g. no rekognition:DetectFaces permission)
        only turns the checks off instead of stopping the adapter."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - botocore errors are classified by their code
            resp = getattr(exc, "response", None) or {}
            code = (resp.get("Error") or {}).get("Code") or type(exc).__name__
            msg = (resp.get("Error") or {}).get("Message") or ""
            status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in AUTH_CODES and probe:
                self._probe = False
                raise APIError(f"Rekognition {op} refused ({code})", status=status, code=code) from None
            if code in AUTH_CODES:
                raise APIError(f"Rekognition refused the credentials ({code}); check the AWS credentials",
                               status=status, code=code, fatal=True) from None
            retry = code in RETRY_CODES or (status or 0) >= 500 or type(exc).__name__ in (
                "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError")
            err = APIError(f"Rekognition {op} {code}: {msg}", status=status, code=code, retryable=retry)
            err.detail = redact_text(msg)
            raise err from None

    def _call(self, a: bytes, b: bytes) -> dict:
        return self._request("CompareFaces", lambda: self.client.compare_faces(
            SourceImage={"Bytes": a}, TargetImage={"Bytes": b}, SimilarityThreshold=0.0))

    def _faces_in(self, img: bytes) -> int | None:
        """How many faces DetectFaces finds in ``img`` (None: it could not tell)."""
        detect = getattr(self.client, "detect_faces", None)
        if detect is None or not self._probe:
            return None
        try:
            body = self.call(lambda: self._request("DetectFaces", lambda: detect(Image={"Bytes": img}), probe=True))
        except APIError:
            return None
        details = body.get("FaceDetails") if isinstance(body, dict) else None
        return len(details) if isinstance(details, list) else None

    def _invalid(self, exc: APIError, img_a: bytes, img_b: bytes) -> APIError:
        """What an InvalidParameterException from CompareFaces means: no face in image 1 or 2, or
        another invalid input (see the module docstring)."""
        detail = getattr(exc, "detail", "") or ""
        counts = []
        for n, img in ((1, img_a), (2, img_b)):
            counts.append(self._faces_in(img))
            if counts[-1] == 0:
                return APIError(f"Rekognition: no face found in image {n} (CompareFaces {INVALID_CODE}: {detail}; "
                                f"DetectFaces finds no face in image {n})", status=exc.status, code="NO_FACE_FOUND",
                                no_face=True, no_face_in=n)
        checked = ("DetectFaces finds a face in both images" if None not in counts
                   else "DetectFaces could not check which image has no face")
        if says_no_face(detail):
            return APIError(f"Rekognition: no face found (CompareFaces {INVALID_CODE}: {detail}; {checked}, so which "
                            "image is unknown)", status=exc.status, code="NO_FACE_FOUND", no_face=True, no_face_in=None)
        return APIError(f"Rekognition CompareFaces {INVALID_CODE}: {detail or 'invalid request'} (recorded as an "
                        f"error, not as a missing face: {checked})", status=exc.status, code=INVALID_CODE)

    def _compare(self, img_a: bytes, img_b: bytes) -> CompareResult:
        try:
            body = self.call(lambda: self._call(img_a, img_b))
        except APIError as exc:
            if exc.code != INVALID_CODE:
                raise
            raise self._invalid(exc, img_a, img_b) from None
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

    @classmethod
    def from_config(cls, section: dict, *, endpoint: str | None = None, threshold: float | None = None,
                    **kw) -> Rekognition:
        """Credentials from the ``[rekognition]`` section, else boto3's own chain (AWS_* variables, ...)."""
        creds = {k: section[k] for k in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
                 if section.get(k)}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or section.get("region")
        return cls(region=region, endpoint=endpoint or section.get("endpoint"), credentials=creds or None,
                   similarity_threshold=float(threshold if threshold is not None
                                              else section.get("similarity_threshold", DEFAULT_THRESHOLD)), **kw)


from_config = Rekognition.from_config
