"""End-to-end audits of real photos with the real recognition models (dlib-resnet, sface):
clean photos are not protected, blurred ones are, and every section of the report is filled.
"""

from __future__ import annotations

import csv
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

from facepriv.audit import run_audit

from .helpers import real_audit_cfg


def blur(src: Path, dst: Path, sigma: float = 12.0) -> None:
    import kornia

    x = torch.from_numpy(np.asarray(Image.open(src).convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255
    k = int(sigma * 3) * 2 + 1
    y = kornia.filters.gaussian_blur2d(x, (k, k), (sigma, sigma))
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((y[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(dst)


@pytest.mark.realmodels
def test_clean_vs_clean_is_not_protected(tmp_path, photo_sets, real_models, mtcnn):
    orig, gal = photo_sets
    rep = run_audit(real_audit_cfg(orig, orig, gallery=gal, out=tmp_path / "rep"), recognizers=real_models,
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
def test_blurred_photos_are_protected_and_reported(tmp_path, photo_sets, real_models, mtcnn):
    orig, gal = photo_sets
    prot = tmp_path / "prot"
    for n in ("obama.jpg", "obama2.jpg", "biden.jpg"):
        blur(orig / n, prot / n.replace(".jpg", ".png"))
    shutil.copy(fixture_path("group.jpg"), orig / "group.jpg")
    blur(orig / "group.jpg", prot / "group.png", sigma=8)
    target = tmp_path / "target"
    target.mkdir()
    shutil.copy(orig / "biden.jpg", target / "used.jpg")
    shutil.copy(fixture_path("obama2.jpg"), target / "other.jpg")
    out = tmp_path / "rep"
    rep = run_audit(real_audit_cfg(prot, orig, gallery=gal, target=target, target_used=[target / "used.jpg"],
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
