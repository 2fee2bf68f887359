"""Image I/O: formats, edge cases, metadata stripping, atomic writes, input protection."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from facepriv.core import io as fio
from facepriv.core.errors import ImageLoadError, ImageTooLargeError

BAD = {
    "empty.jpg": "empty",
    "text.jpg": "not an image",
    "truncated.jpg": "truncated",
    "corrupt.jpg": "not an image",
    "huge.png": "decompression-bomb",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_raise_clear_errors(edge_cases, name):
    with pytest.raises(ImageLoadError) as exc:
        fio.load_image(edge_cases[name])
    assert BAD[name] in str(exc.value)
    assert name in str(exc.value)


def test_bomb_guard_is_configurable(edge_cases):
    with pytest.raises(ImageTooLargeError):
        fio.load_image(edge_cases["huge.png"])
    img = fio.load_image(edge_cases["noface.png"])
    with pytest.raises(ImageTooLargeError, match="--max-pixels"):
        fio.load_image(edge_cases["noface.png"], max_pixels=img.rgb.shape[0] * img.rgb.shape[1] - 1)


@pytest.mark.parametrize("name", ["photo.webp", "photo.bmp", "photo.tiff", "gps.jpg", "noface.png"])
def test_common_formats_load(edge_cases, name):
    img = fio.load_image(edge_cases[name])
    assert img.rgb.dtype == np.uint8 and img.rgb.ndim == 3 and img.rgb.shape[2] == 3
    assert img.bit_depth == 8


def test_exif_orientation_is_applied(edge_cases):
    upright = fio.load_image(edge_cases["gps.jpg"])
    rotated = fio.load_image(edge_cases["rotated.jpg"])
    assert rotated.rgb.shape == upright.rgb.shape  # stored transposed, displayed upright
    diff = np.abs(rotated.rgb.astype(int) - upright.rgb.astype(int)).mean()
    assert diff < 3.0  # same picture up to JPEG noise


def test_sixteen_bit_png_roundtrip(edge_cases, tmp_path):
    img = fio.load_image(edge_cases["deep16.png"])
    assert img.bit_depth == 16 and img.high is not None and img.high.dtype == np.uint16
    assert tuple(img.high[0, 0]) == (1, 2, 3)
    x = img.to_tensor()
    assert abs(float(x[0, 0, 0]) - 1 / 65535) < 1e-7  # full depth reaches the processing
    out = fio.save_image(img.with_pixels(x), tmp_path / "o.png")
    back = fio.load_image(out)
    assert back.bit_depth == 16 and tuple(back.high[0, 0]) == (1, 2, 3)
    assert np.array_equal(back.high, img.high)


def test_cmyk_and_grey_and_rgba(edge_cases, tmp_path):
    ref = fio.load_image(edge_cases["gps.jpg"]).rgb.astype(int)
    cmyk = fio.load_image(edge_cases["cmyk.jpg"])
    assert cmyk.rgb.shape == ref.shape and np.abs(cmyk.rgb.astype(int) - ref).mean() < 12
    grey = fio.load_image(edge_cases["grey.png"])
    assert grey.grey and np.array_equal(grey.rgb[..., 0], grey.rgb[..., 1])
    out = fio.save_image(grey, tmp_path / "g.png")
    assert Image.open(out).mode == "L"
    rgba = fio.load_image(edge_cases["rgba.png"])
    assert rgba.alpha is not None and rgba.alpha[0, 0] == 64 and rgba.alpha[0, -1] == 255
    out = fio.save_image(rgba, tmp_path / "a.png")
    with Image.open(out) as im:
        assert im.mode == "RGBA" and np.array_equal(np.asarray(im)[..., 3], rgba.alpha)
    out = fio.save_image(rgba, tmp_path / "a.jpg")  # JPEG has no alpha: dropped, not an error
    with Image.open(out) as im:
        assert im.mode == "RGB"


def test_metadata_stripped_by_default_and_gps_never_kept(edge_cases, tmp_path):
    img = fio.load_image(edge_cases["rotated.jpg"])
    assert img.exif.get(0x010F) == "FaceprivCam"
    out = fio.save_image(img, tmp_path / "clean.jpg")
    with Image.open(out) as im:
        exif = im.getexif()
        assert len(exif) == 0
        assert "exif" not in im.info and "comment" not in im.info
    kept = fio.save_image(img, tmp_path / "kept.jpg", keep_metadata=True)
    with Image.open(kept) as im:
        exif = im.getexif()
        assert exif.get(0x010F) == "FaceprivCam"
        assert 0x8825 not in exif and not exif.get_ifd(0x8825)  # no GPS, ever
        assert exif.get(0x0112, 1) == 1  # orientation baked into the pixels
        assert im.size == (img.rgb.shape[1], img.rgb.shape[0])


def test_jpeg_quality_option(edge_cases, tmp_path):
    img = fio.load_image(edge_cases["gps.jpg"])
    hi = fio.save_image(img, tmp_path / "hi.jpg", quality=95)
    lo = fio.save_image(img, tmp_path / "lo.jpg", quality=40)
    assert os.path.getsize(lo) < os.path.getsize(hi)


def test_never_overwrites_input(edge_cases):
    src = edge_cases["gps.jpg"]
    before = src.read_bytes()
    img = fio.load_image(src)
    with pytest.raises(FileExistsError):
        fio.save_image(img, src)
    assert src.read_bytes() == before


def test_atomic_write_leaves_nothing_on_interrupt(tmp_path, monkeypatch, edge_cases):
    img = fio.load_image(edge_cases["gps.jpg"])
    dst = tmp_path / "out" / "x.jpg"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fio.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        fio.save_image(img, dst)
    assert not dst.exists()
    assert list(dst.parent.iterdir()) == []  # no temporary file left behind


def test_output_format_follows_suffix(edge_cases, tmp_path):
    img = fio.load_image(edge_cases["gps.jpg"])
    for suffix, fmt in [(".png", "PNG"), (".webp", "WEBP"), (".tiff", "TIFF"), (".bmp", "BMP")]:
        out = fio.save_image(img, tmp_path / f"x{suffix}")
        with Image.open(out) as im:
            assert im.format == fmt
