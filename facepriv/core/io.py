"""Image input/output that treats users' files as sacred.

Reading (:func:`load_image`)
    JPEG, PNG, WebP, BMP, TIFF (and anything else Pillow reads): EXIF orientation applied,
    16-bit kept at full depth, CMYK/palette/grey converted for processing, alpha kept aside,
    a decompression-bomb guard (``max_pixels``) checked from the header *before* decoding, and
    every failure turned into an :class:`~facepriv.core.errors.ImageLoadError` with a reason.

Writing (:func:`save_image`, :func:`atomic_write_bytes`, :func:`finalize_output`)
    Atomic (temporary file in the same folder, fsync, rename), never over an input file (the
    image's own source, any ``protected`` path, and every input of the running batch, see
    :func:`protect_inputs`), created with the usual permissions (``0o666`` minus the umask, not
    ``mkstemp``'s private ``0o600``), metadata stripped by default (EXIF incl. GPS, XMP, IPTC, comments, PNG text); with
    ``keep_metadata=True`` EXIF is kept *except* the GPS block, with orientation reset because
    it is baked into the pixels. Format follows the output suffix; grey stays grey, alpha is
    written back where the format allows, 16-bit PNG/TIFF inputs are written at 16 bit (with
    their alpha; 16-bit colour goes through OpenCV, which writes no metadata at all).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ConfigError, ImageLoadError, ImageTooLargeError

# The built-in decompression-bomb limit (Pillow's own error threshold, 2 x its warning limit).
# ``max_pixels=None`` everywhere means "FACEPRIV_MAX_PIXELS if set, else this"; 0 means no limit.
DEFAULT_MAX_PIXELS = 178_956_970
MAX_PIXELS_ENV = "FACEPRIV_MAX_PIXELS"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
_FORMAT_BY_SUFFIX = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
    ".tif": "TIFF", ".tiff": "TIFF",
}
_ALPHA_FORMATS = {"PNG", "WEBP", "TIFF"}
_HIGH_DEPTH_FORMATS = {"PNG", "TIFF"}
_EXIF_ORIENTATION = 0x0112
_EXIF_GPS_IFD = 0x8825

# Pillow's own bomb guard (Image.MAX_IMAGE_PIXELS) stays as it is for the whole process;
# load_image applies its own, configurable limit and lifts Pillow's only around its own open
# when the user allowed more (see _open_image). Truncated files must fail, never half-load.
ImageFile.LOAD_TRUNCATED_IMAGES = False
_PILLOW_LIMIT_LOCK = threading.Lock()


def resolve_max_pixels(value: int | None = None) -> int:
    """The pixel limit to apply: ``value`` if given, else ``FACEPRIV_MAX_PIXELS``, else the default.

    Returns 0 for "no limit" (``value`` 0, or the variable set to 0). A malformed or negative
    setting raises :class:`ConfigError` naming it (when used, never at import time).
    """
    if value is None:
        raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not raw:
            return DEFAULT_MAX_PIXELS
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{MAX_PIXELS_ENV}={raw!r} is not a whole number of pixels "
                              "(e.g. 200000000; 0 disables the limit)") from None
        if value < 0:
            raise ConfigError(f"{MAX_PIXELS_ENV}={raw!r} must be 0 (no limit) or a positive number of pixels")
        return value
    value = int(value)
    if value < 0:
        raise ConfigError(f"max_pixels={value} must be 0 (no limit) or a positive number of pixels")
    return value


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


def _pixels(n: int) -> str:
    return f"{n / 1e6:.0f} MP" if n >= 10_000_000 else f"{n:,} pixels"


@contextlib.contextmanager
def _pillow_limit_lifted() -> Iterator[None]:
    """Switch Pillow's process-wide bomb guard off for the enclosed block only (serialised)."""
    with _PILLOW_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _open_image(path: Path, stack: contextlib.ExitStack) -> Image.Image:
    """``Image.open`` where facepriv's own limit, not Pillow's, decides what is too large.

    Pillow refuses images over 2 x ``Image.MAX_IMAGE_PIXELS`` at open time. Then the header is
    read again with Pillow's guard lifted for this call only (``stack`` keeps it lifted while
    the caller checks the size and decodes), so that the caller's limit gives its clear error,
    or loads a picture the user explicitly allowed. Pillow's size warning is silenced here for
    the same reason; nothing else in the process is affected.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError:
            pass
        stack.enter_context(_pillow_limit_lifted())
        return Image.open(path)


def load_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> LoadedImage:
    """Read an image file, raising :class:`ImageLoadError` with a clear reason on failure.

    ``max_pixels``: refuse images with more pixels (read from the header, before decoding);
    None means ``FACEPRIV_MAX_PIXELS`` or the built-in default, 0 means no limit.
    """
    path = Path(path)
    limit = resolve_max_pixels(max_pixels)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise ImageLoadError(f"{path} is empty (0 bytes)")
    with contextlib.ExitStack() as stack:
        try:
            im = _open_image(path, stack)
            with im:
                w, h = im.size
                if limit and w * h > limit:
                    raise ImageTooLargeError(
                        f"{path} is {w}x{h} = {_pixels(w * h)}, over the limit of {_pixels(limit)} "
                        "(decompression-bomb guard; raise it with --max-pixels or FACEPRIV_MAX_PIXELS, 0 = no limit)"
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
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
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


def _encode_high_colour(img: LoadedImage, fmt: str, alpha: np.ndarray | None) -> bytes:
    """16-bit colour (with 8- or 16-bit alpha) PNG/TIFF through OpenCV: Pillow has no 16-bit
    colour writer. OpenCV writes no metadata chunks at all."""
    import cv2

    planes = img.high[..., ::-1]  # RGB -> BGR
    if alpha is not None:
        a16 = alpha.astype(np.uint16) * 257 if alpha.dtype == np.uint8 else alpha.astype(np.uint16)
        planes = np.dstack([planes, a16])
    ok, buf = cv2.imencode(".png" if fmt == "PNG" else ".tiff", np.ascontiguousarray(planes))
    if not ok:
        raise OSError(f"could not encode a 16-bit {fmt}")
    return buf.tobytes()


def encode_image(img: LoadedImage, fmt: str, *, quality: int = 95, keep_metadata: bool = False) -> bytes:
    """Encode to bytes in ``fmt`` (see :func:`save_image` for the metadata policy)."""
    alpha = img.alpha if fmt in _ALPHA_FORMATS else None
    if img.high is not None and fmt in _HIGH_DEPTH_FORMATS and not img.grey:
        return _encode_high_colour(img, fmt, alpha)
    if img.high is not None and fmt in _HIGH_DEPTH_FORMATS and alpha is None:
        pil = Image.fromarray(img.high[..., 0].astype(np.uint16), mode="I;16")  # 16-bit grey
    else:
        pil = Image.fromarray(img.rgb[..., 0] if img.grey else img.rgb, mode="L" if img.grey else "RGB")
        if alpha is not None:
            a8 = alpha if alpha.dtype == np.uint8 else _to_uint8(alpha)
            pil.putalpha(Image.fromarray(a8, mode="L"))
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


# ----------------------------------------------------------------------------- safe writing
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # set-and-restore is the only portable way to read it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """Mode a plain ``open(path, "w")`` would give a new file: ``0o666`` minus the umask."""
    return 0o666 & ~current_umask()


def set_default_mode(target: int | str | os.PathLike) -> None:
    """Give a temporary file (an fd or a path) the usual permissions before it is renamed into
    place: ``tempfile.mkstemp`` creates files ``0o600``, which would make every output private."""
    mode = default_file_mode()
    try:
        if isinstance(target, int):
            os.fchmod(target, mode)
        else:
            os.chmod(target, mode)
    except (OSError, AttributeError, NotImplementedError):  # filesystems without modes, Windows fds
        pass


class _Protected:
    """A set of input files (by absolute path and by device/inode) that must never be replaced."""

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self.names: dict[str, str] = {}
        self.ids: dict[tuple[int, int], str] = {}
        for p in paths:
            if p is None:
                continue
            p = Path(p)
            shown = str(p)
            self.names[os.path.normcase(str(p.absolute()))] = shown
            try:
                st = p.stat()
                self.ids[(st.st_dev, st.st_ino)] = shown
            except OSError:
                pass

    def match(self, dst: Path) -> str | None:
        """The protected input ``dst`` would replace, or None."""
        for cand in (dst.absolute(), dst.resolve()):
            hit = self.names.get(os.path.normcase(str(cand)))
            if hit is not None:
                return hit
        try:
            st = dst.stat()
        except OSError:
            return None
        return self.ids.get((st.st_dev, st.st_ino))


_ACTIVE_PROTECTED: list[_Protected] = []
_ACTIVE_LOCK = threading.Lock()


@contextlib.contextmanager
def protect_inputs(paths: Iterable[str | os.PathLike]) -> Iterator[None]:
    """While the block runs, every facepriv writer (:func:`atomic_write_bytes`,
    :func:`save_image`, :func:`finalize_output`) refuses to replace any of ``paths``.

    The batch runner wraps each run in this with all of the run's inputs, so an output can
    never land on another input of the same run, whichever command writes it.
    """
    entry = _Protected(paths)
    with _ACTIVE_LOCK:
        _ACTIVE_PROTECTED.append(entry)
    try:
        yield
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE_PROTECTED.remove(entry)


def check_not_input(dst: str | os.PathLike, protected: Iterable[str | os.PathLike] = ()) -> None:
    """Raise :class:`FileExistsError` if writing ``dst`` would replace a protected input."""
    dst = Path(dst)
    with _ACTIVE_LOCK:
        sets = [_Protected(protected), *_ACTIVE_PROTECTED]
    for s in sets:
        hit = s.match(dst)
        if hit is not None:
            raise FileExistsError(f"refusing to overwrite the input file {hit}")


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder after a rename into it, to disk (best effort: not every
    platform can open a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(dst: Path, data: bytes, *, protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``data`` to ``dst`` via a temporary file + fsync + rename; refuse to replace inputs.

    The file gets the usual permissions (``0o666`` minus the umask), like any new file.
    """
    dst = Path(dst)
    check_not_input(dst, protected)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        set_default_mode(fd)
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
    fsync_path(dst.parent)
    return dst


def finalize_output(tmp: str | os.PathLike, dst: str | os.PathLike, *,
                    protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Move a finished temporary file (written next to ``dst``) into place the way
    :func:`atomic_write_bytes` does: usual permissions, fsync, never over an input, rename.

    For writers that need a real file to write into (video encoders, ``save_file``). The
    caller removes ``tmp`` if this raises.
    """
    tmp, dst = Path(tmp), Path(dst)
    check_not_input(dst, protected)
    set_default_mode(tmp)
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    os.replace(tmp, dst)
    fsync_path(dst.parent)
    return dst


def save_image(img: LoadedImage, dst: str | os.PathLike, *, quality: int = 95, keep_metadata: bool = False,
               protected: tuple[Path, ...] = ()) -> Path:
    """Write ``img`` to ``dst`` atomically; ``protected`` paths (the inputs) are never replaced.

    The source image itself (``img.path``) and every input of the running batch
    (:func:`protect_inputs`) are always protected.
    """
    dst = Path(dst)
    prot = tuple(p for p in (img.path, *protected) if p is not None)
    check_not_input(dst, prot)  # fail before the encoding work
    fmt = output_format(dst, fallback=img.format)
    data = encode_image(img, fmt, quality=quality, keep_metadata=keep_metadata)
    return atomic_write_bytes(dst, data, protected=prot)


def image_to_tensor(rgb: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [0, 1]."""
    arr = rgb if (rgb.flags.writeable and rgb.flags.c_contiguous) else np.array(rgb)
    return torch.from_numpy(arr).to(device).permute(2, 0, 1).float().div_(255.0)
