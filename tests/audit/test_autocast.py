"""Autocast in the embedding pipeline: kept per model only where its embeddings stay within
AMP_MIN_COSINE of float32 (and finite), dtypes tried in order (fp16 then bf16 on CUDA),
re-checked every few batches and turned off when it drifts.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fixture_path
from PIL import Image
from torch import nn

from facepriv.audit.embed import AMP_MIN_COSINE, FaceEmbeddingCache, default_amp_dtypes
from facepriv.core.align import align_faces, get_template

from .helpers import TinyRecognizer, random_image


class _AutocastDrift(nn.Module):
    """A model whose autocast output differs from its float32 output by a known angle.

    Float32: ``out = proj(pooled colours)``. Under autocast it returns ``out + t*|out|*v`` with ``v``
    a unit vector orthogonal to ``out``, so the cosine between the two is exactly 1/sqrt(1+t^2);
    ``t = nan`` returns non-finite values. The arithmetic itself runs with autocast disabled, so
    bf16 rounding never blurs the constructed difference.
    """

    def __init__(self, t: float):
        super().__init__()
        self.spec = TinyRecognizer().spec
        self.proj = nn.Linear(48, 12)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(5))
        torch.nn.init.zeros_(self.proj.bias)
        self.requires_grad_(False)
        self.t = t

    def clean(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1))

    def forward(self, x):
        autocast = torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", enabled=False):
            out = self.clean(x)
            if not autocast:
                return out
            if math.isnan(self.t):
                return torch.full_like(out, float("nan"))
            u = torch.zeros_like(out)
            u[:, 0] = 1.0
            v = u - (u * out).sum(-1, keepdim=True) * out / (out * out).sum(-1, keepdim=True)
            v = v / v.norm(dim=-1, keepdim=True)
            return out + self.t * out.norm(dim=-1, keepdim=True) * v


def test_amp_is_kept_only_where_it_does_not_change_embeddings(tmp_path):
    """The first batch decides: autocast is kept when its embeddings stay within AMP_MIN_COSINE of
    float32 (and finite), refused otherwise; later batches follow the decision."""
    from facepriv.audit.embed import AMP_MIN_COSINE
    from facepriv.core.align import align_faces

    crops = [random_image(tmp_path / f"c{i}.png", seed=i) for i in range(5)]
    # cosines 1/sqrt(1+t^2): t_small just above the limit, t_big just below it
    t_small = math.sqrt(1 / AMP_MIN_COSINE**2 - 1) * 0.5
    t_big = math.sqrt(1 / AMP_MIN_COSINE**2 - 1) * 2.0
    models = {"exact": _AutocastDrift(0.0), "small": _AutocastDrift(t_small), "big": _AutocastDrift(t_big),
              "nan": _AutocastDrift(float("nan")), "noisy": TinyRecognizer(unstable=True)}
    cache = FaceEmbeddingCache(models, aligned=True, amp=True, amp_dtype=torch.bfloat16, batch_size=2)
    res = cache.process(crops, progress=False)
    notes = cache.amp_report()
    for kept in ("exact", "small"):
        assert notes[kept].startswith("on (torch.bfloat16"), notes[kept]
    for refused in ("big", "nan", "noisy"):
        assert notes[refused].startswith("off (autocast changed embeddings"), notes[refused]
    assert cache.amp_state == {"exact": True, "small": True, "big": False, "nan": False, "noisy": False}
    # the reported minimum cosine is the constructed one
    cos_of = lambda n: float(re.search(r"min cosine(?: to float32)? (\S+?)\)", notes[n]).group(1))  # noqa: E731
    assert cos_of("exact") == pytest.approx(1.0, abs=1e-6)
    assert cos_of("small") == pytest.approx(1 / math.sqrt(1 + t_small**2), abs=2e-6)
    assert cos_of("big") == pytest.approx(1 / math.sqrt(1 + t_big**2), abs=2e-6)
    assert cos_of("big") < AMP_MIN_COSINE <= cos_of("small")
    # embeddings: a kept model gives its autocast output in every batch, a refused one float32
    for c in crops:
        r = res[c.resolve()]
        x = torch.from_numpy(np.array(Image.open(c).convert("RGB"))).permute(2, 0, 1).float() / 255
        a = align_faces(x, torch.from_numpy(r.faces[0].landmarks[None]), "arcface-112").crops
        with torch.no_grad():
            for n in ("small", "big"):
                m = models[n]
                f32 = m(a)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    amp = m(a)
                want = amp if n == "small" else f32
                torch.testing.assert_close(r.embeddings[n], want, atol=1e-5, rtol=1e-5)
                assert not torch.allclose(amp, f32, atol=1e-6)  # the two really differ
            torch.testing.assert_close(r.embeddings["noisy"], TinyRecognizer(unstable=True)(a), atol=1e-5, rtol=1e-5)
            assert torch.isfinite(r.embeddings["nan"]).all()
    # autocast is off by default on CPU and never checked
    off = FaceEmbeddingCache({"x": TinyRecognizer()}, aligned=True)
    assert off.amp_report()["x"] == "off" and off.amp_state == {"x": False}


# cosine 1/sqrt(1+t^2) of the drifted embedding: just above / well below the bar
T_SMALL = math.sqrt(1 / AMP_MIN_COSINE**2 - 1) * 0.5
T_BIG = math.sqrt(1 / AMP_MIN_COSINE**2 - 1) * 3.0


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
    files = [fixture_path(n) for n in ("obama.jpg", "obama2.jpg", "biden.jpg")]
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
