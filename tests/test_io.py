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


# ----------------------------------------------------------------------------- permissions
@pytest.fixture
def umask():
    """Run with a chosen umask, restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_the_umask_permissions_not_0600(edge_cases, tmp_path, umask, mask):
    umask(mask)
    assert fio.current_umask() == mask
    want = 0o666 & ~mask
    img = fio.load_image(edge_cases["gps.jpg"])
    out = fio.save_image(img, tmp_path / "o" / "x.jpg")
    raw = fio.atomic_write_bytes(tmp_path / "o" / "r.bin", b"data")
    tmp = tmp_path / "o" / ".video.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)  # what mkstemp gives a video encoder
    os.close(fd)
    moved = fio.finalize_output(tmp, tmp_path / "o" / "video.mp4")
    for p in (out, raw, moved):
        assert (p.stat().st_mode & 0o777) == want, (p.name, oct(p.stat().st_mode & 0o777))
    assert not tmp.exists()


# ----------------------------------------------------------------------------- input protection
def test_protect_inputs_guards_every_writer(tmp_path, edge_cases):
    a = tmp_path / "a.png"
    a.write_bytes(b"input a")
    link = tmp_path / "link.png"
    link.symlink_to(a)
    hard = tmp_path / "hard.png"
    os.link(a, hard)
    img = fio.load_image(edge_cases["noface.png"])  # a different image: its own path is not a
    other = tmp_path / "b.png"
    with fio.protect_inputs([a]):
        for dst in (a, link, hard, tmp_path / "." / "a.png"):
            with pytest.raises(FileExistsError, match="input"):
                fio.save_image(img, dst)
            with pytest.raises(FileExistsError):
                fio.atomic_write_bytes(dst, b"x")
        tmp = tmp_path / ".t.tmp"
        tmp.write_bytes(b"x")
        with pytest.raises(FileExistsError):
            fio.finalize_output(tmp, a)
        fio.save_image(img, other)  # anything else is fine
    assert a.read_bytes() == b"input a"
    fio.atomic_write_bytes(tmp_path / "c.bin", b"x")  # the guard ends with the block
    fio.atomic_write_bytes(hard, b"now allowed")
    assert other.is_file()


# ----------------------------------------------------------------------------- bomb guard
def test_pillows_guard_stays_on_for_the_rest_of_the_process(edge_cases):
    """facepriv's own limit must not switch Pillow's guard off for other Image.open callers."""
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 0
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLargeError, match=r"60000x60000 .* over the limit .*--max-pixels"):
        fio.load_image(edge_cases["huge.png"])
    assert Image.MAX_IMAGE_PIXELS == before
    with pytest.raises(Image.DecompressionBombError):
        Image.open(edge_cases["huge.png"])  # a plain open elsewhere is still guarded


def test_allowed_image_over_pillows_limit_loads_and_the_clear_error_still_comes(edge_cases, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # noface.png (76,800 px) is a "bomb" to Pillow now
    path = edge_cases["noface.png"]
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    img = fio.load_image(path)  # within facepriv's limit: loads
    assert img.rgb.shape == (240, 320, 3)
    assert fio.load_image(path, max_pixels=0).rgb.shape == (240, 320, 3)  # 0 = no limit
    with pytest.raises(ImageTooLargeError, match="320x240 = 76,800 pixels, over the limit of 50,000 pixels"):
        fio.load_image(path, max_pixels=50_000)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored after each load
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)


def test_max_pixels_none_means_env_or_default(edge_cases, monkeypatch):
    path = edge_cases["noface.png"]
    monkeypatch.delenv(fio.MAX_PIXELS_ENV, raising=False)
    assert fio.resolve_max_pixels(None) == fio.DEFAULT_MAX_PIXELS
    monkeypatch.setenv(fio.MAX_PIXELS_ENV, "50000")
    assert fio.resolve_max_pixels(None) == 50_000 and fio.resolve_max_pixels(7) == 7
    with pytest.raises(ImageTooLargeError, match="over the limit of 50,000 pixels"):
        fio.load_image(path)
    assert fio.load_image(path, max_pixels=100_000).size == (320, 240)  # an explicit value wins
    monkeypatch.setenv(fio.MAX_PIXELS_ENV, "0")
    assert fio.load_image(edge_cases["noface.png"]).size == (320, 240)
    from facepriv.core.errors import ConfigError
    from facepriv.core.photo import SaveOptions

    monkeypatch.setenv(fio.MAX_PIXELS_ENV, "lots")
    with pytest.raises(ConfigError, match="FACEPRIV_MAX_PIXELS='lots' is not a whole number"):
        fio.load_image(path)
    with pytest.raises(ConfigError, match="FACEPRIV_MAX_PIXELS"):
        SaveOptions()
    monkeypatch.setenv(fio.MAX_PIXELS_ENV, "1_000_000")
    assert SaveOptions().max_pixels == 1_000_000  # resolved once: the settings hash records it


def test_bad_env_value_never_breaks_import():
    import subprocess
    import sys

    env = {**os.environ, "FACEPRIV_MAX_PIXELS": "not-a-number"}
    code = "import facepriv.core.io, facepriv.cli; print('imported')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "imported" in r.stdout, r.stderr


# ----------------------------------------------------------------------------- 16-bit with alpha, 16-bit TIFF
def test_sixteen_bit_alpha_png_and_tiff_keep_full_depth(edge_cases, tmp_path):
    img = fio.load_image(edge_cases["deep16.png"])
    alpha = np.full(img.rgb.shape[:2], 65535, np.uint16)
    alpha[:10] = 300  # a value 8 bits cannot hold
    rgba = fio.LoadedImage(None, img.rgb, alpha, "PNG", False, 16, img.high)
    back = fio.load_image(fio.save_image(rgba, tmp_path / "a16.png"))
    assert back.bit_depth == 16 and np.array_equal(back.high, img.high) and np.array_equal(back.alpha, alpha)
    tif = fio.load_image(fio.save_image(img, tmp_path / "x.tiff"))
    assert tif.bit_depth == 16 and np.array_equal(tif.high, img.high)
