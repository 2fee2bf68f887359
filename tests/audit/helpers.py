"""Helpers shared by the audit tests: fake recognisers with known similarities, solid-colour and
random images, audit configurations, a thresholds file, and a stand-in for a machine without a
network. Fixtures live in ``conftest.py`` beside this module."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image
from rich.console import Console
from torch import nn

from facepriv.audit import AuditConfig, run_audit


# what a failed download must never print (connection errors, tracebacks)
CONNECTION_TEXT = re.compile(r"HTTPSConnectionPool|Max retries|NameResolution|Traceback|could not download")

# FAR thresholds of CalibratedMeanColour
CALIBRATED = {"1e-1": 0.9, "1e-2": 0.95, "1e-3": 0.99}


# ------------------------------------------------------------------------------ fake recognisers
class MeanColour(nn.Module):
    """A fake recogniser whose similarities are known in advance: the embedding of a crop is the
    mean RGB of its centre, so two solid-colour crops have the cosine of their colours."""

    def __init__(self, name: str = "mean-colour", thresholds: dict | None = None,
                 threshold_source: str | None = None):
        super().__init__()
        self.spec = type("S", (), {"template": "arcface-112", "input_size": (112, 112), "metric": "cosine",
                                   "name": name, "thresholds": dict(thresholds or {}),
                                   "threshold_source": threshold_source, "architecture": "mean colour",
                                   "runtime": "torch"})()

    def forward(self, x):
        return x[:, :, 28:84, 28:84].mean((2, 3))


class CalibratedMeanColour(MeanColour):
    """MeanColour with FAR thresholds of its own (``CALIBRATED``)."""

    def __init__(self, name: str = "mean-colour"):
        super().__init__(name, CALIBRATED, "test")


class TinyRecognizer(nn.Module):
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


def colour_cos(a, b) -> float:
    """The cosine of two colours: what MeanColour gives for two solid crops."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------------------ images
def solid(path: Path, rgb, size: int = 112) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), rgb, dtype=np.uint8)).save(path)
    return path


def random_image(p: Path, seed: int = 0) -> Path:
    """An 8x8 random image, in the format its suffix names."""
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(p)
    return p


def noise_image(path: Path, w: int, h: int, seed: int = 0, fmt: str = "PNG") -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


# ------------------------------------------------------------------------------ audits
def audit_cfg(protected, original, **kw) -> AuditConfig:
    """A quick audit: CPU, no progress bar, no quality metrics, the MeanColour model."""
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    kw.setdefault("quality", False)
    kw.setdefault("models", ["mean-colour"])
    return AuditConfig(protected=protected, original=original, **kw)


def real_audit_cfg(protected, original, **kw) -> AuditConfig:
    """An audit with the real dlib-resnet and sface models, without LPIPS and FID."""
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    kw.setdefault("lpips", None)
    kw.setdefault("fid", False)
    return AuditConfig(protected=protected, original=original, models=["dlib-resnet", "sface"], **kw)


def audit_crops(crops, out, **kw):
    """Audit the ``colour_crops`` fixture; by default with a "strict" MeanColour that a and b escape."""
    prot, orig = crops
    recognizers = kw.pop("recognizers", None) or {
        "strict": MeanColour("strict", {"1e-1": 0.7, "1e-2": 0.8, "1e-3": 0.9}, "test")}  # a and b protected
    cfg = AuditConfig(protected=prot, original=orig, models=list(recognizers), aligned=True, progress=False,
                      device="cpu", out=out, **kw)
    return run_audit(cfg, recognizers=recognizers)


def write_thresholds(path: Path, model: str, values: dict) -> Path:
    path.write_text(json.dumps({model: values}))
    return path


def render_text(renderable, width: int) -> str:
    """What a rich renderable prints on a terminal ``width`` columns wide."""
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


# ------------------------------------------------------------------------------ no network
def no_network(monkeypatch, calls: list | None = None):
    """Every HTTP request fails the way it does without a network (a long urllib3 message)."""
    msg = ("HTTPSConnectionPool(host='download.pytorch.org', port=443): Max retries exceeded with url: "
           "/models/alexnet-owt-7be5be79.pth (Caused by NameResolutionError(\"HTTPSConnection(host="
           "'download.pytorch.org', port=443): Failed to resolve 'download.pytorch.org' ([Errno -2] Name or "
           "service not known)\"))")

    def get(url, *a, **kw):
        if calls is not None:
            calls.append(url)
        raise requests.ConnectionError(msg)

    monkeypatch.setattr(requests, "get", get)
    monkeypatch.setattr(requests.Session, "get", lambda self, url, *a, **kw: get(url))
