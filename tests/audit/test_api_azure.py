"""The Azure Face adapter: detect then verify against a mock, each image detected once, expired
faceIds recovered, Azure's quickstart variable names, and a 403 (quota / Limited Access) that
stops the adapter instead of being retried.
"""

from __future__ import annotations

import json

import pytest
from conftest import fixture_path

from facepriv.audit.apis.azure import AzureFace
from facepriv.core.errors import ConfigError

from .api_mocks import MockAzure, digest


def test_azure_adapter_against_mock(images, tmp_path):
    server = MockAzure()
    try:
        for name, p in images.items():
            d = digest(p.read_bytes())
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
            server.identity[digest(p.read_bytes())] = "alice" if name.startswith("alice") else name
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
        empty_d = digest(images["empty"].read_bytes())
        server.no_face.add(empty_d)
        for _ in range(2):
            nf = api.compare(images["bob"], images["empty"])
            assert nf.no_face and nf.no_face_in == 2
        assert detects() == 8
    finally:
        server.close()


def test_azure_accepts_the_quickstart_variable_names(tmp_path, monkeypatch):
    """AZURE_FACE_KEY / AZURE_FACE_ENDPOINT, or FACE_APIKEY / FACE_ENDPOINT as Azure's Face
    quickstarts name them; ours win when both are set; the key is a registered secret."""
    from facepriv.audit.apis import create_api
    from facepriv.core.secrets import redact_text

    empty = tmp_path / "apis.json"
    empty.write_text("{}")
    for v in ("AZURE_FACE_KEY", "AZURE_FACE_ENDPOINT", "FACE_APIKEY", "FACE_ENDPOINT"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(ConfigError, match="FACE_APIKEY"):
        create_api("azure", config=empty, cache=False)
    monkeypatch.setenv("FACE_APIKEY", "quickstart-key-7f3a")
    monkeypatch.setenv("FACE_ENDPOINT", "https://quickstart.example/")
    az = create_api("azure", config=empty, cache=False)
    assert az.endpoint == "https://quickstart.example" and az._key == "quickstart-key-7f3a"
    assert "quickstart-key-7f3a" not in redact_text("key quickstart-key-7f3a in a message")
    monkeypatch.setenv("AZURE_FACE_KEY", "ours-key-1b2c")
    monkeypatch.setenv("AZURE_FACE_ENDPOINT", "https://ours.example")
    az = create_api("azure", config=empty, cache=False)
    assert az.endpoint == "https://ours.example" and az._key == "ours-key-1b2c"
    # an explicit --api-endpoint still beats both environment names
    assert create_api("azure", config=empty, endpoint="http://127.0.0.1:9", cache=False).endpoint == "http://127.0.0.1:9"


def test_azure_403_is_not_retried_and_stops_the_adapter(monkeypatch):
    """Azure answers 403 for an exhausted quota or a missing Limited Access approval: retrying
    cannot help, so the first 403 stops the adapter; a 429 is retried."""
    from facepriv.audit.apis.azure import AzureFace

    class Resp:
        def __init__(self, status, body):
            self.status_code, self.ok, self.reason, self.headers, self._body = status, status < 400, "x", {}, body

        def json(self):
            return self._body

    class Session:
        """Answers the queued errors first, then like Azure: a face for /detect, a verdict for /verify."""

        def __init__(self, errors):
            self.errors, self.sent = list(errors), 0

        def post(self, url, *a, **kw):
            self.sent += 1
            if self.errors:
                status = self.errors.pop(0)
                return Resp(status, {"error": {"code": str(status), "message": "refused"}})
            if url.endswith("/detect"):
                return Resp(200, [{"faceId": f"id{self.sent}", "faceRectangle": {"width": 9, "height": 9}}])
            return Resp(200, {"isIdentical": True, "confidence": 0.93})

    img = fixture_path("obama.jpg").read_bytes()

    def adapter(errors):
        az = AzureFace("http://127.0.0.1:9", "azure-test-key-9d8e", cache=False, rate=None, retries=4,
                       sleep=lambda s: None)
        az._local.session = Session(errors)
        return az, az._local.session

    az, sess = adapter([403])
    r = az.compare(img, img)
    assert not r.ok and "HTTP 403" in r.error and "quota" in r.error
    assert sess.sent == 1 and az.stats["retries"] == 0
    again = az.compare(img, img)  # the adapter has stopped: nothing more is sent
    assert again.code == "ADAPTER_STOPPED" and sess.sent == 1
    # contrast: 429 and 503 are retried, then the comparison goes through (detect, then verify:
    # the second image is the same bytes, so its faceId is the one just detected)
    az, sess = adapter([429, 503])
    r = az.compare(img, img)
    assert r.ok and r.score == 0.93 and az.stats["retries"] == 2 and sess.sent == 2 + 2
    assert az.stats["face_id_reuses"] == 1
