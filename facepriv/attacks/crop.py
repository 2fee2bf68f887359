"""The working crop of an attack: the part of a photo its faces' perturbations and alignments touch.

Every attack on a photo's pixels works on one crop around the faces (the union of their
regions and of the areas each surrogate's alignment reads, plus a margin for random
transformations): embeddings on the crop equal embeddings on the full photo, and a
24-megapixel photo costs what its faces cost. :func:`face_crop` builds it once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.align import landmarks_tensor
from ..core.faces import Face
from ..core.regions import region_mask


@dataclass
class FaceCrop:
    """The crop ``image[:, y0:y1, x0:x1]`` and its faces (only those whose region is on the image).

    ``ids``: indices into the caller's face list; ``lm`` (N, 5, 2) landmarks in crop pixels;
    ``masks`` (N, 1, h, w) soft region masks; ``union`` (1, h, w); ``owner`` (h, w) the face each
    pixel's change belongs to (-1: none); ``sizes`` (N,) face sizes in pixels.
    """

    x: torch.Tensor
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in the photo
    ids: list[int]
    lm: torch.Tensor
    masks: torch.Tensor
    union: torch.Tensor
    owner: torch.Tensor
    sizes: torch.Tensor

    def paste(self, full: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
        """A copy of ``full`` (3, H, W) with the crop replaced by ``crop``."""
        x0, y0, x1, y1 = self.box
        out = full.clone()
        out[:, y0:y1, x0:x1] = crop
        return out


def face_crop(x_full: torch.Tensor, faces: list[Face], ensemble, *, region: str = "face", feather: float = 0.1,
              grow: float = 0.0) -> FaceCrop | None:
    """The working crop of ``x_full`` (3, H, W) for ``faces``; None when no region is on the image.

    ``ensemble``: the models whose alignments must fit in the crop (anything with ``members``
    carrying a ``spec``); ``grow``: extra margin, as a fraction of each read area, for random
    transformations of the alignment.
    """
    from .linf import _read_extents

    dev = x_full.device
    H, W = x_full.shape[-2:]
    regions = [region_mask(f, (H, W), region=region, feather=feather, device=dev) for f in faces]
    ids = [i for i, r in enumerate(regions) if r is not None and float(r.mask.max()) > 0]
    if not ids:
        return None
    regs = [regions[i] for i in ids]
    lm_full = landmarks_tensor([faces[i] for i in ids], dev)
    ext = _read_extents(ensemble, lm_full, grow)
    x0 = int(max(0, min(math.floor(float(ext[:, 0].min())), min(r.x0 for r in regs))))
    y0 = int(max(0, min(math.floor(float(ext[:, 1].min())), min(r.y0 for r in regs))))
    x1 = int(min(W, max(math.ceil(float(ext[:, 2].max())) + 1, max(r.x1 for r in regs))))
    y1 = int(min(H, max(math.ceil(float(ext[:, 3].max())) + 1, max(r.y1 for r in regs))))
    x = x_full[:, y0:y1, x0:x1]
    h, w = x.shape[-2:]
    masks = torch.zeros(len(ids), 1, h, w, device=dev)
    for k, r in enumerate(regs):
        masks[k, :, r.y0 - y0: r.y1 - y0, r.x0 - x0: r.x1 - x0] = r.mask
    union = masks.amax(0)
    owner = torch.where(union[0] > 0, masks[:, 0].argmax(0), torch.full_like(union[0], -1, dtype=torch.long))
    sizes = torch.tensor([faces[i].size for i in ids], dtype=torch.float32, device=dev)
    lm = lm_full - torch.tensor([x0, y0], dtype=torch.float32, device=dev)
    return FaceCrop(x, (x0, y0, x1, y1), ids, lm, masks, union, owner, sizes)
