"""facepriv audit: thresholds and calibration, metrics, input matching, the embedding pipeline,
end-to-end audits on real photos with real recognition models, reports and the CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fixture_path
from PIL import Image
from torch import nn

from facepriv.audit import AuditConfig, calibrate_scores, resolve_thresholds, run_audit
from facepriv.audit import inputs as inp
from facepriv.audit.embed import FaceEmbeddingCache
from facepriv.audit.metrics import QualityMeter, identity_rank, match_faces, psnr, psr, rank_k, ssim
from facepriv.models.thresholds import FARS, auc_score, eer, far_threshold, roc_curve, store_calibration
from facepriv.core.errors import ConfigError


@pytest.fixture(autouse=True)
def _private_thresholds(tmp_path, monkeypatch):
    """Calibrations go to a private folder; quality weights are never downloaded in tests."""
    monkeypatch.setenv("FACEPRIV_THRESHOLDS_DIR", str(tmp_path / "thresholds"))
    monkeypatch.setenv("FACEPRIV_OFFLINE", "1")


# ------------------------------------------------------------------------------ thresholds
def test_far_threshold_is_the_lowest_threshold_within_the_far():
    rng = np.random.default_rng(0)
    imp = rng.normal(0, 1, 5000)
    for far in (1e-1, 1e-2, 1e-3):
        t, note = far_threshold(imp, far)
        assert note is None
        assert (imp >= t).mean() <= far
        # any lower threshold at the next impostor score would exceed the FAR
        below = np.sort(imp)[::-1][int(far * len(imp))]
        assert (imp >= below).mean() > far and below < t
    t, note = far_threshold(imp[:200], 1e-3)
    assert t > imp[:200].max() and "only 200 impostor pairs" in note


def test_roc_auc_eer_on_known_scores():
    gen = [0.9, 0.8, 0.7, 0.4]
    imp = [0.5, 0.3, 0.2, 0.1]
    fpr, tpr, thr = roc_curve(gen, imp)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1 and thr[0] == np.inf
    # AUC = P(genuine > impostor) = 15/16 (only 0.4 < 0.5 is mis-ordered)
    assert auc_score(fpr, tpr) == pytest.approx(15 / 16)
    rate, t = eer(gen, imp)
    assert rate == pytest.approx(0.25) and 0.4 <= t <= 0.5
    rng = np.random.default_rng(1)
    g, i = rng.normal(2, 1, 400), rng.normal(0, 1, 600)
    mw = (g[:, None] > i[None, :]).mean()
    f, tp, _ = roc_curve(g, i)
    assert auc_score(f, tp) == pytest.approx(mw, abs=1e-9)
    cal = calibrate_scores(g, i, default_threshold=1.0)
    assert set(cal["thresholds"]) == set(FARS)
    assert cal["thresholds"]["1e-1"] < cal["thresholds"]["1e-2"] < cal["thresholds"]["1e-3"]
    assert cal["accuracy_at_default"] == pytest.approx(((g >= 1).sum() + (i < 1).sum()) / 1000)
    assert cal["best_accuracy"] >= cal["accuracy_at_default"]
    assert 0.1 < cal["eer"] < 0.2 and "note" in cal  # 600 impostors cannot resolve FAR 1e-3


def test_threshold_sources_in_order(tmp_path):
    from facepriv.models import get_spec

    # published protocol thresholds
    t = resolve_thresholds("facenet-vggface2")
    assert t.kind == "protocol" and t.values["1e-3"] == pytest.approx(0.591191) and "protocol" in t.source
    # the offline default recognisers ship FAR thresholds calibrated on LFW (spec values, taken as is)
    sface = get_spec("sface")
    t = resolve_thresholds("sface")
    assert t.kind == "protocol" and t.values == {f: sface.thresholds[f] for f in FARS} and "LFW" in t.source
    # a model with only a default operating point (here a stand-in spec) falls back to it loudly
    toy = type("S", (), {"name": "toy-fr", "thresholds": {"default": 0.363}, "threshold_source": "toy default"})()
    t = resolve_thresholds("toy-fr", spec=toy)
    assert t.kind == "default" and set(t.values.values()) == {0.363} and "NOT FAR-calibrated" in t.note
    # a stored calibration is used automatically
    rec = {"model": "toy-fr", "thresholds": {"1e-1": 0.2, "1e-2": 0.3, "1e-3": 0.4}, "source": "calibrated on x.csv"}
    store_calibration("toy-fr", rec)
    t = resolve_thresholds("toy-fr", spec=toy)
    assert t.kind == "calibrated" and t.values == rec["thresholds"] and t.source == "calibrated on x.csv"
    assert resolve_thresholds("facenet-vggface2").kind == "protocol"  # protocol values win over calibration
    # an explicit file overrides everything
    f = tmp_path / "th.json"
    f.write_text(json.dumps({"sface": {"1e-1": 0.1, "1e-2": 0.11, "1e-3": 0.12},
                             "facenet-vggface2": {"default": 0.5}}))
    assert resolve_thresholds("sface", file=f).values["1e-3"] == 0.12
    t = resolve_thresholds("facenet-vggface2", file=f, spec=get_spec("facenet-vggface2"))
    assert t.kind == "file" and set(t.values.values()) == {0.5}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sface": {"1e-1": 0.1}}))
    with pytest.raises(ConfigError, match="1e-2"):
        resolve_thresholds("sface", file=bad)


# ------------------------------------------------------------------------------ metrics
def test_psr_and_identification_metrics():
    th = {"1e-1": 0.2, "1e-2": 0.4, "1e-3": 0.6}
    sims = [0.1, 0.3, 0.5, 0.7, None]  # None: face not detected
    assert psr(sims, th) == {"1e-1": 0.4, "1e-2": 0.6, "1e-3": 0.8}
    assert psr(sims, th, mode="impersonation") == {"1e-1": 0.6, "1e-2": 0.4, "1e-3": 0.2}
    assert psr([], th)["1e-3"] is None
    scores = torch.tensor([0.9, 0.2, 0.5, 0.8, 0.1])
    ids = ["a", "a", "b", "c", "c"]
    assert identity_rank(scores, ids, "a") == 1
    assert identity_rank(scores, ids, "c") == 2 and identity_rank(scores, ids, "b") == 3
    assert identity_rank(scores, ids, "z") is None
    assert identity_rank(torch.tensor([0.5, 0.5]), ["a", "b"], "a") == 2  # ties count against
    assert rank_k([1, 2, 6, None], 1) == 0.25 and rank_k([1, 2, 6, None], 5) == 0.5
    assert match_faces([np.array([0, 0, 10, 10]), np.array([20, 20, 30, 30])],
                       [np.array([21, 21, 31, 31]), np.array([50, 50, 60, 60])]) == [None, 0]


def test_quality_metrics_and_unavailable_weights(isolated_home):
    x = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 64, 80, generator=torch.Generator().manual_seed(1)) * 0.05
    y = (x + noise).clamp(0, 1)
    mse = float(((y - x) ** 2).mean())
    assert psnr(y, x) == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)
    assert psnr(x, x) == math.inf and ssim(x, x) == pytest.approx(1.0, abs=1e-4)
    assert 0.5 < ssim(y, x) < 0.999 and ssim(y, x) > ssim((x + 4 * noise).clamp(0, 1), x)
    # offline with an empty model home: LPIPS and FID cannot get weights, PSNR/SSIM still run
    meter = QualityMeter(lpips="lpips-alex", fid=True)
    meter.add(y, x)
    meter.add(x, x)
    s = meter.summary()
    assert s["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)  # the identical pair (inf) is left out
    assert s["n_identical"] == 1 and "1 of 2" in s["psnr_note"]  # ... and counted
    assert s["lpips"] is None and s["fid"] is None
    assert "lpips-alex" in s["unavailable"]["lpips"] and "models import" in s["unavailable"]["lpips"]
    assert "fid-inception" in s["unavailable"]["fid"]


def test_quality_lpips_and_fid_paths_with_injected_networks():
    class Feat(nn.Module):  # a deterministic stand-in feature network (FID needs any fixed features)
        def forward(self, x):
            return torch.cat([x.mean((2, 3)), x.std((2, 3)), F_pool(x)], 1)

    def F_pool(x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    class L1(nn.Module):
        def forward(self, a, b):
            return (a - b).abs().mean((1, 2, 3))

    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 40, 40, generator=g) for _ in range(6)]
    same = QualityMeter(lpips_model=L1(), fid_model=Feat(), lpips="l1")
    noisy = QualityMeter(lpips_model=L1(), fid_model=Feat(), lpips="l1")
    for im in imgs:
        same.add(im, im)
        noisy.add((im + 0.3 * torch.rand(3, 40, 40, generator=g)).clamp(0, 1), im)
    a, b = same.summary(), noisy.summary()
    assert a["lpips"] == 0 and abs(a["fid"]) < 1e-6 and b["lpips"] > 0.05 and b["fid"] > 1e-3
    assert "fid_note" in b and b["unavailable"] == {}


# ------------------------------------------------------------------------------ inputs
def _touch_image(p: Path, seed: int = 0) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(p)
    return p


def test_files_are_matched_by_relative_path_not_order(tmp_path):
    o, p = tmp_path / "orig", tmp_path / "prot"
    for rel in ("b/z.jpg", "a.jpg", "c/y.jpg", "only_orig.jpg"):
        _touch_image(o / rel)
    for rel in ("c/y.png", "a.jpg", "b/z.jpg", "stray.png"):  # suffix changed, different order, one stray
        _touch_image(p / rel)
    pairs, errors = inp.match_files(p, o)
    got = {fp.rel: fp.original_rel for fp in pairs}
    assert got == {"a.jpg": "a.jpg", "b/z.jpg": "b/z.jpg", "c/y.png": "c/y.jpg"}
    assert [e["file"] for e in errors] == ["stray.png"] and "no original" in errors[0]["error"]
    single, _ = inp.match_files(p / "a.jpg", o / "b/z.jpg")
    assert single[0].original == (o / "b/z.jpg").resolve()


def test_pairs_identities_and_gallery(tmp_path):
    root = tmp_path / "imgs"
    for n in ("a1", "a2", "a3", "b1", "c1"):
        _touch_image(root / f"{n}.jpg")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("file_x,file_y,Decision\r\na1.jpg,a2.jpg,Yes\r\na2.jpg,a3.jpg,yes\r\na1.jpg,b1.jpg,No\r\n"
                     "b1.jpg,c1.jpg,different\r\n")
    lp = inp.read_pairs(pairs, root)
    assert [p.same for p in lp] == [True, True, False, False]
    comp = inp.pair_components(lp)
    ids = {p.name: c for p, c in comp.items()}
    assert ids["a1.jpg"] == ids["a2.jpg"] == ids["a3.jpg"] != ids["b1.jpg"] != ids["c1.jpg"]
    tsv = tmp_path / "p.tsv"
    tsv.write_text("a1.jpg\tb1.jpg\t0\n")
    assert inp.read_pairs(tsv, root)[0].same is False
    bad = tmp_path / "bad.csv"
    bad.write_text("a1.jpg,a2.jpg,yes\na1.jpg,a2.jpg,maybe\n")
    with pytest.raises(ConfigError, match="unknown label"):
        inp.read_pairs(bad, root)
    idf = tmp_path / "ids.csv"
    idf.write_text("file,identity\nimgs/a1.jpg,alice\nimgs/b1.jpg,bob\n")
    idx = inp.read_identities(idf)
    assert idx.lookup(root / "a1.jpg") == "alice" and idx.lookup(root / "c1.jpg") is None
    gal = tmp_path / "gal"
    _touch_image(gal / "alice" / "x.jpg")
    _touch_image(gal / "bob" / "sub" / "y.jpg")
    assert sorted((g.path.name, g.identity) for g in inp.read_gallery(gal)) == [("x.jpg", "alice"), ("y.jpg", "bob")]
    _touch_image(gal / "loose.jpg")
    with pytest.raises(ConfigError, match="identity folder"):
        inp.read_gallery(gal)


# ------------------------------------------------------------------------------ embedding pipeline
class _Tiny(nn.Module):
    """A tiny deterministic 'recogniser' (mechanics only): pooled colour features."""

    def __init__(self, template="arcface-112", size=(112, 112), dim=12, unstable=False):
        super().__init__()
        self.spec = type("S", (), {"template": template, "input_size": size, "metric": "cosine", "name": "tiny",
                                   "thresholds": {"default": 0.5}})()
        self.proj = nn.Linear(48, dim)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(3))
        torch.nn.init.zeros_(self.proj.bias)
        self.requires_grad_(False)
        self.unstable = unstable

    def forward(self, x):
        f = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        out = self.proj(f)
        if self.unstable and torch.is_autocast_enabled("cpu"):
            out = out + torch.randn_like(out)  # autocast visibly changes this model's output
        return out


def test_batching_across_images_keeps_every_face_in_place(mtcnn):
    paths = [fixture_path(n) for n in ("group.jpg", "obama.jpg", "biden.jpg", "obama2.jpg")]
    models = {"tiny": _Tiny(), "tiny-dlib": _Tiny("dlib-150", (150, 150), dim=7)}
    one = FaceEmbeddingCache(models, detector=mtcnn, batch_size=1, workers=1).process(paths, progress=False)
    many = FaceEmbeddingCache(models, detector=mtcnn, batch_size=4, workers=2).process(paths, progress=False)
    big = FaceEmbeddingCache(models, detector=mtcnn, batch_size=64).process(paths, progress=False)
    assert len(one[paths[0].resolve()].faces) == 6
    for p in paths:
        for m in models:
            a, b, c = (r[p.resolve()].embeddings[m] for r in (one, many, big))
            assert a.shape == (len(one[p.resolve()].faces), 12 if m == "tiny" else 7)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    # faces are sorted largest first (the primary face)
    areas = [f.width * f.height for f in one[paths[0].resolve()].faces]
    assert areas == sorted(areas, reverse=True)


def test_pipeline_matches_embed_faces_and_aligned_crops(tmp_path, mtcnn):
    from facepriv.core.align import align_faces, landmarks_tensor
    from facepriv.core.io import load_image
    from facepriv.models.recognition import embed_faces

    model = _Tiny()
    p = fixture_path("obama.jpg")
    cache = FaceEmbeddingCache({"tiny": model}, detector=mtcnn)
    res = cache.process([p], progress=False)[p.resolve()]
    x = load_image(p).to_tensor()
    ref = embed_faces(model, x, landmarks_tensor(res.faces))
    torch.testing.assert_close(res.embeddings["tiny"], ref, atol=1e-5, rtol=1e-5)
    # extra landmark sets are embedded too
    res2 = cache.process([p], extra={p: np.stack([f.landmarks for f in res.faces])}, progress=False)[p.resolve()]
    torch.testing.assert_close(res2.extra["tiny"], ref, atol=1e-5, rtol=1e-5)
    # a pre-aligned crop (arcface-112 at 224 px) re-aligned per model gives the same embedding
    crop = align_faces(x, landmarks_tensor(res.faces[:1]), "arcface-112", size=(224, 224)).crops[0]
    cp = tmp_path / "crop.png"
    Image.fromarray((crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(cp)
    al = FaceEmbeddingCache({"tiny": model}, aligned=True).process([cp], progress=False)[cp.resolve()]
    assert len(al.faces) == 1
    cos = torch.nn.functional.cosine_similarity(al.embeddings["tiny"], ref[:1])
    assert float(cos) > 0.999


class _AutocastDrift(nn.Module):
    """A model whose autocast output differs from its float32 output by a known angle.

    Float32: ``out = proj(pooled colours)``. Under autocast it returns ``out + t*|out|*v`` with ``v``
    a unit vector orthogonal to ``out``, so the cosine between the two is exactly 1/sqrt(1+t^2);
    ``t = nan`` returns non-finite values. The arithmetic itself runs with autocast disabled, so
    bf16 rounding never blurs the constructed difference.
    """

    def __init__(self, t: float):
        super().__init__()
        self.spec = _Tiny().spec
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

    crops = [_touch_image(tmp_path / f"c{i}.png", seed=i) for i in range(5)]
    # cosines 1/sqrt(1+t^2): t_small just above the limit, t_big just below it
    t_small = math.sqrt(1 / AMP_MIN_COSINE**2 - 1) * 0.5
    t_big = math.sqrt(1 / AMP_MIN_COSINE**2 - 1) * 2.0
    models = {"exact": _AutocastDrift(0.0), "small": _AutocastDrift(t_small), "big": _AutocastDrift(t_big),
              "nan": _AutocastDrift(float("nan")), "noisy": _Tiny(unstable=True)}
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
            torch.testing.assert_close(r.embeddings["noisy"], _Tiny(unstable=True)(a), atol=1e-5, rtol=1e-5)
            assert torch.isfinite(r.embeddings["nan"]).all()
    # autocast is off by default on CPU and never checked
    off = FaceEmbeddingCache({"x": _Tiny()}, aligned=True)
    assert off.amp_report()["x"] == "off" and off.amp_state == {"x": False}


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def real_models():
    from facepriv.models import create_model

    return {"dlib-resnet": create_model("dlib-resnet"), "sface": create_model("sface")}


def _blur(src: Path, dst: Path, sigma: float = 12.0) -> None:
    import kornia

    x = torch.from_numpy(np.asarray(Image.open(src).convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255
    k = int(sigma * 3) * 2 + 1
    y = kornia.filters.gaussian_blur2d(x, (k, k), (sigma, sigma))
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((y[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(dst)


@pytest.fixture
def photo_sets(tmp_path):
    orig, gal = tmp_path / "orig", tmp_path / "gallery"
    orig.mkdir()
    for n in ("obama.jpg", "obama2.jpg", "biden.jpg"):
        shutil.copy(fixture_path(n), orig / n)
    (gal / "obama").mkdir(parents=True)
    (gal / "biden").mkdir(parents=True)
    shutil.copy(fixture_path("obama.jpg"), gal / "obama" / "o1.jpg")
    shutil.copy(fixture_path("obama2.jpg"), gal / "obama" / "o2.jpg")
    shutil.copy(fixture_path("biden.jpg"), gal / "biden" / "b1.jpg")
    return orig, gal


def _cfg(tmp_path, protected, original, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    kw.setdefault("lpips", None)
    kw.setdefault("fid", False)
    return AuditConfig(protected=protected, original=original, models=["dlib-resnet", "sface"], **kw)


@pytest.mark.realmodels
def test_clean_vs_clean_is_not_protected(tmp_path, photo_sets, real_models, mtcnn):
    orig, gal = photo_sets
    rep = run_audit(_cfg(tmp_path, orig, orig, gallery=gal, out=tmp_path / "rep"), recognizers=real_models,
                    detector=mtcnn)
    for m in real_models:
        d = rep["models"][m]["dodging"]
        # obama <-> obama2 are verified against each other (other-photos); biden has no other photo (self)
        assert d["protocol"] == {"other-photos": 2, "self": 1}
        assert d["psr"]["1e-3"] == 0.0 and d["before"]["psr"]["1e-3"] == 0.0
        ident = rep["models"][m]["identification"]
        assert ident["n"] == 2 and ident["rank1_before"] == ident["rank1_after"] == 1.0
    assert rep["quality"]["psnr"] == math.inf and rep["quality"]["ssim"] == pytest.approx(1.0, abs=1e-4)
    assert rep["quality"]["n_identical"] == 3
    rows = {r["protected"]: r for r in rep["images"]}
    assert rows["obama.jpg"]["identity"] == "obama" and rows["obama.jpg"]["identity_source"] == "gallery"
    f0 = rows["obama.jpg"]["models"]["sface"]["faces"][0]
    assert f0["protocol"] == "other-photos" and rows["obama.jpg"]["references"] == ["obama2.jpg"]  # never itself
    # sface ships FAR thresholds calibrated on LFW: no "NOT FAR-calibrated" fallback
    assert rep["thresholds"]["sface"]["kind"] == "protocol" and "LFW" in rep["thresholds"]["sface"]["source"]
    assert not any("NOT FAR" in n for n in rep["protocol_notes"])


@pytest.mark.realmodels
def test_swapped_files_show_matching_is_by_name(tmp_path, photo_sets, real_models, mtcnn):
    orig, _ = photo_sets
    prot = tmp_path / "prot"
    prot.mkdir()
    # protected/obama.jpg holds biden and vice versa: with name matching both must fail verification
    shutil.copy(orig / "biden.jpg", prot / "obama.jpg")
    shutil.copy(orig / "obama.jpg", prot / "biden.jpg")
    rep = run_audit(_cfg(tmp_path, prot, orig), recognizers=real_models, detector=mtcnn)
    for m in real_models:
        d = rep["models"][m]["dodging"]
        assert d["protocol"] == {"other-photos": 0, "self": 2} and d["psr"]["1e-3"] == 1.0
    assert any("self-verification" in n for n in rep["protocol_notes"])


@pytest.mark.realmodels
def test_blurred_photos_are_protected_and_reported(tmp_path, photo_sets, real_models, mtcnn):
    orig, gal = photo_sets
    prot = tmp_path / "prot"
    for n in ("obama.jpg", "obama2.jpg", "biden.jpg"):
        _blur(orig / n, prot / n.replace(".jpg", ".png"))
    shutil.copy(fixture_path("group.jpg"), orig / "group.jpg")
    _blur(orig / "group.jpg", prot / "group.png", sigma=8)
    target = tmp_path / "target"
    target.mkdir()
    shutil.copy(orig / "biden.jpg", target / "used.jpg")
    shutil.copy(fixture_path("obama2.jpg"), target / "other.jpg")
    out = tmp_path / "rep"
    rep = run_audit(_cfg(tmp_path, prot, orig, gallery=gal, target=target, target_used=[target / "used.jpg"],
                         out=out, utility=True), recognizers=real_models, detector=mtcnn)
    assert rep["counts"]["targets"] == 1  # the photo used to protect is excluded
    assert rep["faces"]["original"] == 3 + 6
    for m in real_models:
        d = rep["models"][m]["dodging"]
        assert d["psr"]["1e-3"] >= 0.8 and d["before"]["psr"]["1e-3"] == 0.0
        assert d["n_faces"] == 9 and d["protocol"]["self"] == 7
        # the target (a copy of obama2.jpg) is obama2's own original and obama's identity: both are
        # left out of impersonation, the other 7 faces are measured
        assert rep["models"][m]["impersonation"]["n"] == 7
        assert rep["models"][m]["impersonation"]["excluded"] == {"own-original": 1, "source-identity": 1}
    assert rep["faces"]["not_detected"] >= 1 and rep["models"]["sface"]["dodging"]["not_detected"] >= 1
    assert 10 < rep["quality"]["psnr"] < 35 and 0 < rep["quality"]["ssim"] < 0.95
    assert rep["quality"]["unavailable"] == {"lpips": "disabled", "fid": "disabled"}
    assert rep["utility"]["face_detected_rate"] < 1.0 and rep["utility"]["n_faces"] >= 1
    # reports: strict JSON, one CSV row per image, a self-contained HTML file
    data = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert data["models"]["sface"]["dodging"]["psr"] == rep["models"]["sface"]["dodging"]["psr"]
    assert set(data) >= {"thresholds", "models", "quality", "images", "errors", "config", "versions"}
    assert data["thresholds"]["dlib-resnet"]["source"] and data["versions"]["models"]["sface"]["weights"]
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["protected"] for r in rows} == {"obama.png", "obama2.png", "biden.png", "group.png"}
    assert rows[0]["sface:protected@1e-3"] in ("True", "False")
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and html.count("data:image/jpeg;base64,") == 12
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", html)


@pytest.mark.realmodels
def test_landmarks_from_original_and_faces_matched_by_iou(tmp_path, real_models, mtcnn):
    orig, prot = tmp_path / "o", tmp_path / "p"
    orig.mkdir()
    shutil.copy(fixture_path("group.jpg"), orig / "group.jpg")
    img = np.asarray(Image.open(orig / "group.jpg").convert("RGB")).copy()
    prot.mkdir()
    Image.fromarray(img).save(prot / "group.png")
    rep = run_audit(_cfg(tmp_path, prot, orig, landmarks="original"), recognizers=real_models, detector=mtcnn)
    faces = rep["images"][0]["models"]["sface"]["faces"]
    assert len(faces) == 6 and all(f["protocol"] == "self" and f["dodging"][0] > 0.99 for f in faces)
    # mirrored: the faces move, IoU matching finds them at their new places
    Image.fromarray(img[:, ::-1].copy()).save(prot / "group.png")
    rep = run_audit(_cfg(tmp_path, prot, orig), recognizers=real_models, detector=mtcnn)
    assert rep["images"][0]["faces_matched"] < 6  # mirrored boxes do not overlap their originals


# ------------------------------------------------------------------------------ CLI
@pytest.mark.realmodels
@pytest.mark.slow
def test_cli_calibrate_then_audit_uses_the_calibration(tmp_path, photo_sets):
    from typer.testing import CliRunner

    from facepriv.cli import app

    orig, gal = photo_sets
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("file_x,file_y,label\nobama.jpg,obama2.jpg,same\nobama.jpg,biden.jpg,different\n"
                     "obama2.jpg,biden.jpg,different\n")
    runner = CliRunner()
    res = runner.invoke(app, ["audit", "calibrate", "--pairs", str(pairs), "--root", str(orig), "--models",
                              "dlib-resnet", "--out", str(tmp_path / "cal.json")])
    assert res.exit_code == 0, res.output
    assert "dlib-resnet" in res.stdout and "AUC" in res.stdout
    stored = json.loads((tmp_path / "thresholds" / "dlib-resnet.json").read_text())
    assert stored["n_genuine"] == 1 and stored["n_impostor"] == 2 and stored["auc"] == 1.0
    assert json.loads((tmp_path / "cal.json").read_text())["models"]["dlib-resnet"]["thresholds"]
    # dlib-resnet ships FAR thresholds calibrated on LFW; a calibration of the user's own comes first
    res = runner.invoke(app, ["--json", "audit", "--protected", str(orig), "--original", str(orig), "--models",
                              "dlib-resnet", "--gallery", str(gal), "--out", str(tmp_path / "rep"), "--no-fid",
                              "--lpips", "none"])
    assert res.exit_code == 0, res.output
    # strict JSON: the infinite PSNR of this clean-vs-clean run is the string "inf", never Infinity
    summary = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert summary["quality"]["psnr"] == "inf" and summary["quality"]["n_identical"] == 3
    th = summary["thresholds"]["dlib-resnet"]
    assert th["kind"] == "calibrated" and th["1e-3"] == pytest.approx(stored["thresholds"]["1e-3"])
    assert summary["models"]["dlib-resnet"]["dodging"]["psr"]["1e-3"] == 0.0
    # human output and usage errors
    res = runner.invoke(app, ["audit", "--protected", str(orig), "--original", str(orig), "--models", "dlib-resnet",
                              "--out", str(tmp_path / "rep2"), "--no-quality"])
    assert res.exit_code == 0 and "dodging" in res.stdout and "calibrated" in res.stdout
    assert runner.invoke(app, ["audit", "--protected", str(orig)]).exit_code == 2
    assert runner.invoke(app, ["audit", "--protected", str(orig), "--original", str(tmp_path / "nope"),
                               "--models", "sface"]).exit_code == 2
    assert runner.invoke(app, ["audit", "--protected", str(orig), "--original", str(orig), "--models",
                               "mtcnn"]).exit_code == 2


def test_model_without_any_threshold_still_reports_similarities(monkeypatch, tmp_path):
    """No protocol, calibration or default: the audit goes on, success rates are None, never invented."""
    from facepriv.audit.metrics import psr
    from facepriv.models.thresholds import resolve_thresholds
    from facepriv.models import get_spec

    monkeypatch.setenv("FACEPRIV_THRESHOLDS_DIR", str(tmp_path))
    spec = dataclasses.replace(get_spec("arcface-r100"), name="no-threshold-fr", thresholds={})
    ts = resolve_thresholds("no-threshold-fr", spec=spec)
    assert ts.kind == "none" and all(v is None for v in ts.values.values()) and "calibrate" in ts.note
    assert psr([0.1, 0.9, None], ts.values) == {"1e-1": None, "1e-2": None, "1e-3": None}
