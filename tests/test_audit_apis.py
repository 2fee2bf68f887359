"""Online API adapters against local mock servers that follow the providers' documented contracts.

The Face++ mock implements the Compare API v3 contract: multipart form with api_key /
api_secret / image_file1 / image_file2 (or image_base64_1/2); success with ``confidence`` and
per-response ``thresholds`` {"1e-3", "1e-4", "1e-5"}; no face -> no confidence and an empty
``faces1``/``faces2``; 401 AUTHENTICATION_ERROR; 403 CONCURRENCY_LIMIT_EXCEEDED when more
requests are in flight than the key's QPS allows.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import http.server
import io
import json
import threading
import time
import urllib.parse

import numpy as np
import torch
import pytest
from PIL import Image

from facepriv.audit.apis import create_api
from facepriv.audit.apis.azure import AzureFace
from facepriv.audit.apis.base import RateLimiter
from facepriv.audit.apis.facepp import FacePlusPlus
from facepriv.audit.apis.rekognition import Rekognition
from facepriv.core.secrets import redact

KEY = "fpp-KEY-9c1e77d0b2"
SECRET = "fpp-SECRET-4f0a91c3e8"


def _image(seed: int, fmt: str = "JPEG", size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def _digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class _Http:
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
        self.http = _Http(self._handle)
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
            d1, d2 = _digest(imgs[0]), _digest(imgs[1])
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


@pytest.fixture
def facepp_server():
    s = MockFacePP()
    yield s
    s.close()


@pytest.fixture
def images(tmp_path):
    files = {}
    for name, seed in (("alice1", 1), ("alice2", 2), ("bob", 3), ("empty", 4), ("carol", 5)):
        p = tmp_path / f"{name}.jpg"
        p.write_bytes(_image(seed))
        files[name] = p
    return files


def _client(server, tmp_path, **kw):
    sleeps: list[float] = []
    opts = dict(endpoint=server.url, cache=tmp_path / "cache", backoff=0.01, backoff_max=0.05, rate=None,
                sleep=lambda s: sleeps.append(s), timeout=5)
    opts.update(kw)
    api = FacePlusPlus(opts.pop("key", KEY), opts.pop("secret", SECRET), **opts)
    return api, sleeps


def _register(server, images):
    for name, p in images.items():
        d = _digest(p.read_bytes())
        if name.startswith("alice"):
            server.identity[d] = "alice"
        elif name == "empty":
            server.no_face.add(d)
        else:
            server.identity[d] = name


def test_facepp_success_reads_thresholds_from_every_response(facepp_server, images, tmp_path):
    _register(facepp_server, images)
    api, _ = _client(facepp_server, tmp_path, cache=False)
    same = api.compare(images["alice1"], images["alice2"])
    diff = api.compare(images["alice1"], images["bob"])
    assert same.ok and same.score == 91.5 and same.error is None
    assert diff.score == 22.25
    # each result carries the thresholds of its own response, which differ between responses
    assert same.thresholds == {k: float(v) for k, v in facepp_server.responses[0]["thresholds"].items()}
    assert diff.thresholds == {k: float(v) for k, v in facepp_server.responses[1]["thresholds"].items()}
    assert same.thresholds != diff.thresholds
    assert same.verified("1e-5") is True and diff.verified("1e-3") is False
    assert same.raw["request_id"] == facepp_server.responses[0]["request_id"]
    # the documented form fields were sent
    form = facepp_server.forms[0]
    assert form["api_key"] == KEY and form["api_secret"] == SECRET
    assert form["image_file1"].startswith("<") and form["image_file2"].startswith("<")
    assert KEY not in json.dumps(same.to_json()) and SECRET not in json.dumps(same.to_json())


def test_facepp_base64_upload(facepp_server, images, tmp_path):
    _register(facepp_server, images)
    api, _ = _client(facepp_server, tmp_path, cache=False, upload="base64")
    res = api.compare(images["alice1"], images["alice2"])
    assert res.score == 91.5
    assert "image_base64_1" in facepp_server.forms[0] and "image_file1" not in facepp_server.forms[0]


def test_facepp_rate_limit_then_retry_with_backoff(facepp_server, images, tmp_path):
    _register(facepp_server, images)
    facepp_server.fail_first = [(403, "CONCURRENCY_LIMIT_EXCEEDED"), (403, "CONCURRENCY_LIMIT_EXCEEDED"),
                                (502, "INTERNAL_ERROR")]
    api, sleeps = _client(facepp_server, tmp_path, cache=False, backoff=0.01, backoff_max=1.0)
    res = api.compare(images["alice1"], images["alice2"])
    assert res.ok and res.score == 91.5
    assert facepp_server.calls == 4 and res.attempts == 4 and api.stats["retries"] == 3
    assert len(sleeps) == 3 and all(s > 0 for s in sleeps)
    # exponential backoff (with jitter in [0.5, 1) x the nominal delay): nominal 0.01, 0.02, 0.04
    assert sleeps[0] < 0.011 and 0.02 <= sleeps[2] / 1.0 < 0.041 and sleeps[2] > sleeps[0]


def test_facepp_gives_up_after_retries(facepp_server, images, tmp_path):
    _register(facepp_server, images)
    facepp_server.fail_first = [(403, "CONCURRENCY_LIMIT_EXCEEDED")] * 10
    api, _ = _client(facepp_server, tmp_path, cache=False, retries=2)
    res = api.compare(images["alice1"], images["alice2"])
    assert not res.ok and "CONCURRENCY_LIMIT_EXCEEDED" in res.error
    assert facepp_server.calls == 3


def test_facepp_bad_key_is_not_retried_and_never_echoed(facepp_server, images, tmp_path):
    _register(facepp_server, images)
    bad_key, bad_secret = "WRONG-key-77aa11", "WRONG-secret-22bb33"
    api, sleeps = _client(facepp_server, tmp_path, key=bad_key, secret=bad_secret)
    res = api.compare(images["alice1"], images["alice2"])
    assert not res.ok and res.code == "AUTHENTICATION_ERROR"
    assert "AUTHENTICATION_ERROR" in res.error and "FACEPP_API_KEY" in res.error
    assert facepp_server.calls == 1 and sleeps == []
    # the adapter stops: the remaining pairs fail at once without calling the server again
    more = api.compare_many([(images["alice1"], images["bob"]), (images["bob"], images["alice2"])])
    assert facepp_server.calls == 1
    assert all(not r.ok and "AUTHENTICATION_ERROR" in r.error for r in more)
    blob = json.dumps([r.to_json() for r in [res, *more]])
    assert bad_key not in blob and bad_secret not in blob
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))  # errors not cached


def test_facepp_missing_face_recorded_per_pair(facepp_server, images, tmp_path):
    _register(facepp_server, images)
    api, _ = _client(facepp_server, tmp_path, cache=False)
    results = api.compare_many([(images["empty"], images["alice1"]), (images["alice1"], images["empty"]),
                                (images["alice1"], images["alice2"])])
    assert results[0].no_face and results[0].no_face_in == 1 and results[0].score is None
    assert results[1].no_face and results[1].no_face_in == 2
    assert "no face" in results[0].error
    assert results[2].ok  # the other pairs are unaffected
    # the 400 NO_FACE_FOUND variant some deployments answer with
    facepp_server.fail_first = [(400, "NO_FACE_FOUND: image_file1")]
    r = api.compare(images["carol"], images["bob"])
    assert r.no_face and r.no_face_in == 1 and facepp_server.calls == 4


def test_facepp_cache_hit_on_rerun(facepp_server, images, tmp_path):
    _register(facepp_server, images)
    pairs = [(images["alice1"], images["alice2"]), (images["alice1"], images["bob"]), (images["empty"], images["bob"])]
    api, _ = _client(facepp_server, tmp_path)
    first = api.compare_many(pairs)
    assert facepp_server.calls == 3 and not any(r.cached for r in first)
    api2, _ = _client(facepp_server, tmp_path)  # a new run, same cache folder
    second = api2.compare_many(pairs)
    assert facepp_server.calls == 3 and api2.calls == 0  # the server was not called again
    assert all(r.cached for r in second)
    assert [r.score for r in second] == [r.score for r in first]
    assert [r.thresholds for r in second] == [r.thresholds for r in first]
    assert second[2].no_face and second[2].no_face_in == 1
    for f in (tmp_path / "cache").rglob("*.json"):
        text = f.read_text()
        assert KEY not in text and SECRET not in text


def test_facepp_bounded_concurrency(images, tmp_path):
    server = MockFacePP(qps=2, delay=0.05)
    try:
        _register(server, images)
        api, _ = _client(server, tmp_path, cache=False, concurrency=2)
        pairs = [(images["alice1"], images["alice2"])] * 8
        res = api.compare_many(pairs)
        assert all(r.ok for r in res)
        assert server.max_inflight <= 2 and api.stats["retries"] == 0
    finally:
        server.close()


def test_facepp_timeout_is_retried(images, tmp_path):
    server = MockFacePP()
    server.slow_first = 0.8
    try:
        _register(server, images)
        api, sleeps = _client(server, tmp_path, cache=False, timeout=0.3)
        res = api.compare(images["alice1"], images["alice2"])
        assert res.ok and res.attempts == 2 and len(sleeps) == 1
    finally:
        server.close()


def test_rate_limiter_spaces_requests():
    now = {"t": 0.0}
    slept = []

    def sleep(s):
        slept.append(s)
        now["t"] += s

    rl = RateLimiter(4.0, clock=lambda: now["t"], sleep=sleep)
    for _ in range(5):
        rl.wait()
    assert slept == pytest.approx([0.25, 0.25, 0.25, 0.25])
    assert RateLimiter(None).interval == 0.0


def test_create_api_reads_env_and_config_without_printing(monkeypatch, tmp_path, facepp_server, images, capsys):
    _register(facepp_server, images)
    monkeypatch.delenv("FACEPP_API_KEY", raising=False)
    monkeypatch.delenv("FACEPP_API_SECRET", raising=False)
    cfg = tmp_path / "apis.json"
    cfg.write_text(json.dumps({"facepp": {"api_key": KEY, "api_secret": SECRET, "endpoint": facepp_server.url}}))
    api = create_api("facepp", config=cfg, cache=False, rate=None)
    assert api.compare(images["alice1"], images["alice2"]).score == 91.5
    monkeypatch.setenv("FACEPP_API_KEY", KEY)
    monkeypatch.setenv("FACEPP_API_SECRET", SECRET)
    api2 = create_api("face++", endpoint=facepp_server.url, cache=False, config=cfg)
    assert api2.compare(images["alice1"], images["bob"]).score == 22.25
    desc = json.dumps(api2.describe())
    out = capsys.readouterr()
    for text in (desc, out.out, out.err, repr(api2.__dict__.get("endpoint"))):
        assert KEY not in text and SECRET not in text
    assert redact(f"api_key={KEY}&x=1") == "api_key=***&x=1"
    monkeypatch.delenv("FACEPP_API_KEY")
    monkeypatch.delenv("FACEPP_API_SECRET")
    monkeypatch.delenv("FACEPRIV_API_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    from facepriv.core.errors import ConfigError

    with pytest.raises(ConfigError, match="FACEPP_API_KEY"):
        create_api("facepp", cache=False)


def test_large_images_are_reencoded_within_limits(facepp_server, tmp_path):
    big = tmp_path / "big.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (1400, 1400, 3), dtype=np.uint8)).save(big)  # ~5.9 MB PNG
    assert big.stat().st_size > 2 * 1024 * 1024
    small = tmp_path / "small.jpg"
    small.write_bytes(_image(9))
    api, _ = _client(facepp_server, tmp_path, cache=False)
    res = api.compare(big, small)
    assert res.ok and "re-encoded" in res.raw.get("facepriv_note", "")
    assert all(int(f["image_file1"][1:].split()[0]) <= 2 * 1024 * 1024 for f in facepp_server.forms)


# ------------------------------------------------------------------------------ Azure
class MockAzure:
    """Azure Face detect (-> faceId) + verify, key in Ocp-Apim-Subscription-Key."""

    key = "az-KEY-0f1e2d3c4b"

    def __init__(self):
        self.calls = []
        self.fail_next: list[int] = []
        self.faces: dict[str, str] = {}  # faceId -> person
        self.identity: dict[str, str] = {}
        self.no_face: set[str] = set()
        self.http = _Http(self._handle)
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
            d = _digest(body)
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


def test_azure_adapter_against_mock(images, tmp_path):
    server = MockAzure()
    try:
        for name, p in images.items():
            d = _digest(p.read_bytes())
            if name == "empty":
                server.no_face.add(d)
            else:
                server.identity[d] = "alice" if name.startswith("alice") else name
        api = AzureFace(server.url, MockAzure.key, cache=False, rate=None, backoff=0.001, sleep=lambda s: None)
        same = api.compare(images["alice1"], images["alice2"])
        assert same.score == 0.87 and same.verified("default") is True
        server.fail_next = [429]
        diff = api.compare(images["alice1"], images["bob"])
        assert diff.score == 0.11 and api.stats["retries"] == 1
        nf = api.compare(images["bob"], images["empty"])
        assert nf.no_face and nf.no_face_in == 2
        bad = AzureFace(server.url, "wrong-azure-key-123", cache=False, rate=None, sleep=lambda s: None)
        n = len(server.calls)
        r = bad.compare(images["alice1"], images["alice2"])
        assert not r.ok and "AZURE_FACE_KEY" in r.error and len(server.calls) == n + 1
        assert "wrong-azure-key-123" not in json.dumps(r.to_json()) and MockAzure.key not in json.dumps(same.to_json())
    finally:
        server.close()


def test_azure_detects_each_image_once_and_recovers_from_expired_face_ids(images, tmp_path):
    server = MockAzure()
    try:
        for name, p in images.items():
            server.identity[_digest(p.read_bytes())] = "alice" if name.startswith("alice") else name
        api = AzureFace(server.url, MockAzure.key, cache=False, rate=None, sleep=lambda s: None)
        now = [1000.0]
        api.clock = lambda: now[0]
        detects = lambda: sum(c.endswith("/detect") for c in server.calls)  # noqa: E731
        # one original against several protected images: the original is detected once
        assert api.compare(images["alice1"], images["alice2"]).score == 0.87
        assert api.compare(images["alice1"], images["bob"]).score == 0.11
        assert api.compare(images["alice2"], images["bob"]).score == 0.11
        assert detects() == 3 and api.stats["face_id_reuses"] == 3
        # a faceId Azure has dropped (the service forgot it): verify is refused, redone with fresh ids
        server.faces.clear()
        res = api.compare(images["alice1"], images["alice2"])
        assert res.ok and res.score == 0.87 and detects() == 5
        # past 23 h a remembered faceId is not used at all
        now[0] += 23 * 3600 + 1
        assert api.compare(images["alice1"], images["bob"]).ok and detects() == 7
        # "no face" is remembered too, and still reported as no face
        empty_d = _digest(images["empty"].read_bytes())
        server.no_face.add(empty_d)
        for _ in range(2):
            nf = api.compare(images["bob"], images["empty"])
            assert nf.no_face and nf.no_face_in == 2
        assert detects() == 8
    finally:
        server.close()


# ------------------------------------------------------------------------------ Rekognition
class _ClientError(Exception):
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
        self.digests = {_digest(p.read_bytes()): n for n, p in images.items()}

    def detect_faces(self, Image):  # noqa: N803 - boto3's names
        self.calls += 1
        self.detects += 1
        name = self.digests.get(_digest(Image["Bytes"]))
        return {"FaceDetails": [] if name == "empty" else [{"Confidence": 99.9, "BoundingBox": {}}]}

    def compare_faces(self, SourceImage, TargetImage, SimilarityThreshold):  # noqa: N803 - boto3's names
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        a = self.digests.get(_digest(SourceImage["Bytes"]))
        b = self.digests.get(_digest(TargetImage["Bytes"]))
        if a == "empty":
            raise _ClientError("InvalidParameterException", message="Request has invalid parameters")
        if b == "empty":
            return {"FaceMatches": [], "UnmatchedFaces": [], "SourceImageFace": {"Confidence": 99.9}}
        same = a[:5] == b[:5]
        if same:
            return {"FaceMatches": [{"Similarity": 99.2, "Face": {}}], "UnmatchedFaces": [],
                    "SourceImageFace": {"Confidence": 99.9}}
        return {"FaceMatches": [{"Similarity": 3.5, "Face": {}}], "UnmatchedFaces": [],
                "SourceImageFace": {"Confidence": 99.9}}


def test_rekognition_adapter_with_fake_client(images, tmp_path):
    client = FakeRekognition(images)
    api = Rekognition(client=client, cache=False, rate=None, backoff=0.001, sleep=lambda s: None)
    assert api.compare(images["alice1"], images["alice2"]).score == 99.2
    client.errors = [_ClientError("ThrottlingException"), _ClientError("ProvisionedThroughputExceededException")]
    r = api.compare(images["alice1"], images["bob"])
    assert r.score == 3.5 and r.verified("default") is False and r.attempts == 3
    nf = api.compare(images["empty"], images["bob"])
    assert nf.no_face and nf.no_face_in == 1
    client.errors = [_ClientError("UnrecognizedClientException", 403)]
    bad = api.compare(images["alice1"], images["alice2"])
    assert not bad.ok and bad.code == "UnrecognizedClientException"
    calls = client.calls
    assert not api.compare(images["alice1"], images["alice2"]).ok and client.calls == calls  # adapter stopped


def test_rekognition_without_boto3_says_how_to_install(monkeypatch):
    import builtins

    from facepriv.core.errors import ConfigError

    real = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "boto3":
            raise ImportError("no boto3")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError, match=r"facepriv\[aws\]"):
        Rekognition(cache=False)


# ------------------------------------------------------------------------------ end to end (CLI)
@pytest.mark.realmodels
def test_cli_audit_with_facepp_mock_never_prints_the_key(facepp_server, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from facepriv.cli import app
    from conftest import fixture_path

    orig, prot = tmp_path / "orig", tmp_path / "prot"
    orig.mkdir()
    prot.mkdir()
    for n in ("obama.jpg", "biden.jpg"):
        (orig / n).write_bytes(fixture_path(n).read_bytes())
        Image.open(orig / n).save(prot / n, quality=97)  # a "protected" copy: other bytes, same face
    # the mock says protected obama vs clean obama match; the service finds no face in protected biden
    facepp_server.identity[_digest((orig / "obama.jpg").read_bytes())] = "obama"
    facepp_server.identity[_digest((prot / "obama.jpg").read_bytes())] = "obama"
    facepp_server.no_face.add(_digest((prot / "biden.jpg").read_bytes()))
    facepp_server.fail_first = [(403, "CONCURRENCY_LIMIT_EXCEEDED")]
    monkeypatch.setenv("FACEPP_API_KEY", KEY)
    monkeypatch.setenv("FACEPP_API_SECRET", SECRET)
    monkeypatch.setenv("FACEPRIV_OFFLINE", "1")
    monkeypatch.setenv("FACEPRIV_THRESHOLDS_DIR", str(tmp_path / "thresholds"))
    out = tmp_path / "report"
    args = ["--json", "audit", "--protected", str(prot), "--original", str(orig), "--models", "sface",
            "--out", str(out), "--api", "facepp", "--api-endpoint", facepp_server.url, "--api-cache",
            str(tmp_path / "cache"), "--api-rate", "0", "--no-fid", "--lpips", "none", "--api-timeout", "9",
            "--api-retries", "3"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    provider = json.loads((out / "report.json").read_text())["apis"]["facepp"]["provider"]
    assert provider["timeout_s"] == 9 and provider["retries"] == 3
    dod = summary["apis"]["facepp"]["dodging"]
    # obama: same person, verified -> not protected; biden: no face in the protected photo -> protected
    assert dod["n"] == 2 and dod["no_face_protected"] == 1
    assert dod["psr"]["1e-3"] == pytest.approx(0.5) and set(dod["psr"]) == {"1e-3", "1e-4", "1e-5"}
    assert summary["apis"]["facepp"]["retries"] == 1
    # the human output too
    res_h = CliRunner().invoke(app, args[1:])
    assert res_h.exit_code == 0
    assert "facepp dodging" in res_h.stdout and "cache hits" in res_h.stdout and "(thresholds" in res_h.stdout
    assert facepp_server.calls == 3  # 1 rate-limited + 2; the second run was served from the cache
    texts = [res.output, res_h.output, getattr(res, "stderr", "") or "", getattr(res_h, "stderr", "") or ""]
    texts += [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file()]
    texts += [p.read_text() for p in (tmp_path / "cache").rglob("*.json")]
    assert len(texts) >= 7
    for t in texts:
        assert KEY not in t and SECRET not in t
    # a bad key: clear error, no retry storm, key never shown
    monkeypatch.setenv("FACEPP_API_KEY", "bad-key-5555aaaa")
    res_bad = CliRunner().invoke(app, args[1:] + ["--out", str(tmp_path / "bad"), "--api-cache", str(tmp_path / "c2")],
                                 catch_exceptions=False)
    assert "AUTHENTICATION_ERROR" in res_bad.output or "AUTHENTICATION_ERROR" in (tmp_path / "bad/report.json").read_text()
    for p in [*(tmp_path / "bad").rglob("*")]:
        if p.is_file():
            assert "bad-key-5555aaaa" not in p.read_text(errors="replace")
    assert "bad-key-5555aaaa" not in res_bad.output


def test_facepp_429_honours_retry_after(facepp_server, images, tmp_path):
    _register(facepp_server, images)
    facepp_server.fail_first = [(429, "CONCURRENCY_LIMIT_EXCEEDED", {"Retry-After": "0.25"})]
    api, sleeps = _client(facepp_server, tmp_path, cache=False, backoff=0.001, backoff_max=5.0)
    res = api.compare(images["alice1"], images["alice2"])
    assert res.ok and res.score == 91.5 and res.attempts == 2
    # the backoff alone would wait ~1 ms; the server asked for 0.25 s
    assert sleeps == [pytest.approx(0.25)]


# ------------------------------------------------------------------------------ per-provider options
def test_per_provider_endpoint_and_threshold_options():
    from facepriv.audit import AuditConfig
    from facepriv.audit.apis import per_provider
    from facepriv.core.errors import ConfigError

    assert per_provider(None, ["facepp"], "--api-endpoint") == {}
    # a plain URL (even one with "=" in its query) is fine with a single --api
    assert per_provider(["http://h:1/c?a=b"], ["face++"], "--api-endpoint") == {"facepp": "http://h:1/c?a=b"}
    assert per_provider(["facepp=http://a", "azure=http://b"], ["facepp", "azure"], "--api-endpoint") == {
        "facepp": "http://a", "azure": "http://b"}
    assert per_provider(["aws=85"], ["rekognition"], "--api-threshold", float) == {"rekognition": 85.0}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        per_provider(["http://a"], ["facepp", "azure"], "--api-endpoint")
    with pytest.raises(ConfigError, match="not selected"):
        per_provider(["azure=http://b"], ["facepp"], "--api-endpoint")
    with pytest.raises(ConfigError, match="unknown API"):
        per_provider(["bing=http://b"], ["facepp"], "--api-endpoint")
    with pytest.raises(ConfigError, match="not a valid value"):
        per_provider(["rekognition=high"], ["rekognition"], "--api-threshold", float)
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        AuditConfig(protected="p", original="o", apis=["facepp", "azure"], api_endpoint="http://one-for-all")
    cfg = AuditConfig(protected="p", original="o", apis=["facepp"], api_endpoint="http://x")
    assert cfg.api_endpoint == {"facepp": "http://x"} and cfg.api_threshold == {}
    with pytest.raises(ConfigError, match="Face\\+\\+ sends its own"):
        create_api("facepp", threshold=50, cache=False)


def test_api_threshold_replaces_the_default_of_rekognition_and_azure(images, monkeypatch):
    client = FakeRekognition(images)
    api = create_api("rekognition", threshold=99.5, client=client, cache=False, rate=None)
    r = api.compare(images["alice1"], images["alice2"])
    assert r.score == 99.2 and r.thresholds == {"default": 99.5} and r.verified("default") is False
    assert create_api("aws", client=client, cache=False).threshold == 80.0
    monkeypatch.setenv("AZURE_FACE_KEY", "az-test-key-abc123")
    az = create_api("azure", endpoint="http://127.0.0.1:9", threshold=0.9, cache=False)
    assert az.threshold == 0.9 and az.endpoint == "http://127.0.0.1:9"


class _MeanColour(torch.nn.Module):
    """Fake recogniser (mean colour of the crop's centre) so that the audit runs in milliseconds."""

    def __init__(self):
        super().__init__()
        self.spec = type("S", (), {"template": "arcface-112", "input_size": (112, 112), "metric": "cosine",
                                   "name": "mean-colour", "thresholds": {"default": 0.5}, "threshold_source": None})()

    def forward(self, x):
        return x[:, :, 28:84, 28:84].mean((2, 3))


def test_audit_sends_each_api_to_its_own_endpoint_and_shows_thresholds(facepp_server, tmp_path, monkeypatch, capsys):
    from facepriv.audit import AuditConfig, run_audit
    from facepriv.audit.report import thresholds_seen_text
    from facepriv.cli import audit as cli_audit
    from facepriv.cli import common

    azure = MockAzure()
    try:
        orig, prot = tmp_path / "orig", tmp_path / "prot"
        orig.mkdir()
        prot.mkdir()
        for person, colour in (("ann", (200, 60, 40)), ("ben", (40, 60, 200))):
            for folder, shift in ((orig, 0), (prot, 9)):
                arr = np.full((112, 112, 3), colour, dtype=np.uint8) + shift
                Image.fromarray(arr).save(folder / f"{person}.png")
                d = _digest((folder / f"{person}.png").read_bytes())
                facepp_server.identity[d] = person
                azure.identity[d] = person
        monkeypatch.setenv("FACEPP_API_KEY", KEY)
        monkeypatch.setenv("FACEPP_API_SECRET", SECRET)
        monkeypatch.setenv("AZURE_FACE_KEY", MockAzure.key)
        for var in ("AZURE_FACE_ENDPOINT", "FACEPP_ENDPOINT", "FACEPRIV_API_CONFIG"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
        monkeypatch.setenv("FACEPRIV_THRESHOLDS_DIR", str(tmp_path / "thresholds"))
        cfg = AuditConfig(protected=prot, original=orig, models=["mean-colour"], aligned=True, quality=False,
                          progress=False, device="cpu", out=tmp_path / "rep", apis=["facepp", "azure"],
                          api_endpoint=[f"facepp={facepp_server.url}", f"azure={azure.url}"],
                          api_threshold=["azure=0.9"], api_timeout=7, api_retries=1, api_rate=None,
                          api_cache=tmp_path / "cache")
        rep = run_audit(cfg, recognizers={"mean-colour": _MeanColour()})
        a = rep["apis"]
        # each provider went to its own server
        assert a["facepp"]["provider"]["endpoint"] == facepp_server.url and facepp_server.calls == 2
        assert a["azure"]["provider"]["endpoint"] == azure.url
        assert sum(c.endswith("/verify") for c in azure.calls) == 2
        for name in ("facepp", "azure"):
            assert a[name]["provider"]["timeout_s"] == 7 and a[name]["provider"]["retries"] == 1
        # Azure: same person at confidence 0.87, below the user's 0.9 -> "protected" (0.5 would say not)
        assert a["azure"]["dodging"]["psr"] == {"default": 1.0}
        assert a["azure"]["dodging"]["thresholds_seen"] == {"default": [0.9, 0.9]}
        # Face++: the thresholds of every response, min-max, in the HTML and in the terminal
        seen = a["facepp"]["dodging"]["thresholds_seen"]
        per_row = [c["thresholds"]["1e-3"] for r in rep["images"] for c in r["apis"]["facepp"]]
        assert seen["1e-3"] == [min(per_row), max(per_row)] and min(per_row) < max(per_row)
        text = thresholds_seen_text(seen)
        assert f"1e-3: {min(per_row):.2f}–{max(per_row):.2f}" in text
        html = (tmp_path / "rep" / "report.html").read_text()
        assert "thresholds used (min–max seen)" in html and text in html
        monkeypatch.setattr(common.out_console, "width", 400)
        capsys.readouterr()
        cli_audit.print_summary(rep)
        out = capsys.readouterr().out
        assert "facepp dodging: 2 pairs" in out and f"(thresholds {text})" in out
        assert "(thresholds default: 0.90)" in out
    finally:
        azure.close()
