"""What every online adapter shares: creation from options, the environment or a config file
(never printing a key), per-provider options, rate limiting, images fitted to the provider's
size limits, and attempts counted per comparison under concurrency.
"""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from facepriv.audit.apis import create_api
from facepriv.audit.apis.base import APIError, CompareResult, FaceAPI, ImageLimits, RateLimiter, prepare_image
from facepriv.core.secrets import redact

from .api_mocks import KEY, SECRET, FakeRekognition, register_identities
from .helpers import noise_image


def test_create_api_reads_env_and_config_without_printing(monkeypatch, tmp_path, facepp_server, images, capsys):
    register_identities(facepp_server, images)
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


# ------------------------------------------------------------------------------ image limits
@pytest.mark.parametrize("w, h, fmt", [(40, 30, "PNG"), (30, 60, "JPEG"), (20, 20, "WEBP")])
def test_tiny_images_are_upscaled_to_the_minimum_side(tmp_path, w, h, fmt):
    p = noise_image(tmp_path / f"tiny.{fmt.lower()}", w, h, fmt=fmt)
    limits = ImageLimits(max_bytes=2 * 1024 * 1024, max_side=4096, min_side=48)
    data, note = prepare_image(p, limits)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and min(im.size) == 48
        assert abs(im.size[0] / im.size[1] - w / h) < 0.05  # aspect kept
    assert f"upscaled from {w}x{h} to {im.size[0]}x{im.size[1]} px" in note and "minimum side of 48" in note
    # bytes in, same answer
    assert prepare_image(p.read_bytes(), limits) == (data, note)
    # an image at the minimum is sent as it is
    ok = noise_image(tmp_path / "ok.png", 48, 60)
    assert prepare_image(ok, limits) == (ok.read_bytes(), None)


def test_image_that_cannot_reach_the_minimum_side_is_a_bad_image(tmp_path):
    p = noise_image(tmp_path / "strip.png", 2000, 10)
    with pytest.raises(APIError, match="2000x10 px.*minimum of 48 px") as err:
        prepare_image(p, ImageLimits(max_side=4096, min_side=48))
    assert err.value.code == "BAD_IMAGE"


# ------------------------------------------------------------------------------ attempts
def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class _FlakyAPI(FaceAPI):
    """Pair i fails its first ``fails[i]`` attempts with a retryable error. The first attempts of
    the first ``together`` pairs meet at a barrier, so that many comparisons are in flight at once."""

    name = "flaky"

    def __init__(self, fails: dict[bytes, int], together: int, **kw):
        super().__init__(rate=None, sleep=lambda s: None, backoff=0.0, **kw)
        self.fails = fails
        self.seen: dict[bytes, int] = {}
        self.barrier = threading.Barrier(together)
        self.met: set[bytes] = set()
        self._mlock = threading.Lock()

    def _compare(self, img_a: bytes, img_b: bytes) -> CompareResult:
        def attempt():
            with self._mlock:
                n = self.seen[img_a] = self.seen.get(img_a, 0) + 1
                meet = n == 1 and len(self.met) < self.barrier.parties
                if meet:
                    self.met.add(img_a)
            if meet:
                self.barrier.wait(timeout=20)
            if n <= self.fails[img_a]:
                raise APIError("429 busy", status=429, retryable=True)
            return {"score": float(n)}

        body = self.call(attempt)
        return CompareResult(score=body["score"], thresholds={"default": 1.0}, raw=body)


def test_attempts_are_counted_per_comparison_under_concurrency(tmp_path):
    fails = [0, 2, 1, 0, 3, 1, 0, 2]
    imgs = [(_png(i), _png(100 + i)) for i in range(len(fails))]
    api = _FlakyAPI({a: f for (a, _), f in zip(imgs, fails)}, together=4, concurrency=4, retries=4,
                    cache=tmp_path / "cache")
    res = api.compare_many(imgs)
    assert all(r.ok and not r.cached for r in res), [r.error for r in res]
    assert [r.attempts for r in res] == [f + 1 for f in fails]
    assert [r.score for r in res] == [f + 1 for f in fails]  # the attempt that succeeded
    assert api.calls == sum(f + 1 for f in fails) and api.stats["retries"] == sum(fails)
    assert api.met and len(api.met) == 4  # four comparisons really were in flight together
    # the cache keeps each answer's true count; a cache hit sends nothing and says so
    stored = sorted(json.loads(p.read_text())["attempts"] for p in (tmp_path / "cache").rglob("*.json"))
    assert stored == sorted(f + 1 for f in fails)
    again = api.compare_many(imgs)
    assert all(r.cached and r.attempts == 0 for r in again) and api.calls == sum(f + 1 for f in fails)
    assert [r.score for r in again] == [r.score for r in res]
