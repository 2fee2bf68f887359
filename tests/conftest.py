"""Shared fixtures: real photos, generated edge-case files, and an isolated model cache."""

from __future__ import annotations

import io
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PORTRAITS = ("obama.jpg", "obama2.jpg", "biden.jpg")


@pytest.fixture(autouse=True)
def _deterministic():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test (modules opt in with ``pytestmark``): the test machine
    is shared, and one thread is several times faster than two under load."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fixture_path(name: str) -> Path:
    """A real photo: tests/fixtures first, then ../shared (skips only if neither exists)."""
    p = FIXTURES / name
    if p.exists():
        return p
    for sub in ("data/portraits", "data/deepface-pairs"):
        q = SHARED / sub / name
        if q.exists():
            return q
    pytest.skip(f"{name} not found in tests/fixtures or ../shared")


def load_rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(fixture_path(name)).convert("RGB"))


@pytest.fixture(scope="session")
def mtcnn():
    from facepriv.models import create_model

    return create_model("mtcnn")


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """A private FACEPRIV_HOME (for tests that import/convert models)."""
    home = tmp_path / "home"
    monkeypatch.setenv("FACEPRIV_HOME", str(home))
    return home


# ----------------------------------------------------------------------------- edge cases
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims huge dimensions (decompression-bomb shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def gps_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "FaceprivCam"  # Make
    exif[0x0110] = "Model X"  # Model
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0), 3: "W", 4: (0.0, 7.0, 0.0)}  # GPS IFD
    return exif


def make_edge_cases(folder: Path) -> dict[str, Path]:
    """Write the edge-case files the foundation must handle; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    face = Image.open(fixture_path("obama.jpg")).convert("RGB")
    buf = io.BytesIO()
    face.save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    files: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        (folder / name).write_bytes(data)
        files[name] = folder / name

    put("empty.jpg", b"")
    put("text.jpg", b"this is not an image, just text with a .jpg name\n")
    put("truncated.jpg", jpeg[: len(jpeg) // 2])
    rng = np.random.default_rng(0)
    corrupt = bytearray(jpeg[:20]) + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    put("corrupt.jpg", bytes(corrupt))
    put("huge.png", _png_header_only(60000, 60000))
    # 16-bit RGB PNG via OpenCV (Pillow cannot write 16-bit RGB)
    import cv2

    arr16 = (np.asarray(face).astype(np.uint16) * 257)
    arr16[0, 0] = [1, 2, 3]  # a value that only exists at 16 bit
    cv2.imwrite(str(folder / "deep16.png"), arr16[..., ::-1])
    files["deep16.png"] = folder / "deep16.png"
    face.convert("CMYK").save(folder / "cmyk.jpg", quality=92)
    files["cmyk.jpg"] = folder / "cmyk.jpg"
    rgba = face.convert("RGBA")
    alpha = np.full((face.height, face.width), 255, np.uint8)
    alpha[:, : face.width // 4] = 64
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(folder / "rgba.png")
    files["rgba.png"] = folder / "rgba.png"
    face.convert("L").save(folder / "grey.png")
    files["grey.png"] = folder / "grey.png"
    # EXIF orientation 6: stored rotated 90 deg counter-clockwise, displayed upright.
    exif = gps_exif()
    exif[0x0112] = 6
    face.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.jpg", quality=92, exif=exif.tobytes())
    files["rotated.jpg"] = folder / "rotated.jpg"
    face.save(folder / "gps.jpg", quality=92, exif=gps_exif().tobytes())
    files["gps.jpg"] = folder / "gps.jpg"
    yy, xx = np.mgrid[0:240, 0:320]
    grad = np.stack([xx * 255 // 319, yy * 255 // 239, np.full_like(xx, 128)], -1).astype(np.uint8)
    Image.fromarray(grad).save(folder / "noface.png")
    files["noface.png"] = folder / "noface.png"
    face.save(folder / "photo.webp", quality=90)
    files["photo.webp"] = folder / "photo.webp"
    face.save(folder / "photo.bmp")
    files["photo.bmp"] = folder / "photo.bmp"
    face.save(folder / "photo.tiff")
    files["photo.tiff"] = folder / "photo.tiff"
    return files


@pytest.fixture
def edge_cases(tmp_path) -> dict[str, Path]:
    return make_edge_cases(tmp_path / "edge")


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, peak: float = 1.0) -> float:
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double()
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


os.environ.setdefault("FACEPRIV_QUIET", "1")
