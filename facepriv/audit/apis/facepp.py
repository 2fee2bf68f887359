"""Face++ (Megvii) Compare API v3.

Contract (https://console.faceplusplus.com/documents/5679308): ``POST`` multipart form to
``https://api-us.faceplusplus.com/facepp/v3/compare`` with ``api_key``, ``api_secret`` and
``image_file1`` / ``image_file2`` (binary) or ``image_base64_1`` / ``image_base64_2``. A
success carries ``confidence`` (0-100) and ``thresholds`` ``{"1e-3", "1e-4", "1e-5"}`` (the
confidence needed at those false-accept rates; they are not static, so they are read from
*every* response). When no face is found in an image, ``confidence`` and ``thresholds`` are
missing and ``faces1``/``faces2`` is ``[]``. Errors carry ``error_message``:
401 ``AUTHENTICATION_ERROR``, 403 ``AUTHORIZATION_ERROR:<reason>``, 403
``CONCURRENCY_LIMIT_EXCEEDED`` (QPS limit: retried with backoff), 400 ``INVALID_IMAGE_SIZE`` /
``IMAGE_ERROR_UNSUPPORTED_FORMAT`` / ``IMAGE_FILE_TOO_LARGE`` / ..., 413 (plain text),
500 ``INTERNAL_ERROR`` (retried).

Keys: ``FACEPP_API_KEY`` / ``FACEPP_API_SECRET`` or the ``[facepp]`` section of the API config
file (``api_key``, ``api_secret``, optional ``endpoint``); ``FACEPP_ENDPOINT`` or
``--api-endpoint`` point it elsewhere (the China region, a mock server).
"""

from __future__ import annotations

import base64
import threading

from ...core.errors import ConfigError
from ...core.secrets import register_secret
from .base import APIError, CompareResult, FaceAPI, ImageLimits, register_provider

DEFAULT_ENDPOINT = "https://api-us.faceplusplus.com/facepp/v3/compare"
AUTH_ERRORS = ("AUTHENTICATION_ERROR", "AUTHORIZATION_ERROR")
RETRY_ERRORS = ("CONCURRENCY_LIMIT_EXCEEDED", "INTERNAL_ERROR")
NO_FACE_ERRORS = ("NO_FACE_FOUND", "INVALID_IMAGE_FACE", "NO_FACE")


def _retry_after(resp) -> float | None:
    v = resp.headers.get("Retry-After")
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


@register_provider("facepp", env=("FACEPP_API_KEY", "FACEPP_API_SECRET", "FACEPP_ENDPOINT"),
                   config_keys=("api_key", "api_secret", "endpoint", "upload"), aliases=("face++", "faceplusplus"))
class FacePlusPlus(FaceAPI):
    name = "facepp"
    score_range = "confidence 0-100; thresholds per response at FAR 1e-3 / 1e-4 / 1e-5"
    limits = ImageLimits(max_bytes=2 * 1024 * 1024, max_side=4096, min_side=48)

    def __init__(self, api_key: str, api_secret: str, *, endpoint: str | None = None, upload: str = "file", **kw):
        if not api_key or not api_secret:
            raise ConfigError("Face++ needs an API key and secret: set FACEPP_API_KEY and FACEPP_API_SECRET "
                              "or put api_key / api_secret in the [facepp] section of the API config file")
        if upload not in ("file", "base64"):
            raise ConfigError("upload must be 'file' (image_file1/2) or 'base64' (image_base64_1/2)")
        register_secret(api_key)
        register_secret(api_secret)
        super().__init__(endpoint=endpoint or DEFAULT_ENDPOINT, **kw)
        self._key, self._secret = api_key, api_secret
        self.upload = upload
        self._local = threading.local()

    def _session(self):
        import requests

        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def _post(self, img_a: bytes, img_b: bytes):
        import requests

        data = {"api_key": self._key, "api_secret": self._secret}
        files = None
        if self.upload == "file":
            files = {"image_file1": ("image1.jpg", img_a, "application/octet-stream"),
                     "image_file2": ("image2.jpg", img_b, "application/octet-stream")}
        else:
            data["image_base64_1"] = base64.b64encode(img_a).decode()
            data["image_base64_2"] = base64.b64encode(img_b).decode()
        try:
            resp = self._session().post(self.endpoint, data=data, files=files, timeout=self.timeout)
        except requests.Timeout:
            raise APIError(f"Face++: no answer within {self.timeout:g} s", code="TIMEOUT", retryable=True) from None
        except requests.RequestException as exc:
            raise APIError(f"Face++: request failed ({type(exc).__name__})", code="NETWORK", retryable=True) from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code == 200 and isinstance(body, dict) and "error_message" not in body:
            return body
        msg = (body or {}).get("error_message") if isinstance(body, dict) else None
        msg = msg or (resp.text or "").strip()[:200] or resp.reason or "no message"
        code = msg.split(":", 1)[0].strip()
        status = resp.status_code
        if code in AUTH_ERRORS or status == 401:
            raise APIError(f"Face++ rejected the credentials (HTTP {status} {msg}); check FACEPP_API_KEY / "
                           "FACEPP_API_SECRET", status=status, code=code, fatal=True)
        if code in NO_FACE_ERRORS:
            param = msg.split(":", 1)[1].strip() if ":" in msg else ""
            which = 1 if param.endswith("1") else 2 if param.endswith("2") else None
            raise APIError(f"Face++: no face found ({msg})", status=status, code="NO_FACE_FOUND", no_face=True,
                           no_face_in=which)
        if code in RETRY_ERRORS or status in (403, 429) or status >= 500:
            raise APIError(f"Face++ HTTP {status} {msg}", status=status, code=code, retryable=True,
                           retry_after=_retry_after(resp))
        raise APIError(f"Face++ HTTP {status} {msg}", status=status, code=code)

    @classmethod
    def from_config(cls, section: dict, *, endpoint: str | None = None, threshold: float | None = None,
                    **kw) -> FacePlusPlus:
        """Keys from FACEPP_API_KEY / FACEPP_API_SECRET, else the ``[facepp]`` section."""
        if threshold is not None:
            raise ConfigError("Face++ sends its own FAR thresholds (1e-3/1e-4/1e-5) with every response; "
                              "--api-threshold applies to rekognition and azure only")
        import os

        from .base import credential

        key = credential(section, "FACEPP_API_KEY", "api_key", "key")
        secret = credential(section, "FACEPP_API_SECRET", "api_secret", "secret")
        endpoint = endpoint or os.environ.get("FACEPP_ENDPOINT") or section.get("endpoint")
        return cls(key or "", secret or "", endpoint=endpoint, upload=section.get("upload", "file"), **kw)

    def _compare(self, img_a: bytes, img_b: bytes) -> CompareResult:
        body = self.call(lambda: self._post(img_a, img_b))
        raw = {k: body.get(k) for k in ("request_id", "time_used", "confidence", "thresholds", "image_id1",
                                        "image_id2") if k in body}
        raw["faces1"] = len(body.get("faces1") or [])
        raw["faces2"] = len(body.get("faces2") or [])
        if "confidence" not in body:
            which = [n for n, k in ((1, "faces1"), (2, "faces2")) if k in body and not body[k]]
            where = " and ".join(f"image {n}" for n in which) or "an image"
            return CompareResult(raw=raw, error=f"Face++: no face detected in {where}", code="NO_FACE_FOUND",
                                 no_face=True, no_face_in=which[0] if len(which) == 1 else None)
        thresholds = {str(k): float(v) for k, v in (body.get("thresholds") or {}).items()}
        return CompareResult(score=float(body["confidence"]), thresholds=thresholds, raw=raw)


from_config = FacePlusPlus.from_config
