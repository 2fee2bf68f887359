"""Second review of `facepriv audit`: autocast dtype choice and re-checks, batched quality
metrics on the meter's device, the FID size caveat, per-comparison API attempts under
concurrency, and redaction of the CLI's error output."""

from __future__ import annotations

import io
import json
import math
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from torch import nn

from facepriv.audit import metrics
from facepriv.audit.apis.base import APIError, CompareResult, FaceAPI
from facepriv.audit.embed import AMP_MIN_COSINE, FaceEmbeddingCache, default_amp_dtypes
from facepriv.audit.metrics import QualityMeter
from facepriv.core.align import align_faces, get_template

FIXTURES = Path(__file__).parent / "fixtures"
# cosine 1/sqrt(1+t^2) of the drifted embedding: just above / well below the bar
T_SMALL = math.sqrt(1 / AMP_MIN_COSINE**2 - 1) * 0.5
T_BIG = math.sqrt(1 / AMP_MIN_COSINE**2 - 1) * 3.0


# ------------------------------------------------------------------------------ autocast
def _crop_files(tmp_path: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        p = tmp_path / f"c{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def _aligned(path: Path, template: str = "arcface-112", size=None) -> torch.Tensor:
    """The crop FaceEmbeddingCache(aligned=True) feeds the model for a pre-aligned file."""
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    tpl = get_template("arcface-112")
    h, w = x.shape[-2:]
    pts = torch.tensor(tpl.points, dtype=torch.float32) * torch.tensor([w / tpl.size[1], h / tpl.size[0]])
    return align_faces(x, pts[None], template, size=size).crops


class _DtypeDrift(nn.Module):
    """A fixed projection whose output, under CPU autocast, is turned by an angle set per
    autocast dtype (``drift[dtype]``: t -> cosine 1/sqrt(1+t^2), nan -> non-finite, "raise" ->
    the dtype has no kernel). Optionally the drift starts only at the ``drift_from``-th
    autocast call. Counts its float32 and autocast calls."""

    differentiable = True

    def __init__(self, drift: dict, drift_from: int = 1):
        super().__init__()
        self.spec = type("Spec", (), {"template": "arcface-112", "input_size": (112, 112), "metric": "cosine"})()
        self.proj = nn.Linear(48, 12)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(5))
        torch.nn.init.zeros_(self.proj.bias)
        self.requires_grad_(False)
        self.drift, self.drift_from = drift, drift_from
        self.calls = {"float32": 0, "autocast": 0}

    def clean(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1))

    def forward(self, x):
        on = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            out = self.clean(x)
            if not on:
                self.calls["float32"] += 1
                return out
            self.calls["autocast"] += 1
            t = self.drift.get(dtype, 0.0) if self.calls["autocast"] >= self.drift_from else 0.0
            if t == "raise":
                raise RuntimeError(f"no kernel for {dtype}")
            if math.isnan(t):
                return torch.full_like(out, float("inf"))  # an fp16 overflow
            return _turn(out, t)


def _turn(out: torch.Tensor, t: float) -> torch.Tensor:
    u = torch.zeros_like(out)
    u[:, 0] = 1.0
    v = u - (u * out).sum(-1, keepdim=True) * out / (out * out).sum(-1, keepdim=True)
    v = v / v.norm(dim=-1, keepdim=True)
    return out + t * out.norm(dim=-1, keepdim=True) * v


def test_default_autocast_order_prefers_fp16_on_cuda():
    assert default_amp_dtypes("cuda", True) == (torch.float16, torch.bfloat16)
    assert default_amp_dtypes("cuda", False) == (torch.float16,)
    assert default_amp_dtypes("cpu") == (torch.bfloat16,)
    # one dtype overrides the order; a sequence is tried in the order given
    m = {"m": _DtypeDrift({})}
    assert FaceEmbeddingCache(m, aligned=True, amp=True, amp_dtype=torch.bfloat16).amp_dtypes == (torch.bfloat16,)
    assert FaceEmbeddingCache(m, aligned=True, amp=True, amp_dtype=[torch.bfloat16, torch.float16]
                              ).amp_dtypes == (torch.bfloat16, torch.float16)
    with pytest.raises(ValueError):
        FaceEmbeddingCache(m, aligned=True, amp=True, amp_dtype=())


def test_fp16_first_then_bf16_then_float32(tmp_path):
    """The CUDA order (fp16, bf16) run through CPU autocast: the first dtype that is finite and
    within the bar is kept; fp16 overflow, drift or a missing kernel moves on to bf16; when no
    dtype is safe the model runs in float32."""
    f16, b16 = torch.float16, torch.bfloat16
    models = {
        "fp16": _DtypeDrift({f16: T_SMALL, b16: T_SMALL}),
        "overflow": _DtypeDrift({f16: float("nan"), b16: T_SMALL}),
        "far": _DtypeDrift({f16: T_BIG, b16: T_SMALL}),
        "nokernel": _DtypeDrift({f16: "raise", b16: 0.0}),
        "none": _DtypeDrift({f16: T_BIG, b16: float("nan")}),
    }
    files = _crop_files(tmp_path, 4)
    cache = FaceEmbeddingCache(models, aligned=True, amp=True, amp_dtype=default_amp_dtypes("cuda"), batch_size=2)
    res = cache.process(files, progress=False)
    notes = cache.amp_report()
    assert cache.amp_state == {"fp16": True, "overflow": True, "far": True, "nokernel": True, "none": False}
    assert cache.amp_chosen == {"fp16": f16, "overflow": b16, "far": b16, "nokernel": b16}
    assert notes["fp16"].startswith("on (torch.float16, min cosine to float32 ") and "refused" not in notes["fp16"]
    assert notes["overflow"].startswith("on (torch.bfloat16") and "torch.float16 non-finite values" in notes["overflow"]
    assert notes["nokernel"].startswith("on (torch.bfloat16") and "torch.float16 failed: no kernel" in notes["nokernel"]
    far16 = float(re.search(r"torch\.float16 min cosine (\S+?)\)", notes["far"]).group(1))
    assert far16 == pytest.approx(1 / math.sqrt(1 + T_BIG**2), abs=2e-6) and far16 < AMP_MIN_COSINE
    assert notes["none"].startswith("off (autocast changed embeddings: torch.float16 min cosine ")
    assert "torch.bfloat16 non-finite values" in notes["none"]
    # the embeddings are the chosen dtype's (float32's for "none"), in every batch
    for f in files:
        a = _aligned(f)
        with torch.no_grad():
            clean = models["fp16"].clean(a)
        emb = res[f.resolve()].embeddings
        torch.testing.assert_close(emb["fp16"], _turn(clean, T_SMALL), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(emb["far"], _turn(clean, T_SMALL), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(emb["nokernel"], clean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(emb["none"], clean, atol=1e-5, rtol=1e-5)
    # the decision is taken once: float32 ran only on the first batch of a kept model
    assert models["far"].calls["float32"] == 1 and models["none"].calls["float32"] == 2


def test_autocast_is_rechecked_and_turned_off_when_it_drifts(tmp_path):
    """Every ``amp_recheck``-th batch also runs in float32; a failed re-check turns autocast off
    for the rest of the run (that batch included) and the report says from which batch."""
    files = _crop_files(tmp_path, 8)
    # autocast call k is batch k (one crop per batch); drift from batch 4: the re-check at batch 3
    # passes, the one at batch 6 fails
    models = {"drifts": _DtypeDrift({torch.bfloat16: T_BIG}, drift_from=4),
              "steady": _DtypeDrift({torch.bfloat16: T_SMALL})}
    cache = FaceEmbeddingCache(models, aligned=True, amp=True, amp_dtype=torch.bfloat16, batch_size=1,
                               amp_recheck=3, workers=1)
    res = cache.process(files, progress=False)
    notes = cache.amp_report()
    assert cache.amp_state == {"drifts": False, "steady": True}
    assert notes["drifts"].startswith("off from batch 6: the re-check found torch.bfloat16 min cosine ")
    assert "batches 1-5 ran under autocast; first check: on (torch.bfloat16" in notes["drifts"]
    assert notes["steady"].startswith("on (torch.bfloat16")
    # float32 ran on batch 1 (the decision) and at every re-check: 3 and 6 (then for good: 7, 8)
    assert models["steady"].calls == {"float32": 3, "autocast": 8}
    assert models["drifts"].calls == {"float32": 5, "autocast": 6}
    for i, f in enumerate(files, start=1):
        with torch.no_grad():
            clean = models["drifts"].clean(_aligned(f))
        want = _turn(clean, T_BIG) if i in (4, 5) else clean  # batches 4-5 drifted before the re-check
        torch.testing.assert_close(res[f.resolve()].embeddings["drifts"], want, atol=1e-5, rtol=1e-5)
    # amp_recheck=0: never re-checked
    models0 = {"drifts": _DtypeDrift({torch.bfloat16: T_BIG}, drift_from=2)}
    c0 = FaceEmbeddingCache(models0, aligned=True, amp=True, amp_dtype=torch.bfloat16, batch_size=1, amp_recheck=0)
    c0.process(files[:4], progress=False)
    assert c0.amp_state == {"drifts": True} and models0["drifts"].calls["float32"] == 1


def test_autocast_choice_on_a_real_model_follows_the_measured_cosines():
    """The real sface network under CPU autocast in the CUDA order (fp16, bf16): the dtype kept is
    the first whose measured minimum cosine to float32 reaches the bar on that batch."""
    from facepriv.models import availability, create_model

    if not availability("sface").available:
        pytest.skip("sface weights are not on this machine")
    model = create_model("sface")
    files = [FIXTURES / n for n in ("obama.jpg", "obama2.jpg", "biden.jpg")]
    cache = FaceEmbeddingCache({"sface": model}, aligned=True, amp=True, amp_dtype=default_amp_dtypes("cuda"),
                               batch_size=len(files), workers=1)
    res = cache.process(files, progress=False)
    x = torch.cat([_aligned(f, "arcface-112", (112, 112)) for f in files])
    cos = {}
    with torch.no_grad():
        ref = model(x).float()
        for d in default_amp_dtypes("cuda"):
            with torch.autocast("cpu", dtype=d):
                out = model(x).float()
            cos[d] = float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).min()) if torch.isfinite(out).all() \
                else -1.0
    passing = [d for d in default_amp_dtypes("cuda") if cos[d] >= AMP_MIN_COSINE]
    note = cache.amp_report()["sface"]
    if passing:
        assert cache.amp_chosen["sface"] == passing[0] and note.startswith(f"on ({passing[0]}")
        with torch.no_grad(), torch.autocast("cpu", dtype=passing[0]):
            want = model(x).float()
    else:
        assert cache.amp_state["sface"] is False and note.startswith("off")
        want = ref
    got = torch.cat([res[f.resolve()].embeddings["sface"] for f in files])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ quality
class _FeatNet(nn.Module):
    """Stand-in FID network: conv + eval BatchNorm + pooling (per-sample, any size); records the
    batch sizes it was called with."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(8, 3, 3, 3, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(8, generator=g) * 0.1)
        self.bn = nn.BatchNorm2d(8).eval()
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(len(x))
        y = torch.relu(self.bn(self.conv(x)))
        return torch.cat([y.mean((2, 3)), torch.nn.functional.adaptive_avg_pool2d(y, 2).flatten(1)], 1)


def _lpips_random_alex():
    """The registry's LPIPS wrapper around a real AlexNet LPIPS with a random (seeded) backbone."""
    import torchvision

    from facepriv.models.metrics import LPIPSMetric

    torch.manual_seed(0)
    backbone = torchvision.models.alexnet(weights=None).features.state_dict()
    return LPIPSMetric("alex", {f"features.{k}": v for k, v in backbone.items()}).eval()


class _Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, a, b):
        self.batches.append(len(a))
        return self.inner(a, b)


def _pairs():
    g = torch.Generator().manual_seed(7)
    pairs = []
    for h, w in [(40, 48), (40, 48), (64, 40), (40, 48), (600, 520), (64, 40)]:
        o = torch.rand(3, h, w, generator=g)
        pairs.append(((o + 0.1 * torch.randn(3, h, w, generator=g)).clamp(0, 1), o))
    o = torch.rand(3, 50, 60, generator=g)
    pairs.append((torch.rand(3, 45, 54, generator=g), o))  # another size: resized to the original's
    pairs.append((pairs[0][1].clone(), pairs[0][1]))  # identical
    return pairs


def test_add_many_matches_add_and_batches_lpips_and_fid_per_shape():
    pairs = _pairs()
    lp = _lpips_random_alex()
    one = QualityMeter(lpips_model=_Counting(lp), fid_model=_FeatNet(), lpips="lpips-alex")
    many = QualityMeter(lpips_model=_Counting(lp), fid_model=_FeatNet(), lpips="lpips-alex")
    rows1 = [one.add(p, o) for p, o in pairs]
    rows2 = many.add_many(pairs[:5]) + many.add_many(pairs[5:])  # in chunks, as the runner calls it
    assert len(rows2) == len(pairs) and many.rows == rows2
    for r1, r2 in zip(rows1, rows2):
        assert r1.keys() == r2.keys() and r1.get("resized") == r2.get("resized")
        for k in ("psnr", "ssim", "lpips"):
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-6), k
    assert "resized" in rows2[6] and rows2[7]["psnr"] == math.inf and rows2[7]["lpips"] == pytest.approx(0, abs=1e-6)
    assert rows2[0]["lpips"] > 0
    for side in (0, 1):
        torch.testing.assert_close(torch.cat(many._fid_feats[side]), torch.cat(one._fid_feats[side]),
                                   atol=1e-5, rtol=1e-5)
    s1, s2 = one.summary(), many.summary()
    for k in ("psnr", "ssim", "lpips", "fid"):
        assert s2[k] == pytest.approx(s1[k], rel=1e-4, abs=1e-6), k
    assert s2["n"] == s1["n"] == len(pairs) and s2["n_identical"] == 1
    # one forward per shape group (FID: protected and original together): chunk 1 holds
    # (40,48) x3, (64,40), 600x520 (fitted to 512x444); chunk 2 (64,40), (50,60), (40,48)
    assert many.lpips.batches == [3, 1, 1, 1, 1, 1]
    assert many.fid_model.batches == [6, 2, 2, 2, 2, 2]
    assert one.lpips.batches == [1] * len(pairs) and one.fid_model.batches == [2] * len(pairs)


def test_add_many_records_nothing_when_it_fails():
    meter = QualityMeter(lpips_model=_Counting(lambda a, b: (a - b).abs().mean((1, 2, 3))), fid_model=_FeatNet(),
                         lpips="l1")
    good = _pairs()[:2]
    meter.add_many(good)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        meter.add_many([good[0], (torch.rand(40, 48), torch.rand(40, 48))])
    assert len(meter.rows) == 2 and len(meter._fid_feats[0]) == len(meter._fid_feats[1]) == 2
    assert meter.add_many([]) == [] and len(meter.rows) == 2


def test_quality_metrics_run_on_the_meter_device(monkeypatch):
    """PSNR and SSIM receive the pair on the meter's device (no GPU here: the device is recorded
    through the functions the meter calls)."""
    seen = []
    real_psnr, real_ssim = metrics.psnr, metrics.ssim
    monkeypatch.setattr(metrics, "psnr", lambda a, b: seen.append(("psnr", a.device, b.device)) or real_psnr(a, b))
    monkeypatch.setattr(metrics, "ssim", lambda a, b: seen.append(("ssim", a.device, b.device)) or real_ssim(a, b))
    meter = QualityMeter(lpips=None, fid=False, device="cpu")
    moved = []
    p, o = _pairs()[0]

    class Tracked(torch.Tensor):
        def to(self, *args, **kwargs):
            moved.append(args[0] if args else kwargs.get("device"))
            return self.as_subclass(torch.Tensor).to(*args, **kwargs)

    meter.add_many([(p.as_subclass(Tracked), o.as_subclass(Tracked))])
    assert moved == [meter.device, meter.device]
    assert [s[0] for s in seen] == ["psnr", "ssim"] and all(d == meter.device for s in seen for d in s[1:])


def test_fid_note_until_2048_images(monkeypatch):
    assert metrics.FID_MIN_IMAGES == 2048
    pairs = _pairs()[:6]

    def run():
        m = QualityMeter(lpips=None, fid_model=_FeatNet())
        m.add_many(pairs)
        return m.summary()

    s = run()
    assert s["fid"] is not None and "FID over 6 images is strongly biased" in s["fid_note"]
    assert "at least 2048" in s["fid_note"] and "feature size" in s["fid_note"]
    monkeypatch.setattr(metrics, "FID_MIN_IMAGES", 6)  # a set as large as the cutoff: no size caveat
    s = run()
    assert "strongly biased" not in (s.get("fid_note") or "")


# ------------------------------------------------------------------------------ API attempts
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


# ------------------------------------------------------------------------------ CLI errors
def test_cli_error_messages_and_tracebacks_are_redacted(capsys, monkeypatch):
    from facepriv.core.secrets import register_secret
    from facepriv.cli import common
    from facepriv.core.errors import ConfigError

    secret = "sk-review-7f3a9c1e5b"
    register_secret(secret)

    def boom():
        try:
            raise OSError(f"connect failed for key {secret}")
        except OSError as exc:
            raise RuntimeError(f"request https://x/compare?api_key=plainvalue99&sig={secret} failed") from exc

    for verbose in (False, True):
        monkeypatch.setattr(common.state, "verbose", verbose)
        with pytest.raises(typer.Exit) as info:
            common.handle_errors(boom)()
        assert info.value.exit_code == common.FAILURE_EXIT
        err = capsys.readouterr().err
        assert secret not in err and "plainvalue99" not in err
        assert "RuntimeError" in err and "api_key=***" in err and "sig=***" in err
        if verbose:  # the traceback is printed, chained cause included, with its message redacted
            assert "Traceback" in err and "OSError" in err and "connect failed for key ***" in err

    def bad_option():
        raise ConfigError(f"--api-endpoint https://user:{secret}@host is not allowed")

    monkeypatch.setattr(common.state, "verbose", False)
    with pytest.raises(typer.Exit) as info:
        common.handle_errors(bad_option)()
    assert info.value.exit_code == common.USAGE_EXIT
    err = capsys.readouterr().err
    assert secret not in err and "https://user:***@host" in err
