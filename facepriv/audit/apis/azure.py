"""Azure AI Face: detect (-> faceId) then verify.

``POST {endpoint}/face/v1.0/detect?returnFaceId=true&recognitionModel=recognition_04&
detectionModel=detection_03`` with the image as ``application/octet-stream`` returns a list
of faces with ``faceId`` (``[]`` = no face); ``POST {endpoint}/face/v1.0/verify`` with
``{"faceId1", "faceId2"}`` returns ``{"isIdentical", "confidence"}`` (0-1; ``isIdentical`` is
``confidence >= 0.5``). The key goes in the ``Ocp-Apim-Subscription-Key`` header. Errors are
``{"error": {"code", "message"}}``: 401/403 (bad key, quota, Limited Access not granted) stop
the adapter, 429 and 5xx are retried with backoff (``Retry-After`` honoured).

A faceId names a detected face on Azure's side for 24 hours: the adapter remembers the faceId (or
"no face") of every image it has sent, by the image's sha256, and reuses it for 23 hours, so an
audit that compares one original with many protected images detects each image once (half the
requests of detecting both sides of every pair). A verify that Azure refuses because a remembered
faceId is no longer valid (HTTP 400/404) is redone once with fresh detections.

Keys: ``AZURE_FACE_ENDPOINT`` and ``AZURE_FACE_KEY`` (or ``FACE_ENDPOINT`` / ``FACE_APIKEY``, the
names Azure's Face quickstart samples use; the ``AZURE_`` names win when both are set) or the
``[azure]`` section of the API config file (``endpoint``, ``key``; ``threshold`` or ``--api-threshold azure=VALUE`` replaces the
0.5 decision threshold). Face identification / verification is a Limited Access
feature of Azure: the resource must have been approved for it.
"""

from __future__ import annotations

import hashlib
import threading
import time

from ...core.errors import ConfigError
from ...core.secrets import register_secret
from .base import APIError, CompareResult, FaceAPI, ImageLimits, register_provider

API_PATH = "/face/v1.0"
DEFAULT_THRESHOLD = 0.5
# environment variables, first match wins: ours, then those of Azure's Face quickstart samples
KEY_ENV = ("AZURE_FACE_KEY", "FACE_APIKEY")
ENDPOINT_ENV = ("AZURE_FACE_ENDPOINT", "FACE_ENDPOINT")
#: Azure keeps a detected faceId for 24 h (faceIdTimeToLive's default); reuse it for less than that
FACE_ID_REUSE_S = 23 * 3600.0


@register_provider("azure", env=(*ENDPOINT_ENV, *KEY_ENV), config_keys=("endpoint", "key", "threshold"),
                   aliases=("azure-face",))
class AzureFace(FaceAPI):
    name = "azure"
    score_range = "confidence 0-1; isIdentical at 0.5"
    limits = ImageLimits(max_bytes=6 * 1024 * 1024, max_side=4096, min_side=36)

    def __init__(self, endpoint: str, key: str, *, recognition_model: str = "recognition_04",
                 detection_model: str = "detection_03", threshold: float = DEFAULT_THRESHOLD, **kw):
        if not endpoint or not key:
            raise ConfigError("Azure Face needs an endpoint and a key: set AZURE_FACE_ENDPOINT and AZURE_FACE_KEY "
                              "(or FACE_ENDPOINT and FACE_APIKEY) or put endpoint / key in the [azure] section of "
                              "the API config file")
        register_secret(key)
        super().__init__(endpoint=endpoint.rstrip("/"), **kw)
        self._key = key
        self.recognition_model, self.detection_model = recognition_model, detection_model
        self.threshold = float(threshold)
        self._local = threading.local()
        # sha256 of the sent image -> (faceId or None for "no face", monotonic time of the detect)
        self._face_ids: dict[str, tuple[str | None, float]] = {}
        self._ids_lock = threading.Lock()
        self.clock = time.monotonic
        self.stats["face_id_reuses"] = 0

    def cache_identity(self) -> str:
        return f"{super().cache_identity()}|{self.recognition_model}|{self.detection_model}"

    def _session(self):
        import requests

        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def _request(self, path: str, *, params=None, data=None, json_body=None, content_type=None):
        import requests

        headers = {"Ocp-Apim-Subscription-Key": self._key}
        if content_type:
            headers["Content-Type"] = content_type
        url = self.endpoint + API_PATH + path
        try:
            resp = self._session().post(url, params=params, data=data, json=json_body, headers=headers,
                                        timeout=self.timeout)
        except requests.Timeout:
            raise APIError(f"Azure Face: no answer within {self.timeout:g} s", code="TIMEOUT", retryable=True) from None
        except requests.RequestException as exc:
            raise APIError(f"Azure Face: request failed ({type(exc).__name__})", code="NETWORK",
                           retryable=True) from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.ok:
            return body
        err = (body or {}).get("error", {}) if isinstance(body, dict) else {}
        code, msg = err.get("code") or str(resp.status_code), err.get("message") or resp.reason or ""
        status = resp.status_code
        retry_after = resp.headers.get("Retry-After")
        try:
            retry_after = float(retry_after) if retry_after is not None else None
        except ValueError:
            retry_after = None
        if status in (401, 403):
            raise APIError(f"Azure Face refused the request (HTTP {status} {code}: {msg}); check AZURE_FACE_KEY, "
                           "the quota and Limited Access approval", status=status, code=code, fatal=True)
        if status == 429 or status >= 500:
            raise APIError(f"Azure Face HTTP {status} {code}: {msg}", status=status, code=code, retryable=True,
                           retry_after=retry_after)
        raise APIError(f"Azure Face HTTP {status} {code}: {msg}", status=status, code=code)

    def _face_id(self, img: bytes, which: int, *, fresh: bool = False) -> tuple[str, bool]:
        """The faceId of the largest face in ``img`` and whether it was remembered (not detected now)."""
        digest = hashlib.sha256(img).hexdigest()
        with self._ids_lock:
            known = None if fresh else self._face_ids.get(digest)
        if known is not None and self.clock() - known[1] < FACE_ID_REUSE_S:
            with self._lock:
                self.stats["face_id_reuses"] += 1
            face_id, reused = known[0], True
        else:
            params = {"returnFaceId": "true", "recognitionModel": self.recognition_model,
                      "detectionModel": self.detection_model, "returnFaceLandmarks": "false"}
            t = self.clock()
            faces = self.call(lambda: self._request("/detect", params=params, data=img,
                                                    content_type="application/octet-stream"))
            # the largest face, as Face++ and Rekognition use
            face_id = max(faces, key=lambda f: f.get("faceRectangle", {}).get("width", 0)
                          * f.get("faceRectangle", {}).get("height", 0))["faceId"] if faces else None
            with self._ids_lock:
                self._face_ids[digest] = (face_id, t)
            reused = False
        if face_id is None:
            raise APIError(f"Azure Face: no face detected in image {which}", code="NO_FACE_FOUND", no_face=True,
                           no_face_in=which)
        return face_id, reused

    def _compare(self, img_a: bytes, img_b: bytes) -> CompareResult:
        (id1, old1), (id2, old2) = self._face_id(img_a, 1), self._face_id(img_b, 2)
        try:
            body = self.call(lambda: self._request("/verify", json_body={"faceId1": id1, "faceId2": id2}))
        except APIError as exc:
            if not ((old1 or old2) and exc.status in (400, 404)):
                raise
            # a remembered faceId Azure no longer knows (expired, or the resource was reset)
            id1, id2 = self._face_id(img_a, 1, fresh=old1)[0], self._face_id(img_b, 2, fresh=old2)[0]
            body = self.call(lambda: self._request("/verify", json_body={"faceId1": id1, "faceId2": id2}))
        raw = {"isIdentical": body.get("isIdentical"), "confidence": body.get("confidence")}
        return CompareResult(score=float(body["confidence"]), thresholds={"default": self.threshold}, raw=raw)

    @classmethod
    def from_config(cls, section: dict, *, endpoint: str | None = None, threshold: float | None = None,
                    **kw) -> AzureFace:
        """Endpoint and key from the environment (see :data:`ENDPOINT_ENV`, :data:`KEY_ENV`), else ``[azure]``."""
        import os

        from .base import credential

        key_env = next((v for v in KEY_ENV if os.environ.get(v)), KEY_ENV[0])
        key = credential(section, key_env, "key", "api_key", "subscription_key")
        endpoint = (endpoint or next((os.environ[v] for v in ENDPOINT_ENV if os.environ.get(v)), None)
                    or section.get("endpoint"))
        if threshold is None:
            threshold = float(section.get("threshold", DEFAULT_THRESHOLD))
        return cls(endpoint or "", key or "", threshold=float(threshold), **kw)


from_config = AzureFace.from_config
