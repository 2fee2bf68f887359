"""Face alignment to standard templates, and paste-back of edited faces.

Everything is a pure, batched, differentiable tensor function (kornia warps), so attacks can
optimise pixels of the *original photo* through the alignment to each model's template.

* :func:`similarity_transform` - least-squares similarity (Umeyama) from 5 landmarks to a
  template.
* :func:`align_faces` - warp faces of an image to a template; large faces are first
  box-filtered to about the template's scale, so downscaling never aliases.
* :func:`paste_back` - warp edited aligned faces back into the photo with a feathered mask,
  either replacing the face (``reference=None``) or adding only the edit
  (``edited - reference``), which keeps the photo's original resolution where nothing changed.

Coordinates are pixel coordinates with pixel centres at integers (kornia's
``align_corners=True`` convention), landmarks in facepriv's order (see
:mod:`facepriv.core.faces`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from kornia.geometry.transform import warp_affine

from .errors import ConfigError


@dataclass(frozen=True)
class Template:
    name: str
    size: tuple[int, int]  # (height, width)
    points: tuple[tuple[float, float], ...]  # 5 (x, y) in output pixels

    def tensor(self, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor(self.points, device=device, dtype=dtype)


# ArcFace / insightface 112x112 template (the standard of ArcFace, SFace, IR-SE, MobileFaceNet).
_ARCFACE = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041))


TEMPLATES: dict[str, Template] = {
    "arcface-112": Template("arcface-112", (112, 112), _ARCFACE),
    # Where MTCNN's five points fall in the crops the models were trained on; measured on real
    # photos (64 faces of ../shared/data; benchmarks/derive_templates.py regenerates them):
    #  - facenet-160: FaceNet's MTCNN crop (box + 32 px margin at 160 px, as in facenet-pytorch
    #    and Sandberg's LFW evaluation);
    #  - dlib-150: dlib.get_face_chip(size=150, padding=0.25) from the 68-point predictor;
    #  - fer-64: the OpenCV Haar-cascade face box the fer expression model crops, at 64 px;
    #  - celebahq-256: the CelebA-HQ / FFHQ crop rule (Karras et al.) that pixel-space face
    #    diffusion models (google/ddpm-celebahq-256) were trained on, at 256 px.
    "facenet-160": Template("facenet-160", (160, 160), (
        (49.53, 68.20), (108.68, 67.51), (79.20, 93.09), (52.78, 112.16), (108.04, 111.15))),
    "dlib-150": Template("dlib-150", (150, 150), (
        (40.54, 34.04), (103.43, 33.97), (71.04, 70.44), (43.23, 97.50), (100.88, 97.91))),
    "fer-64": Template("fer-64", (64, 64), (
        (20.35, 25.37), (43.60, 25.03), (32.02, 38.85), (21.63, 49.18), (43.34, 48.65))),
    "celebahq-256": Template("celebahq-256", (256, 256), (
        (96.16, 121.38), (159.78, 121.65), (127.35, 158.71), (98.52, 186.46), (157.97, 186.25))),
}


def get_template(template: str | Template) -> Template:
    if isinstance(template, Template):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ConfigError(f"unknown alignment template {template!r}; known: {', '.join(TEMPLATES)}") from None


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transforms mapping ``src`` points onto ``dst`` (Umeyama 1991).

    src: (N, K, 2); dst: (K, 2) or (N, K, 2). Returns (N, 2, 3) matrices ``[sR | t]``.
    """
    src = src.to(torch.float64)
    dst = dst.to(src)
    if dst.dim() == 2:
        dst = dst.expand(src.shape[0], -1, -1)
    mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = s0.pow(2).sum((1, 2)) / src.shape[1]
    cov = d0.transpose(1, 2) @ s0 / src.shape[1]  # (N, 2, 2)
    u, sig, vh = torch.linalg.svd(cov)
    d = torch.ones(src.shape[0], 2, dtype=src.dtype, device=src.device)
    d[:, 1] = torch.sign(torch.linalg.det(u @ vh))
    d[d == 0] = 1.0
    rot = u @ torch.diag_embed(d) @ vh
    scale = (sig * d).sum(1) / var_s.clamp_min(1e-12)
    t = mu_d.squeeze(1) - scale[:, None] * (rot @ mu_s.transpose(1, 2)).squeeze(2)
    return torch.cat([scale[:, None, None] * rot, t[:, :, None]], dim=2).float()


def invert_affine(m: torch.Tensor) -> torch.Tensor:
    """Inverse of (N, 2, 3) affine matrices."""
    full = torch.cat([m, torch.tensor([0.0, 0.0, 1.0], device=m.device, dtype=m.dtype).expand(m.shape[0], 1, 3)], 1)
    return torch.linalg.inv(full)[:, :2]


def transform_points(m: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Apply (N, 2, 3) matrices to (N, K, 2) points."""
    return pts @ m[:, :, :2].transpose(1, 2) + m[:, None, :, 2]


def _scale_of(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.det(m[:, :, :2]).abs().sqrt()


def _translate(m: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """Matrix for the same mapping when the *source* is cropped at (dx, dy)."""
    shift = torch.tensor([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]], device=m.device, dtype=m.dtype)
    full = torch.cat([m, torch.tensor([[0.0, 0.0, 1.0]], device=m.device, dtype=m.dtype)], 0)
    return (full @ shift)[:2]


@dataclass
class AlignedFaces:
    crops: torch.Tensor  # (N, C, h, w)
    matrices: torch.Tensor  # (N, 2, 3): image pixel -> aligned pixel
    template: Template


def align_faces(image: torch.Tensor, landmarks: torch.Tensor, template: str | Template, *,
                size: tuple[int, int] | None = None, image_index: torch.Tensor | None = None,
                padding_mode: str = "reflection", antialias: bool = True) -> AlignedFaces:
    """Warp faces to ``template``.

    image: (C, H, W) or (B, C, H, W); landmarks: (N, 5, 2) in image pixels; ``image_index``
    (N,) says which batch image each face is in (default: all in image 0). ``size`` (h, w)
    rescales the template (e.g. to align for a model with another input size).
    """
    tpl = get_template(template)
    if image.dim() == 3:
        image = image.unsqueeze(0)
    landmarks = torch.as_tensor(landmarks, dtype=torch.float32, device=image.device).reshape(-1, 5, 2)
    n = landmarks.shape[0]
    h, w = size or tpl.size
    dst = tpl.tensor(image.device)
    if (h, w) != tpl.size:
        dst = dst * torch.tensor([w / tpl.size[1], h / tpl.size[0]], device=image.device)
    mats = similarity_transform(landmarks, dst)
    if n == 0:
        return AlignedFaces(image.new_zeros(0, image.shape[1], h, w), mats, tpl)
    if image_index is None:
        image_index = torch.zeros(n, dtype=torch.long)
    crops = []
    inv = invert_affine(mats)
    H, W = image.shape[-2:]
    corners = torch.tensor([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], dtype=torch.float32, device=image.device)
    for i in range(n):
        src = image[int(image_index[i])][None]
        m = mats[i: i + 1]
        # Crop the source to the region the output needs (+ margin), so big photos stay cheap.
        pts = transform_points(inv[i: i + 1], corners[None])[0]
        margin = 4.0 / float(_scale_of(m))
        x0 = int(max(0, math.floor(float(pts[:, 0].min()) - margin)))
        y0 = int(max(0, math.floor(float(pts[:, 1].min()) - margin)))
        x1 = int(min(W, math.ceil(float(pts[:, 0].max()) + margin) + 1))
        y1 = int(min(H, math.ceil(float(pts[:, 1].max()) + margin) + 1))
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            src = src[..., y0:y1, x0:x1]
            m = _translate(m[0], x0, y0)[None]
        scale = float(_scale_of(m))
        if antialias and scale < 0.5:
            # Box-filter down to ~1.5x the output scale first: warping then never aliases.
            k = scale * 1.5
            sh, sw = max(2, round(src.shape[-2] * k)), max(2, round(src.shape[-1] * k))
            fy, fx = sh / src.shape[-2], sw / src.shape[-1]
            src = F.interpolate(src, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
            # Source pixel centre j maps to (j + 0.5) * f - 0.5 in the resized image.
            pre = torch.tensor([[fx, 0.0, 0.5 * fx - 0.5], [0.0, fy, 0.5 * fy - 0.5], [0.0, 0.0, 1.0]],
                               device=m.device, dtype=m.dtype)
            m = (m[0] @ torch.linalg.inv(pre))[None]
        crops.append(warp_affine(src, m, dsize=(h, w), mode="bilinear", padding_mode=padding_mode, align_corners=True))
    return AlignedFaces(torch.cat(crops, 0), mats, tpl)


def feather_mask(size: tuple[int, int], *, feather: float = 0.12, shape: str = "rect",
                 device=None) -> torch.Tensor:
    """A (1, 1, h, w) mask that is 1 inside and ramps smoothly to 0 at the border.

    ``feather`` is the ramp width as a fraction of the shorter side; ``shape`` is "rect" or
    "ellipse".
    """
    h, w = size
    ys = torch.linspace(-1, 1, h, device=device)[:, None]
    xs = torch.linspace(-1, 1, w, device=device)[None, :]
    if shape == "ellipse":
        dist = 1.0 - torch.sqrt(xs**2 + ys**2)  # 0 at the inscribed ellipse, 1 at the centre
    elif shape == "rect":
        dist = torch.minimum(1.0 - xs.abs(), 1.0 - ys.abs())
    else:
        raise ConfigError(f"unknown mask shape {shape!r}")
    ramp = max(feather * 2.0, 1e-6)  # in the [-1, 1] coordinate system
    m = (dist / ramp).clamp(0, 1)
    m = m * m * (3 - 2 * m)  # smoothstep
    return m[None, None]


def paste_back(image: torch.Tensor, edited: torch.Tensor, matrices: torch.Tensor, *,
               reference: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               feather: float = 0.12, shape: str = "rect") -> torch.Tensor:
    """Put edited aligned faces back into ``image`` (C, H, W).

    edited: (N, C, h, w) aligned faces; matrices: (N, 2, 3) image -> aligned (from
    :func:`align_faces`). With ``reference`` (the unedited aligned faces), only the change
    ``edited - reference`` is warped back and added, so untouched pixels keep the photo's
    original resolution exactly. ``mask``: optional (N, 1, h, w) in aligned space, else a
    feathered rectangle/ellipse. Differentiable in ``edited`` and ``image``.
    """
    out = image.clone()
    C, H, W = image.shape
    n, _, h, w = edited.shape
    if n == 0:
        return out
    if mask is None:
        mask = feather_mask((h, w), feather=feather, shape=shape, device=image.device).expand(n, 1, h, w)
    payload = edited - reference if reference is not None else edited
    inv = invert_affine(matrices.to(image.device))
    corners = torch.tensor([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], dtype=torch.float32, device=image.device)
    for i in range(n):
        pts = transform_points(inv[i: i + 1], corners[None])[0]
        x0 = int(max(0, math.floor(float(pts[:, 0].min())) - 1))
        y0 = int(max(0, math.floor(float(pts[:, 1].min())) - 1))
        x1 = int(min(W, math.ceil(float(pts[:, 0].max())) + 2))
        y1 = int(min(H, math.ceil(float(pts[:, 1].max())) + 2))
        if x1 <= x0 or y1 <= y0:
            continue  # face entirely outside the image
        # aligned -> region pixel: inverse matrix followed by a shift of (-x0, -y0)
        m = inv[i].clone()
        m[0, 2] -= x0
        m[1, 2] -= y0
        size = (y1 - y0, x1 - x0)
        both = torch.cat([payload[i: i + 1], mask[i: i + 1].to(payload)], 1)
        warped = warp_affine(both, m[None], dsize=size, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        p, a = warped[:C], warped[C:C + 1]
        region = out[:, y0:y1, x0:x1]
        if reference is not None:
            new = region + a * p
        else:
            new = region * (1 - a) + a * p
        out = torch.cat([out[:, :y0], torch.cat([out[:, y0:y1, :x0], new, out[:, y0:y1, x1:]], 2), out[:, y1:]], 1)
    return out


def landmarks_tensor(faces, device=None) -> torch.Tensor:
    """Stack the landmarks of :class:`~facepriv.core.faces.Face` objects into (N, 5, 2)."""
    if not faces:
        return torch.zeros(0, 5, 2, device=device)
    return torch.from_numpy(np.stack([f.landmarks for f in faces]).astype(np.float32)).to(device)
