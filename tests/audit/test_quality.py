"""Image quality: PSNR, SSIM, LPIPS and FID (pytorch-fid's Frechet distance, its size caveat and
its failures), batched per shape on the meter's device, and the audit's read-ahead that feeds
the meter in chunks bounded by pixels.
"""

from __future__ import annotations

import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from facepriv.audit import metrics, run_audit
from facepriv.audit.metrics import QualityMeter, psnr, ssim

from .helpers import CalibratedMeanColour, audit_cfg


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


def test_fid_uses_pytorch_fid_and_reports_its_failures(monkeypatch, capsys):
    from pytorch_fid import fid_score

    from facepriv.audit.metrics import QualityMeter, frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (40, 6)), rng.normal(0.5, 1.2, (40, 6))
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    d, note = frechet_distance(*args)
    with warnings.catch_warnings():  # scipy's DeprecationWarning about pytorch-fid's sqrtm(disp=False)
        warnings.simplefilter("ignore")
        direct = float(fid_score.calculate_frechet_distance(*args))
    assert d == pytest.approx(direct) and note is None

    class Feat(nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 32, 32, generator=g) for _ in range(4)]

    def singular(mu1, s1, mu2, s2, eps=1e-6):  # pytorch-fid's own words for a singular product
        print("fid calculation produces singular product; adding 1e-06 to diagonal of cov estimates")
        return 1.25

    monkeypatch.setattr(fid_score, "calculate_frechet_distance", singular)
    m = QualityMeter(lpips=None, fid_model=Feat())
    for im in imgs:
        m.add(im, (im * 0.9).clamp(0, 1))
    s = m.summary()
    assert s["fid"] == 1.25 and "singular product" in s["fid_note"]
    assert "singular" not in capsys.readouterr().out  # never on stdout (it would break --json)

    def imaginary(*a, **k):
        raise ValueError("Imaginary component 3.2")

    monkeypatch.setattr(fid_score, "calculate_frechet_distance", imaginary)
    m = QualityMeter(lpips=None, fid_model=Feat())
    for im in imgs:
        m.add(im, (im * 0.9).clamp(0, 1))
    s = m.summary()
    assert s["fid"] is None and "Imaginary component 3.2" in s["unavailable"]["fid"]
    assert s["psnr"] is not None and s["ssim"] is not None  # the other metrics still run


# ------------------------------------------------------------------------------ batches
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


# ------------------------------------------------------------------------------ read-ahead in the audit
class _BatchMeter(QualityMeter):
    """The real PSNR / SSIM meter with an all-or-nothing ``add_many`` that records its chunks;
    images under 16 px are refused (by ``add`` and, for the whole chunk, by ``add_many``)."""

    def __init__(self):
        super().__init__(lpips=None, fid=False)
        self.chunks: list[int] = []

    def _rows(self, pairs):
        if any(min(a.shape[-2:]) < 16 for a, _ in pairs):
            raise ValueError("image too small")
        base = getattr(QualityMeter, "add_many", None)
        return base(self, pairs) if base else [QualityMeter.add(self, a, b) for a, b in pairs]

    def add(self, protected, original):
        return self._rows([(protected, original)])[0]

    def add_many(self, pairs):
        self.chunks.append(len(pairs))
        return self._rows(pairs)


def test_quality_reads_ahead_and_feeds_add_many_in_batches(tmp_path, monkeypatch):
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    rng = np.random.default_rng(0)
    for k in range(7):
        a = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        b = np.clip(a.astype(int) + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
        orig.mkdir(exist_ok=True)
        prot.mkdir(exist_ok=True)
        Image.fromarray(a).save(orig / f"{k}.png")
        Image.fromarray(b).save(prot / f"{k}.png")
    (prot / "3.png").write_bytes(b"not an image")  # fails only its own row
    kw = dict(aligned=True, quality=True, batch_size=2, workers=2)
    rep_b = run_audit(audit_cfg(prot, orig, **kw), recognizers={"mean-colour": CalibratedMeanColour()},
                      quality_meter=(meter := _BatchMeter()))
    plain = QualityMeter(lpips=None, fid=False)
    rep_p = run_audit(audit_cfg(prot, orig, **kw), recognizers={"mean-colour": CalibratedMeanColour()}, quality_meter=plain)
    assert meter.chunks == [2, 2, 2]  # 6 readable pairs in chunks of --batch-size
    qb = {r["protected"]: r["quality"] for r in rep_b["images"]}
    qp = {r["protected"]: r["quality"] for r in rep_p["images"]}
    assert "error" in qb["3.png"] and set(qb) == {f"{k}.png" for k in range(7)}
    for k in (0, 1, 2, 4, 5, 6):
        assert qb[f"{k}.png"] == qp[f"{k}.png"] and qb[f"{k}.png"]["psnr"] > 0
    assert rep_b["quality"]["psnr"] == rep_p["quality"]["psnr"] and rep_b["quality"]["n"] == 6

    # a chunk the meter refuses is redone pair by pair: only the pair at fault fails
    small = tmp_path / "small"
    shutil.copytree(prot, small)
    (small / "3.png").unlink()
    Image.fromarray(np.full((8, 8, 3), 100, dtype=np.uint8)).save(small / "5.png")
    meter2 = _BatchMeter()
    rep = run_audit(audit_cfg(small, orig, **kw), recognizers={"mean-colour": CalibratedMeanColour()}, quality_meter=meter2)
    q = {r["protected"]: r["quality"] for r in rep["images"]}
    assert q["5.png"] == {"error": "image too small"}
    assert all(q[f"{k}.png"] == qp[f"{k}.png"] for k in (0, 1, 2, 4, 6))
    assert rep["quality"]["n"] == 5  # the refused chunk's other pair was added once, not twice


def test_quality_memory_is_bounded_by_pixels_not_by_batch_size(tmp_path, monkeypatch):
    """Full-size photos must not be held by the batch: chunks stop at QUALITY_CHUNK_PIXELS, the
    read-ahead holds at most workers + 2 decoded pairs, and only the chunk being measured is float."""
    import facepriv.audit.quality as quality

    orig, prot = tmp_path / "orig", tmp_path / "prot"
    orig.mkdir()
    prot.mkdir()
    rng = np.random.default_rng(1)
    for k in range(12):
        a = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(a).save(orig / f"{k}.png")
        Image.fromarray(255 - a).save(prot / f"{k}.png")
    pair_px = 2 * 40 * 48
    monkeypatch.setattr(quality, "QUALITY_CHUNK_PIXELS", 3 * pair_px)  # three pairs fit, a fourth does not
    loaded, floats_live, peak = [0], [0], {"loaded_not_fed": 0, "float": 0}
    real_load = quality.load_image

    def counting_load(path, **kw):
        loaded[0] += 1
        return real_load(path, **kw)

    monkeypatch.setattr(quality, "load_image", counting_load)

    class Meter(_BatchMeter):
        fed = 0

        def add_many(self, pairs):
            floats_live[0] = 2 * len(pairs)
            peak["float"] = max(peak["float"], floats_live[0])
            peak["loaded_not_fed"] = max(peak["loaded_not_fed"], loaded[0] - 2 * self.fed)
            Meter.fed += len(pairs)
            return super().add_many(pairs)

    meter = Meter()
    kw = dict(aligned=True, quality=True, batch_size=32, workers=2)
    rep = run_audit(audit_cfg(prot, orig, **kw), recognizers={"mean-colour": CalibratedMeanColour()}, quality_meter=meter)
    assert meter.chunks == [3, 3, 3, 3]  # cut by pixels, not at --batch-size 32
    assert peak["float"] == 6  # one chunk of float images at a time
    # decoded but not yet measured: the chunk (3 pairs), the pair that closed it, and the
    # read-ahead (workers + 2 = 4 pairs); with --batch-size 32 the old code held 2 x 32 + 32
    assert peak["loaded_not_fed"] <= 2 * (3 + 1 + 4)
    assert rep["quality"]["n"] == 12
