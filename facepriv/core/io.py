"""Image input/output that treats users' files as sacred.

Reading (:func:`load_image`)
    JPEG, PNG, WebP, BMP, TIFF (and anything else Pillow reads): EXIF orientation applied,
    16-bit kept at full depth, CMYK/palette/grey converted for processing, alpha kept aside,
    a decompression-bomb guard (``max_pixels``) checked from the header *before* decoding, and
    every failure turned into an :class:`~facepriv.core.errors.ImageLoadError` with a reason.

Writing (:func:`save_image`)
    Atomic (temporary file in the same folder, fsync, rename), never over an input file,
    metadata stripped by default (EXIF incl. GPS, XMP, IPTC, comments, PNG text); with
    ``keep_metadata=True`` EXIF is kept *except* the GPS block, with orientation reset because
    it is baked into the pixels. Format follows the output suffix; grey stays grey, alpha is
    written back where the format allows, 16-bit PNG/TIFF inputs are written at 16 bit.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError, ImageTooLargeError

DEFAULT_MAX_PIXELS = int(os.environ.get("FACEPRIV_MAX_PIXELS", 178_956_970))  # Pillow's bomb limit x2
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_FORMAT_BY_SUFFIX = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
    ".tif": "TIFF", ".tiff": "TIFF",
}
_ALPHA_FORMATS = {"PNG", "WEBP", "TIFF"}
_HIGH_DEPTH_FORMATS = {"PNG", "TIFF"}
_EXIF_ORIENTATION = 0x0112
_EXIF_GPS_IFD = 0x8825

# We check the pixel count ourselves (with a clearer error) before decoding.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass
class LoadedImage:
    """A decoded image ready for processing.

    ``rgb`` is always ``uint8 (H, W, 3)`` (what detectors take); ``high`` holds the full-depth
    ``uint16 (H, W, 3)`` pixels when the file had more than 8 bits per channel.
    """

    path: Path | None
    rgb: np.ndarray
    alpha: np.ndarray | None = None  # uint8 or uint16 (H, W)
    format: str | None = None
    grey: bool = False
    bit_depth: int = 8
    high: np.ndarray | None = None
    exif: Image.Exif | None = None
    icc_profile: bytes | None = None
    info: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.rgb.shape[1], self.rgb.shape[0]

    def to_tensor(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """Float RGB tensor in [0, 1], shape (3, H, W), at full bit depth."""
        if self.high is not None:
            arr = torch.from_numpy(self.high.astype(np.float32) / 65535.0)
        else:
            arr = torch.from_numpy(self.rgb).float().div_(255.0)
        return arr.permute(2, 0, 1).contiguous().to(device)

    def with_pixels(self, pixels: torch.Tensor | np.ndarray) -> LoadedImage:
        """A copy of this image (same format/metadata/alpha) holding new RGB pixels.

        ``pixels``: float tensor (3, H, W) in [0, 1], or a uint8 (H, W, 3) array.
        """
        high = None
        if isinstance(pixels, torch.Tensor):
            x = pixels.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            rgb = np.round(x * 255.0).astype(np.uint8)
            if self.bit_depth > 8:
                high = np.round(x * 65535.0).astype(np.uint16)
        else:
            rgb = np.ascontiguousarray(pixels, dtype=np.uint8)
        return LoadedImage(self.path, rgb, self.alpha, self.format, self.grey, self.bit_depth, high,
                           self.exif, self.icc_profile, dict(self.info))


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _decode(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, bool, int]:
    """Pixels of a Pillow image as (rgb8, high16|None, alpha|None, grey, bit_depth)."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im)
        if mode == "I":  # 32-bit int container; Pillow uses it for 16-bit grey PNGs
            arr = np.clip(arr, 0, 65535)
        arr = arr.astype(np.uint16)
        high = np.repeat(arr[..., None], 3, axis=2)
        return _to_uint8(high), high, None, True, 16
    if mode == "F":
        arr = np.clip(np.asarray(im, dtype=np.float32), 0, 1)
        high = np.repeat((arr * 65535).round().astype(np.uint16)[..., None], 3, axis=2)
        return _to_uint8(high), high, None, True, 16
    if mode in ("RGB;16", "RGBA;16") or mode.startswith(("RGB;16", "RGBA;16")):
        arr = np.asarray(im).astype(np.uint16)
        high = arr[..., :3]
        alpha = arr[..., 3] if arr.shape[-1] == 4 else None
        return _to_uint8(high), np.ascontiguousarray(high), alpha, False, 16
    if mode == "CMYK":
        im = im.convert("RGB")
        return np.asarray(im).copy(), None, None, False, 8
    if mode in ("1", "L"):
        arr = np.asarray(im.convert("L"))
        return np.repeat(arr[..., None], 3, axis=2), None, None, True, 8
    if mode == "LA":
        arr = np.asarray(im)
        return np.repeat(arr[..., :1], 3, axis=2).copy(), None, arr[..., 1].copy(), True, 8
    if mode in ("P", "PA"):
        im = im.convert("RGBA") if ("transparency" in im.info or mode == "PA") else im.convert("RGB")
        mode = im.mode
    if mode == "RGBA":
        arr = np.asarray(im)
        return arr[..., :3].copy(), None, arr[..., 3].copy(), False, 8
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im).copy(), None, None, False, 8


def _file_bit_depth(im: Image.Image) -> int:
    """Bits per channel stored in the file (Pillow hides 16-bit colour behind mode "RGB")."""
    if im.format == "PNG":
        try:
            fp = im.fp
            pos = fp.tell()
            fp.seek(24)
            depth = fp.read(1)[0]
            fp.seek(pos)
            return int(depth)
        except (OSError, AttributeError, IndexError, ValueError):
            return 8
    if im.format == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(258)
        if isinstance(bits, tuple | list) and bits:
            return int(bits[0])
        return int(bits or 8)
    return 8


def _read_high_depth(path: Path, orientation: int) -> np.ndarray | None:
    """uint16 RGB(A) pixels of a 16-bit colour PNG/TIFF, with the EXIF orientation applied."""
    import cv2

    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3:
        return None
    arr = arr[..., [2, 1, 0, 3]] if arr.shape[2] == 4 else arr[..., ::-1]
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 1)[::-1],
           8: lambda a: np.rot90(a, 1)}
    if orientation in ops:
        arr = ops[orientation](arr)
    return np.ascontiguousarray(arr)


def load_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read an image file, raising :class:`ImageLoadError` with a clear reason on failure."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise ImageLoadError(f"{path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            w, h = im.size
            if max_pixels and w * h > max_pixels:
                raise ImageTooLargeError(
                    f"{path} is {w}x{h} = {w * h / 1e6:.0f} MP, over the limit of {max_pixels / 1e6:.0f} MP "
                    "(decompression-bomb guard; raise it with --max-pixels or FACEPRIV_MAX_PIXELS)"
                )
            fmt = im.format
            file_depth = _file_bit_depth(im)  # before getexif(), which may load and close the file
            exif = im.getexif()
            icc = im.info.get("icc_profile")
            im.load()
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            orientation = exif.get(_EXIF_ORIENTATION, 1)
            oriented = ImageOps.exif_transpose(im) if orientation != 1 else im
            rgb, high, alpha, grey, depth = _decode(oriented)
            if depth == 8 and not grey and file_depth == 16:
                # Pillow reads 16-bit colour PNG/TIFF as 8-bit: take full depth from OpenCV.
                full = _read_high_depth(path, orientation)
                if full is not None and full.shape[:2] == rgb.shape[:2]:
                    high = np.ascontiguousarray(full[..., :3])
                    rgb, depth = _to_uint8(high), 16
                    if full.shape[2] == 4:
                        alpha = np.ascontiguousarray(full[..., 3])
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path} is not an image Pillow can read (wrong extension or corrupt header)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower():
            msg = f"the file is truncated ({msg})"
        raise ImageLoadError(f"cannot decode {path}: {msg}") from None
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageLoadError(f"{path} has no pixels")
    return LoadedImage(path, rgb, alpha, fmt, grey, depth, high, exif, icc)


def output_format(dst: Path, fallback: str | None = None) -> str:
    fmt = _FORMAT_BY_SUFFIX.get(dst.suffix.lower())
    if fmt is None:
        if fallback is None:
            raise ValueError(f"cannot tell the image format from {dst.name!r}; use one of {', '.join(IMAGE_SUFFIXES)}")
        return fallback
    return fmt


def _kept_exif(src: Image.Exif) -> bytes | None:
    out = Image.Exif()
    for tag, value in src.items():
        if tag == _EXIF_GPS_IFD:
            continue
        out[tag] = value
    if _EXIF_ORIENTATION in out:
        out[_EXIF_ORIENTATION] = 1
    try:
        ifd = src.get_ifd(0x8769)  # Exif sub-IFD (camera settings, dates)
        if ifd:
            out[0x8769] = dict(ifd)  # type: ignore[assignment]
    except Exception:  # noqa: BLE001 - malformed sub-IFDs are dropped, never fatal
        pass
    return out.tobytes() if len(out) else None


def encode_image(img: LoadedImage, fmt: str, *, quality: int = 95, keep_metadata: bool = False) -> bytes:
    """Encode to bytes in ``fmt`` (see :func:`save_image` for the metadata policy)."""
    alpha = img.alpha if fmt in _ALPHA_FORMATS else None
    if img.high is not None and fmt in _HIGH_DEPTH_FORMATS and alpha is None:
        if img.grey:
            pil = Image.fromarray(img.high[..., 0].astype(np.uint16), mode="I;16")
        elif fmt == "TIFF":
            pil = Image.fromarray(img.rgb)  # Pillow cannot write 16-bit RGB TIFF; keep 8-bit
        else:
            pil = None  # written through OpenCV below (Pillow has no 16-bit RGB PNG writer)
    else:
        pil = Image.fromarray(img.rgb[..., 0] if img.grey else img.rgb, mode="L" if img.grey else "RGB")
        if alpha is not None:
            a8 = alpha if alpha.dtype == np.uint8 else _to_uint8(alpha)
            pil.putalpha(Image.fromarray(a8, mode="L"))
    if pil is None:
        import cv2

        ok, buf = cv2.imencode(".png", np.ascontiguousarray(img.high[..., ::-1]))
        if not ok:
            raise OSError("could not encode 16-bit PNG")
        return buf.tobytes()  # OpenCV writes no metadata chunks at all
    kwargs: dict = {}
    if keep_metadata:
        if img.exif is not None and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
            ex = _kept_exif(img.exif)
            if ex:
                kwargs["exif"] = ex
    if img.icc_profile and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        kwargs["icc_profile"] = img.icc_profile  # colour data, not identifying: always kept
    if fmt == "JPEG":
        if pil.mode not in ("RGB", "L"):
            pil = pil.convert("RGB")
        kwargs.update(quality=int(quality), subsampling=0 if quality >= 90 else 2, optimize=False)
    elif fmt == "WEBP":
        kwargs.update(quality=int(quality), method=4)
    elif fmt == "TIFF":
        kwargs.update(compression="tiff_deflate")
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def atomic_write_bytes(dst: Path, data: bytes, *, protected: tuple[Path, ...] = ()) -> Path:
    """Write ``data`` to ``dst`` via a temporary file + fsync + rename; refuse to replace inputs."""
    dst = Path(dst)
    for p in protected:
        if p is not None and (_same_file(dst, p) or dst.resolve() == Path(p).resolve()):
            raise FileExistsError(f"refusing to overwrite the input file {p}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:  # includes KeyboardInterrupt: never leave a half-written file behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return dst


def save_image(img: LoadedImage, dst: str | os.PathLike, *, quality: int = 95, keep_metadata: bool = False,
               protected: tuple[Path, ...] = ()) -> Path:
    """Write ``img`` to ``dst`` atomically; ``protected`` paths (the inputs) are never replaced.

    The source image itself (``img.path``) is always protected.
    """
    dst = Path(dst)
    fmt = output_format(dst, fallback=img.format)
    data = encode_image(img, fmt, quality=quality, keep_metadata=keep_metadata)
    prot = tuple(p for p in (img.path, *protected) if p is not None)
    return atomic_write_bytes(dst, data, protected=prot)


def image_to_tensor(rgb: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [0, 1]."""
    arr = rgb if (rgb.flags.writeable and rgb.flags.c_contiguous) else np.array(rgb)
    return torch.from_numpy(arr).to(device).permute(2, 0, 1).float().div_(255.0)


def tensor_to_image(x: torch.Tensor) -> np.ndarray:
    """float (3, H, W) in [0, 1] -> uint8 (H, W, 3)."""
    return (x.detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
