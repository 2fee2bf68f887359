"""Local stand-ins for the online face-comparison services, following the providers' documented
contracts (no network).

The Face++ mock implements the Compare API v3 contract: multipart form with api_key /
api_secret / image_file1 / image_file2 (or image_base64_1/2); success with ``confidence`` and
per-response ``thresholds`` {"1e-3", "1e-4", "1e-5"}; no face -> no confidence and an empty
``faces1``/``faces2``; 401 AUTHENTICATION_ERROR; 403 CONCURRENCY_LIMIT_EXCEEDED when more
requests are in flight than the key's QPS allows. The Azure mock implements detect (-> faceId)
and verify; the Rekognition fake stands in for boto3's client.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import http.server
import io
import json
import shutil
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
from conftest import fixture_path
from PIL import Image

from facepriv.audit.apis.facepp import FacePlusPlus


KEY = "fpp-KEY-9c1e77d0b2"
SECRET = "fpp-SECRET-4f0a91c3e8"


def random_jpeg(seed: int, fmt: str = "JPEG", size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class HttpServer:
    """ThreadingHTTPServer on 127.0.0.1 in a thread; ``handle(handler, body)`` -> (status, headers, body)."""

    def __init__(self, handle):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                status, headers, payload = handle(self, body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.outer = outer

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class MockFacePP:
    """Face++ /facepp/v3/compare as documented (see the module docstring)."""

    def __init__(self, *, qps: int = 100, delay: float = 0.0):
        self.identity: dict[str, str] = {}  # image digest -> person
        self.no_face: set[str] = set()
        self.fail_first: list[tuple] = []  # forced (status, error_message[, headers]) for the next requests
        self.qps, self.delay = qps, delay
        self.slow_first = 0.0
        self.calls = 0
        self.inflight = 0
        self.max_inflight = 0
        self.forms: list[dict] = []
        self.responses: list[dict] = []
        self.lock = threading.Lock()
        self.http = HttpServer(self._handle)
        self.url = self.http.url + "/facepp/v3/compare"

    def _form(self, handler, body: bytes) -> dict:
        ctype = handler.headers.get("Content-Type", "")
        if ctype.startswith("multipart/form-data"):
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
            out = {}
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True)
                out[name] = payload if part.get_filename() else payload.decode()
            return out
        return {k: v[0] for k, v in urllib.parse.parse_qs(body.decode()).items()}

    def _handle(self, handler, body: bytes):
        with self.lock:
            self.calls += 1
            n = self.calls
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            over = self.inflight > self.qps
            forced = self.fail_first.pop(0) if self.fail_first else None
        try:
            if self.delay:
                time.sleep(self.delay)
            if n == 1 and self.slow_first:
                time.sleep(self.slow_first)
            form = self._form(handler, body)
            with self.lock:
                self.forms.append({k: (v if isinstance(v, str) else f"<{len(v)} bytes>") for k, v in form.items()})
            rid = f"{int(time.time())},req-{n}"
            if forced is not None:  # (status, error_message[, headers])
                headers = forced[2] if len(forced) > 2 else {}
                return forced[0], headers, {"time_used": 1, "error_message": forced[1], "request_id": rid}
            if form.get("api_key") != KEY or form.get("api_secret") != SECRET:
                return 401, {}, {"time_used": 1, "error_message": "AUTHENTICATION_ERROR", "request_id": rid}
            if over:
                return 403, {}, {"time_used": 1, "error_message": "CONCURRENCY_LIMIT_EXCEEDED", "request_id": rid}
            imgs = []
            for i in (1, 2):
                if f"image_file{i}" in form:
                    imgs.append(form[f"image_file{i}"])
                elif f"image_base64_{i}" in form:
                    imgs.append(base64.b64decode(form[f"image_base64_{i}"]))
                else:
                    return 400, {}, {"time_used": 1, "error_message": f"MISSING_ARGUMENTS: image_file{i}",
                                     "request_id": rid}
            d1, d2 = digest(imgs[0]), digest(imgs[1])
            faces1 = [] if d1 in self.no_face else [{"face_token": "t1", "face_rectangle": {}}]
            faces2 = [] if d2 in self.no_face else [{"face_token": "t2", "face_rectangle": {}}]
            resp = {"time_used": 12, "request_id": rid, "faces1": faces1, "faces2": faces2,
                    "image_id1": d1[:8], "image_id2": d2[:8]}
            if faces1 and faces2:
                same = self.identity.get(d1) is not None and self.identity.get(d1) == self.identity.get(d2)
                resp["confidence"] = 91.5 if same else 22.25
                # thresholds are not static: they change with every response
                resp["thresholds"] = {"1e-3": 62.0 + n / 10, "1e-4": 69.0 + n / 10, "1e-5": 74.0 + n / 10}
            with self.lock:
                self.responses.append(resp)
            return 200, {}, resp
        finally:
            with self.lock:
                self.inflight -= 1

    def close(self):
        self.http.close()


def facepp_client(server, tmp_path, **kw):
    sleeps: list[float] = []
    opts = dict(endpoint=server.url, cache=tmp_path / "cache", backoff=0.01, backoff_max=0.05, rate=None,
                sleep=lambda s: sleeps.append(s), timeout=5)
    opts.update(kw)
    api = FacePlusPlus(opts.pop("key", KEY), opts.pop("secret", SECRET), **opts)
    return api, sleeps


def register_identities(server, images):
    for name, p in images.items():
        d = digest(p.read_bytes())
        if name.startswith("alice"):
            server.identity[d] = "alice"
        elif name == "empty":
            server.no_face.add(d)
        else:
            server.identity[d] = name


class MockAzure:
    """Azure Face detect (-> faceId) + verify, key in Ocp-Apim-Subscription-Key."""

    key = "az-KEY-0f1e2d3c4b"

    def __init__(self):
        self.calls = []
        self.fail_next: list[int] = []
        self.faces: dict[str, str] = {}  # faceId -> person
        self.identity: dict[str, str] = {}
        self.no_face: set[str] = set()
        self.http = HttpServer(self._handle)
        self.url = self.http.url

    def _handle(self, handler, body):
        path = urllib.parse.urlparse(handler.path)
        self.calls.append(path.path)
        if handler.headers.get("Ocp-Apim-Subscription-Key") != self.key:
            return 401, {}, {"error": {"code": "401", "message": "Access denied due to invalid subscription key."}}
        if self.fail_next:
            return self.fail_next.pop(0), {"Retry-After": "0"}, {"error": {"code": "429", "message": "Rate limit"}}
        if path.path.endswith("/detect"):
            q = urllib.parse.parse_qs(path.query)
            assert q["returnFaceId"] == ["true"] and handler.headers["Content-Type"] == "application/octet-stream"
            d = digest(body)
            if d in self.no_face:
                return 200, {}, []
            fid = f"face-{len(self.faces)}"
            self.faces[fid] = self.identity.get(d, d)
            return 200, {}, [{"faceId": fid, "faceRectangle": {"top": 1, "left": 1, "width": 50, "height": 50}}]
        if path.path.endswith("/verify"):
            req = json.loads(body)
            if req["faceId1"] not in self.faces or req["faceId2"] not in self.faces:  # expired (24 h) or unknown
                return 400, {}, {"error": {"code": "BadArgument", "message": "Face ID is invalid."}}
            same = self.faces[req["faceId1"]] == self.faces[req["faceId2"]]
            return 200, {}, {"isIdentical": same, "confidence": 0.87 if same else 0.11}
        return 404, {}, {"error": {"code": "NotFound", "message": "no such API"}}

    def close(self):
        self.http.close()


class ClientError(Exception):
    def __init__(self, code, status=400, message=None):
        super().__init__(code)
        self.response = {"Error": {"Code": code, "Message": message or code},
                         "ResponseMetadata": {"HTTPStatusCode": status}}


class FakeRekognition:
    """Stands in for boto3.client('rekognition'): compare_faces and detect_faces with the documented
    response shapes. A source image without a face gets InvalidParameterException with AWS's generic
    message (the one users report for CompareFaces), which does not say that no face was found."""

    def __init__(self, images):
        self.calls = 0
        self.detects = 0
        self.errors: list[Exception] = []
        self.digests = {digest(p.read_bytes()): n for n, p in images.items()}

    def detect_faces(self, Image):  # noqa: N803 - boto3's names
        self.calls += 1
        self.detects += 1
        name = self.digests.get(digest(Image["Bytes"]))
        return {"FaceDetails": [] if name == "empty" else [{"Confidence": 99.9, "BoundingBox": {}}]}

    def compare_faces(self, SourceImage, TargetImage, SimilarityThreshold):  # noqa: N803 - boto3's names
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        a = self.digests.get(digest(SourceImage["Bytes"]))
        b = self.digests.get(digest(TargetImage["Bytes"]))
        if a == "empty":
            raise ClientError("InvalidParameterException", message="Request has invalid parameters")
        if b == "empty":
            return {"FaceMatches": [], "UnmatchedFaces": [], "SourceImageFace": {"Confidence": 99.9}}
        same = a[:5] == b[:5]
        if same:
            return {"FaceMatches": [{"Similarity": 99.2, "Face": {}}], "UnmatchedFaces": [],
                    "SourceImageFace": {"Confidence": 99.9}}
        return {"FaceMatches": [{"Similarity": 3.5, "Face": {}}], "UnmatchedFaces": [],
                "SourceImageFace": {"Confidence": 99.9}}


def photo_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """obama and biden fixtures as originals; re-saved copies (other bytes, same faces) as protected."""
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    orig.mkdir()
    prot.mkdir()
    for n in ("obama.jpg", "biden.jpg"):
        shutil.copy(fixture_path(n), orig / n)
        Image.open(orig / n).save(prot / n, quality=97)
    return orig, prot
