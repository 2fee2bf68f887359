"""The Face++ adapter against a mock of its documented Compare API: thresholds read from every
response, uploads, retries with backoff (Retry-After honoured), bad keys never retried nor
echoed, no-face answers, the on-disk cache, bounded concurrency, timeouts, image limits.
"""

from __future__ import annotations

import email.parser
import email.policy
import http.server
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from facepriv.audit.apis.facepp import FacePlusPlus

from .api_mocks import KEY, SECRET, MockFacePP, facepp_client, random_jpeg, register_identities
from .helpers import noise_image


def test_facepp_success_reads_thresholds_from_every_response(facepp_server, images, tmp_path):
    register_identities(facepp_server, images)
    api, _ = facepp_client(facepp_server, tmp_path, cache=False)
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
    register_identities(facepp_server, images)
    api, _ = facepp_client(facepp_server, tmp_path, cache=False, upload="base64")
    res = api.compare(images["alice1"], images["alice2"])
    assert res.score == 91.5
    assert "image_base64_1" in facepp_server.forms[0] and "image_file1" not in facepp_server.forms[0]


def test_facepp_rate_limit_then_retry_with_backoff(facepp_server, images, tmp_path):
    register_identities(facepp_server, images)
    facepp_server.fail_first = [(403, "CONCURRENCY_LIMIT_EXCEEDED"), (403, "CONCURRENCY_LIMIT_EXCEEDED"),
                                (502, "INTERNAL_ERROR")]
    api, sleeps = facepp_client(facepp_server, tmp_path, cache=False, backoff=0.01, backoff_max=1.0)
    res = api.compare(images["alice1"], images["alice2"])
    assert res.ok and res.score == 91.5
    assert facepp_server.calls == 4 and res.attempts == 4 and api.stats["retries"] == 3
    assert len(sleeps) == 3 and all(s > 0 for s in sleeps)
    # exponential backoff (with jitter in [0.5, 1) x the nominal delay): nominal 0.01, 0.02, 0.04
    assert sleeps[0] < 0.011 and 0.02 <= sleeps[2] / 1.0 < 0.041 and sleeps[2] > sleeps[0]


def test_facepp_429_honours_retry_after(facepp_server, images, tmp_path):
    register_identities(facepp_server, images)
    facepp_server.fail_first = [(429, "CONCURRENCY_LIMIT_EXCEEDED", {"Retry-After": "0.25"})]
    api, sleeps = facepp_client(facepp_server, tmp_path, cache=False, backoff=0.001, backoff_max=5.0)
    res = api.compare(images["alice1"], images["alice2"])
    assert res.ok and res.score == 91.5 and res.attempts == 2
    # the backoff alone would wait ~1 ms; the server asked for 0.25 s
    assert sleeps == [pytest.approx(0.25)]


def test_facepp_gives_up_after_retries(facepp_server, images, tmp_path):
    register_identities(facepp_server, images)
    facepp_server.fail_first = [(403, "CONCURRENCY_LIMIT_EXCEEDED")] * 10
    api, _ = facepp_client(facepp_server, tmp_path, cache=False, retries=2)
    res = api.compare(images["alice1"], images["alice2"])
    assert not res.ok and "CONCURRENCY_LIMIT_EXCEEDED" in res.error
    assert facepp_server.calls == 3


def test_facepp_bad_key_is_not_retried_and_never_echoed(facepp_server, images, tmp_path):
    register_identities(facepp_server, images)
    bad_key, bad_secret = "WRONG-key-77aa11", "WRONG-secret-22bb33"
    api, sleeps = facepp_client(facepp_server, tmp_path, key=bad_key, secret=bad_secret)
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
    register_identities(facepp_server, images)
    api, _ = facepp_client(facepp_server, tmp_path, cache=False)
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
    register_identities(facepp_server, images)
    pairs = [(images["alice1"], images["alice2"]), (images["alice1"], images["bob"]), (images["empty"], images["bob"])]
    api, _ = facepp_client(facepp_server, tmp_path)
    first = api.compare_many(pairs)
    assert facepp_server.calls == 3 and not any(r.cached for r in first)
    api2, _ = facepp_client(facepp_server, tmp_path)  # a new run, same cache folder
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
        register_identities(server, images)
        api, _ = facepp_client(server, tmp_path, cache=False, concurrency=2)
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
        register_identities(server, images)
        api, sleeps = facepp_client(server, tmp_path, cache=False, timeout=0.3)
        res = api.compare(images["alice1"], images["alice2"])
        assert res.ok and res.attempts == 2 and len(sleeps) == 1
    finally:
        server.close()


def test_large_images_are_reencoded_within_limits(facepp_server, tmp_path):
    big = tmp_path / "big.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (1400, 1400, 3), dtype=np.uint8)).save(big)  # ~5.9 MB PNG
    assert big.stat().st_size > 2 * 1024 * 1024
    small = tmp_path / "small.jpg"
    small.write_bytes(random_jpeg(9))
    api, _ = facepp_client(facepp_server, tmp_path, cache=False)
    res = api.compare(big, small)
    assert res.ok and "re-encoded" in res.raw.get("facepriv_note", "")
    assert all(int(f["image_file1"][1:].split()[0]) <= 2 * 1024 * 1024 for f in facepp_server.forms)


class _SizeCheckingFacePP:
    """Face++ compare that enforces the documented 48 px minimum (400 INVALID_IMAGE_SIZE)."""

    def __init__(self):
        self.sizes: list[tuple[int, int]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
                files = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                         for p in msg.iter_parts() if p.get_filename()}
                status, resp = 200, {"request_id": "r", "time_used": 3, "confidence": 88.0,
                                     "thresholds": {"1e-3": 62.3, "1e-4": 69.1, "1e-5": 73.9},
                                     "faces1": [{}], "faces2": [{}]}
                for i in (1, 2):
                    with Image.open(io.BytesIO(files[f"image_file{i}"])) as im:
                        outer.sizes.append(im.size)
                        if min(im.size) < 48:
                            status, resp = 400, {"error_message": f"INVALID_IMAGE_SIZE: image_file{i}"}
                data = json.dumps(resp).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/facepp/v3/compare"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_facepp_gets_tiny_crops_upscaled_and_the_row_says_so(tmp_path):
    server = _SizeCheckingFacePP()
    try:
        tiny, big = noise_image(tmp_path / "tiny.png", 40, 40, seed=1), noise_image(tmp_path / "big.jpg", 112, 112, 2, "JPEG")
        api = FacePlusPlus("k-123456789", "s-123456789", endpoint=server.url, cache=False, rate=None, retries=0)
        res = api.compare(tiny, big)
        assert res.ok and res.score == 88.0, res.error
        assert server.sizes == [(48, 48), (112, 112)]
        assert res.note.startswith("image 1 upscaled from 40x40 to 48x48 px") and "image 2" not in res.note
        assert res.raw["facepriv_note"] == res.note
    finally:
        server.close()
