"""Where a patch goes on a face, and how it gets there: pure, differentiable tensor functions.

Geometry
    Patches live in their own square pixel grid (``P x P``). A :class:`PatchRegion` is defined
    in the *reference frame*: the ArcFace 112x112 alignment template
    (:data:`facepriv.core.align.TEMPLATES` ``"arcface-112"``), where the eyes, nose and mouth
    corners of every aligned face sit at fixed points. The region's rectangle says where the
    patch grid is stretched to, its shape function where the patch is visible:

    * ``forehead`` - a rounded band between the eyebrows and the hairline (AdvHat-like);
    * ``eyeglass`` - eyeglass frames: two rims around the eyes, a bridge and the temples
      (Sharif et al.'s adversarial eyeglasses); the eyes themselves stay visible;
    * ``cheek`` - two ellipses on the cheeks, left and right of the nose;
    * a user mask: a greyscale image in the aligned ArcFace frame (any size; white = patch).

    A face's five landmarks give the similarity transform photo -> reference frame
    (:func:`facepriv.core.align.similarity_transform`); composing its inverse with the
    region's patch -> reference matrix maps the patch straight into the photo, so it is
    resampled once (every photo pixel mapped back into the patch with kornia's meshgrid and
    point transforms, then bilinear sampling).

Compositing
    ``out = image * (1 - a) + a * patch`` where ``a`` is the region's analytic mask evaluated
    at each photo pixel: sharp at the photo's resolution and exactly 0 outside the region, so
    every pixel the patch does not cover keeps its value bit for bit (the patch can be removed
    again wherever ``a`` is known). :func:`paste_patch` works on a bounding box of each face,
    so large photos stay cheap.

EOT (expectation over transformation)
    :func:`random_placement_jitter` draws small random affine perturbations of the patch's
    placement (rotation, scale, shift) and :func:`color_jitter` random brightness / contrast /
    saturation / noise (kornia.augmentation), used while training so the patch survives
    imprecise placement and printing / lighting changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.align import get_template, invert_affine, similarity_transform, transform_points
from ..core.errors import ConfigError

REFERENCE_TEMPLATE = "arcface-112"
REFERENCE_SIZE = 112.0
BUILTIN_REGIONS = ("forehead", "eyeglass", "cheek")

# Landmarks of the reference frame (ArcFace 112): eyes, nose, mouth corners.
_TPL = get_template(REFERENCE_TEMPLATE).points
_LEFT_EYE, _RIGHT_EYE = _TPL[0], _TPL[1]


# --------------------------------------------------------------------------------- shapes
# A shape function takes reference-frame coordinates x, y (tensors) and returns a signed
# "inside-ness" in reference pixels: > 0 inside (about the distance to the border), <= 0 outside.
ShapeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _ellipse(cx: float, cy: float, a: float, b: float) -> ShapeFn:
    def f(x, y):
        r = torch.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
        return (1.0 - r) * min(a, b)

    return f


def _superellipse(cx: float, cy: float, a: float, b: float, p: float = 4.0) -> ShapeFn:
    def f(x, y):
        r = (((x - cx) / a).abs() ** p + ((y - cy) / b).abs() ** p) ** (1.0 / p)
        return (1.0 - r) * min(a, b)

    return f


def _box(x0: float, y0: float, x1: float, y1: float) -> ShapeFn:
    def f(x, y):
        return torch.minimum(torch.minimum(x - x0, x1 - x), torch.minimum(y - y0, y1 - y))

    return f


def _union(*fs: ShapeFn) -> ShapeFn:
    def f(x, y):
        out = fs[0](x, y)
        for g in fs[1:]:
            out = torch.maximum(out, g(x, y))
        return out

    return f


def _minus(a: ShapeFn, b: ShapeFn) -> ShapeFn:
    def f(x, y):
        return torch.minimum(a(x, y), -b(x, y))

    return f


def _forehead() -> tuple[tuple[float, float, float, float], ShapeFn]:
    # Between the eyebrows (about 10 px above the eye line) and the hairline.
    rect = (28.0, 8.0, 84.0, 40.0)
    return rect, _superellipse(56.0, 24.0, 28.0, 16.0)


def _eyeglass() -> tuple[tuple[float, float, float, float], ShapeFn]:
    (lx, ly), (rx, ry) = _LEFT_EYE, _RIGHT_EYE
    rims = _union(
        _minus(_ellipse(lx, ly, 17.0, 13.0), _ellipse(lx, ly, 10.5, 7.5)),
        _minus(_ellipse(rx, ry, 17.0, 13.0), _ellipse(rx, ry, 10.5, 7.5)),
    )
    bridge = _box(lx + 14.0, min(ly, ry) - 6.0, rx - 14.0, min(ly, ry) - 1.0)
    temples = _union(_box(4.0, ly - 6.0, lx - 14.0, ly - 1.0), _box(rx + 14.0, ry - 6.0, 108.0, ry - 1.0))
    rect = (4.0, 37.0, 108.0, 66.0)
    return rect, _union(rims, bridge, temples)


def _cheek() -> tuple[tuple[float, float, float, float], ShapeFn]:
    rect = (18.0, 62.0, 94.0, 90.0)
    return rect, _union(_ellipse(31.0, 76.0, 11.0, 13.0), _ellipse(81.0, 76.0, 11.0, 13.0))


_BUILTIN = {"forehead": _forehead, "eyeglass": _eyeglass, "cheek": _cheek}


@dataclass
class PatchRegion:
    """Where the patch goes, in the ArcFace-112 reference frame.

    ``rect`` (x0, y0, x1, y1): the continuous extent the patch grid is stretched over.
    ``shape``: signed inside-ness function (reference pixels); ``feather``: soft-edge width in
    reference pixels (0 = hard edge; the mask still ends exactly at the region's border).
    """

    name: str
    rect: tuple[float, float, float, float]
    shape: ShapeFn = field(repr=False)
    feather: float = 1.0
    source: str | None = None  # file of a user mask
    kind: str = "sdf"  # "sdf": shape is a signed inside-ness; "alpha": shape is the mask itself

    def mask_at(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mask value in [0, 1] at reference-frame points; exactly 0 outside the region."""
        s = self.shape(x, y)
        if self.kind == "alpha":
            return s.clamp(0.0, 1.0)
        if self.feather > 0:
            return (s / self.feather).clamp(0.0, 1.0)
        return (s > 0).to(x.dtype)

    def patch_to_reference(self, patch_size: int, device=None) -> torch.Tensor:
        """(2, 3) matrix: patch pixel (u, v) -> reference-frame pixel (x, y)."""
        x0, y0, x1, y1 = self.rect
        sx, sy = (x1 - x0) / patch_size, (y1 - y0) / patch_size
        # Patch pixel centre u spans [-0.5, P - 0.5] -> [x0, x1] (pixel centres at integers).
        return torch.tensor([[sx, 0.0, x0 + 0.5 * sx - 0.5], [0.0, sy, y0 + 0.5 * sy - 0.5]],
                            device=device, dtype=torch.float32)

    def patch_mask(self, patch_size: int, device=None) -> torch.Tensor:
        """(1, 1, P, P) mask in patch pixels (where the patch is visible)."""
        m = self.patch_to_reference(patch_size, device)
        v, u = torch.meshgrid(torch.arange(patch_size, dtype=torch.float32, device=device),
                              torch.arange(patch_size, dtype=torch.float32, device=device), indexing="ij")
        x = m[0, 0] * u + m[0, 2]
        y = m[1, 1] * v + m[1, 2]
        return self.mask_at(x, y)[None, None]

    def image_mask(self, landmarks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(N, H, W) masks of the region in a photo of ``size`` (H, W) for faces' landmarks."""
        lms = torch.as_tensor(landmarks, dtype=torch.float32).reshape(-1, 5, 2)
        to_ref = photo_to_reference(lms)
        H, W = size
        yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
        pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
        out = []
        for i in range(lms.shape[0]):
            ref = transform_points(to_ref[i: i + 1], pts[None])[0]
            out.append(self.mask_at(ref[:, 0], ref[:, 1]).reshape(H, W))
        return torch.stack(out) if out else torch.zeros(0, H, W)


def _user_region(path: Path, feather: float) -> PatchRegion:
    from PIL import Image

    try:
        img = Image.open(path).convert("L")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the region mask {path}: {exc}") from None
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    if float(arr.max()) < 0.5:
        raise ConfigError(f"region mask {path} is empty (white = where the patch goes)")
    h, w = arr.shape
    sx, sy = w / REFERENCE_SIZE, h / REFERENCE_SIZE
    ys, xs = torch.nonzero(arr > 0, as_tuple=True)
    # mask pixel u <-> reference x = (u + 0.5) / sx - 0.5; extent of the non-zero pixels
    rect = (float(xs.min()) / sx - 0.5, float(ys.min()) / sy - 0.5,
            (float(xs.max()) + 1) / sx - 0.5, (float(ys.max()) + 1) / sy - 0.5)
    image = arr[None, None]

    def alpha(x, y):
        u = (x + 0.5) * sx - 0.5
        v = (y + 0.5) * sy - 0.5
        g = torch.stack([(2 * u + 1) / w - 1, (2 * v + 1) / h - 1], -1).reshape(1, 1, -1, 2)
        return F.grid_sample(image.to(x.device, x.dtype), g.to(x.dtype), mode="bilinear",
                             padding_mode="zeros", align_corners=False).reshape(x.shape)

    return PatchRegion(f"mask:{path}", rect, alpha, feather=0.0, source=str(path), kind="alpha")


def get_region(name: str | PatchRegion, *, feather: float = 1.0) -> PatchRegion:
    """A built-in region (``forehead``, ``eyeglass``, ``cheek``) or a user mask image path."""
    if isinstance(name, PatchRegion):
        return name
    key = str(name).strip()
    if key.lower() in _BUILTIN:
        rect, shape = _BUILTIN[key.lower()]()
        return PatchRegion(key.lower(), rect, shape, feather=feather)
    if key.startswith("mask:"):
        key = key[5:]
    p = Path(key).expanduser()
    if p.is_file():
        return _user_region(p, feather)
    raise ConfigError(f"unknown patch region {name!r}: use {', '.join(BUILTIN_REGIONS)} or the path of a "
                      "greyscale mask image in the aligned ArcFace-112 frame")


# --------------------------------------------------------------------------------- matrices
def _full(m: torch.Tensor) -> torch.Tensor:
    bottom = torch.tensor([0.0, 0.0, 1.0], device=m.device, dtype=m.dtype).expand(*m.shape[:-2], 1, 3)
    return torch.cat([m, bottom], -2)


def compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Affine ``a o b`` (apply ``b`` first) for (..., 2, 3) matrices (broadcasting)."""
    return (_full(a) @ _full(b))[..., :2, :]


def photo_to_reference(landmarks: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) similarity transforms photo pixels -> ArcFace-112 reference frame."""
    tpl = get_template(REFERENCE_TEMPLATE)
    lms = torch.as_tensor(landmarks, dtype=torch.float32).reshape(-1, 5, 2)
    return similarity_transform(lms, tpl.tensor(lms.device))


def patch_to_photo(region: PatchRegion, patch_size: int, landmarks: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) matrices mapping patch pixels into the photo of each face."""
    to_ref = photo_to_reference(landmarks)
    p2r = region.patch_to_reference(patch_size, device=to_ref.device)
    return compose(invert_affine(to_ref), p2r.expand(to_ref.shape[0], 2, 3))


# --------------------------------------------------------------------------------- warping
def _sample_patch(patch: torch.Tensor, uv: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``patch`` (N, C, P, P) at patch coordinates ``uv`` (N, h, w, 2).

    Patches that shrink by more than 1.5x (``scale`` < 0.66) are area-resized first, so the
    photo never shows aliasing.
    """
    P = patch.shape[-1]
    s = float(scale.min())
    if s < 0.66:
        n = max(2, int(math.ceil(P * s * 1.5)))
        f = n / P
        patch = F.interpolate(patch, size=(n, n), mode="bilinear", align_corners=False, antialias=True)
        uv = (uv + 0.5) * f - 0.5  # pixel centres of the resized patch
        P = n
    grid = uv * (2.0 / max(P - 1, 1)) - 1.0  # align_corners=True normalisation
    return F.grid_sample(patch, grid.to(patch.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def warp_patch(patch: torch.Tensor, region: PatchRegion, matrices: torch.Tensor,
               size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp patches (N, C, P, P) into canvases of ``size`` (H, W); returns (colour, alpha).

    ``matrices`` (N, 2, 3) map patch pixels -> canvas pixels (e.g. :func:`patch_to_photo`,
    possibly with EOT jitter). Every canvas pixel is mapped back into the patch (kornia
    meshgrid + inverse affine): its colour is the bilinear patch sample, its alpha the
    region's analytic mask at that point - so the region's border is sharp at the canvas's own
    resolution, and alpha is exactly 0 outside the region.
    """
    from kornia.geometry.linalg import transform_points as kt_points
    from kornia.geometry import create_meshgrid

    n, _, P, _ = patch.shape
    H, W = size
    m = matrices.to(patch.device, torch.float32)
    inv = _full(invert_affine(m))  # canvas -> patch
    pix = create_meshgrid(H, W, normalized_coordinates=False, device=patch.device).reshape(1, H * W, 2)
    uv = kt_points(inv, pix.expand(n, H * W, 2))  # (n, H*W, 2) patch coordinates
    p2r = region.patch_to_reference(P, device=patch.device)
    alpha = region.mask_at(uv[..., 0] * p2r[0, 0] + p2r[0, 2], uv[..., 1] * p2r[1, 1] + p2r[1, 2])
    scale = torch.linalg.det(m[:, :, :2]).abs().sqrt()
    colour = _sample_patch(patch, uv.reshape(n, H, W, 2), scale)
    return colour, alpha.reshape(n, 1, H, W).to(patch.dtype)


def composite(image: torch.Tensor, colour: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``image * (1 - alpha) + alpha * colour``; pixels with alpha == 0 are returned unchanged."""
    return torch.where(alpha > 0, image * (1 - alpha) + alpha * colour, image)


def place_on_canvas(canvas: torch.Tensor, patch: torch.Tensor, region: PatchRegion,
                    matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite one patch per canvas (N, 3, H, W); returns (patched, alpha). Differentiable."""
    colour, alpha = warp_patch(patch, region, matrices, tuple(canvas.shape[-2:]))
    return composite(canvas, colour, alpha), alpha


def _bbox(m: torch.Tensor, P: int, H: int, W: int) -> tuple[int, int, int, int]:
    corners = torch.tensor([[-0.5, -0.5], [P - 0.5, -0.5], [-0.5, P - 0.5], [P - 0.5, P - 0.5]],
                           dtype=torch.float32, device=m.device)
    pts = transform_points(m[None].float(), corners[None])[0]
    x0 = int(max(0, math.floor(float(pts[:, 0].min())) - 1))
    y0 = int(max(0, math.floor(float(pts[:, 1].min())) - 1))
    x1 = int(min(W, math.ceil(float(pts[:, 0].max())) + 2))
    y1 = int(min(H, math.ceil(float(pts[:, 1].max())) + 2))
    return x0, y0, x1, y1


def paste_patch(image: torch.Tensor, patch: torch.Tensor, region: PatchRegion,
                matrices: torch.Tensor) -> torch.Tensor:
    """Paste patches (N, 3, P, P) into one photo (3, H, W) with patch -> photo ``matrices``.

    Works on each patch's bounding box in the photo; pixels outside the region are returned
    bit-for-bit unchanged. Differentiable in ``patch`` and ``image``.
    """
    out = image.clone()
    C, H, W = image.shape
    n, _, P, _ = patch.shape
    for i in range(n):
        m = matrices[i].to(image.device, torch.float32)
        x0, y0, x1, y1 = _bbox(m, P, H, W)
        if x1 <= x0 or y1 <= y0:
            continue  # the patch falls outside the photo
        shift = torch.tensor([[1.0, 0.0, -x0], [0.0, 1.0, -y0]], device=m.device)
        colour, alpha = warp_patch(patch[i: i + 1].to(image), region, compose(shift, m)[None], (y1 - y0, x1 - x0))
        new = composite(out[:, y0:y1, x0:x1], colour[0], alpha[0])
        # rebuilt out of place, so autograd can differentiate through several faces
        row = torch.cat([out[:, y0:y1, :x0], new, out[:, y0:y1, x1:]], 2)
        out = torch.cat([out[:, :y0], row, out[:, y1:]], 1)
    return out


def patch_coverage(image_size: tuple[int, int], region: PatchRegion, patch_size: int,
                   matrices: torch.Tensor) -> torch.Tensor:
    """(N, H, W) alpha of each patch in a photo (where the patch is visible)."""
    n = matrices.shape[0]
    _, alpha = warp_patch(torch.zeros(n, 1, patch_size, patch_size), region, matrices, image_size)
    return alpha[:, 0]


# --------------------------------------------------------------------------------- EOT
@dataclass
class PlacementEOT:
    """Random placements and colour changes of the patch while training (expectation over
    transformation); :class:`facepriv.attacks.eot.EOTConfig` is the transfer attack's own."""

    enabled: bool = True
    rotate: float = 5.0  # degrees, uniform +-
    scale: float = 0.05  # relative, uniform +-
    translate: float = 0.03  # fraction of the region's size, uniform +-
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    noise: float = 0.01  # std of additive Gaussian noise on the patch


def random_placement_jitter(n: int, region: PatchRegion, cfg: PlacementEOT, *, device=None) -> torch.Tensor:
    """(n, 2, 3) random affine maps of the reference frame around the region's centre.

    Draws from torch's global RNG; training re-seeds it for every step from ``(--seed, process
    index, step)`` (:func:`facepriv.patch.train.step_seed`).
    """
    if not cfg.enabled:
        return torch.eye(2, 3, device=device).expand(n, 2, 3).clone()
    from kornia.geometry.transform import get_affine_matrix2d

    x0, y0, x1, y1 = region.rect

    def u(lo, hi, shape=(n,)):
        return torch.rand(shape) * (hi - lo) + lo

    ang = u(-cfg.rotate, cfg.rotate)
    sc = u(1 - cfg.scale, 1 + cfg.scale)
    tx = u(-cfg.translate, cfg.translate) * (x1 - x0)
    ty = u(-cfg.translate, cfg.translate) * (y1 - y0)
    centre = torch.tensor([[(x0 + x1) / 2, (y0 + y1) / 2]]).expand(n, 2)
    m = get_affine_matrix2d(torch.stack([tx, ty], -1), centre, torch.stack([sc, sc], -1), ang)
    return m[:, :2].to(device)


def color_jitter(patch: torch.Tensor, cfg: PlacementEOT) -> torch.Tensor:
    """Random brightness / contrast / saturation (kornia.augmentation) and noise; differentiable."""
    if not cfg.enabled:
        return patch
    out = patch
    if cfg.brightness or cfg.contrast or cfg.saturation:
        import kornia.augmentation as K

        out = K.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation,
                            hue=0.0, p=1.0)(out)
    if cfg.noise:
        out = out + cfg.noise * torch.randn_like(out)
    return out.clamp(0.0, 1.0)
