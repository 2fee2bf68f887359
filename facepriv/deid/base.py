"""The interface every de-identification method implements, and the method table.

A method is a small class with one job: given a float RGB image (3, H, W) in [0, 1] and the
faces found in it, return a new image in which those faces are unrecognisable. Methods are
created by name (:func:`create_method`), moved to a device once (:meth:`DeidMethod.setup`,
where methods that need models load them) and then applied to any number of images or video
frames. ``apply_batch`` treats several images at once (the default loops; methods with
batched models override it). What a method decided for the last image (which pool faces were
averaged, how many generation tries were needed) is in ``last_info`` and goes into the batch
manifest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from ..core.errors import ConfigError
from ..core.faces import Face
from ..core.regions import REGIONS, region_mask


class DeidMethod(ABC):
    """Turns the faces of one image into unrecognisable ones.

    ``apply`` takes a float RGB image (3, H, W) in [0, 1] and the faces to treat; it returns
    a new tensor and never modifies its input. ``strength`` scales the method's main parameter
    (1.0 = the default, chosen to defeat recognition); ``region`` is face | head | box (methods
    list the ones they apply in ``regions``); ``feather`` the soft-edge width (fraction of the region).
    """

    name: str = "method"
    default_feather: float = 0.1
    #: the ``region`` values the method applies; a method with its own shape (the eye bar) has
    #: none, and its manifest entry says ``"region": null`` whatever was asked
    regions: tuple[str, ...] = REGIONS
    #: whether ``strength`` changes anything (a solid mask and a k-same average have no
    #: parameter it could scale); a method that ignores it says ``"strength": null``
    uses_strength: bool = True

    def __init__(self, *, strength: float = 1.0, region: str = "face", feather: float | None = None):
        if strength <= 0:
            raise ConfigError(f"{self.name}: strength must be > 0")
        if region not in REGIONS:
            raise ConfigError(f"unknown region {region!r}; use one of {', '.join(REGIONS)}")
        self.strength = float(strength)
        self.region = region
        self.feather = self.default_feather if feather is None else float(feather)
        if self.feather < 0:
            raise ConfigError(f"{self.name}: feather must be >= 0")
        self.device = torch.device("cpu")
        self.last_info: dict = {}

    def setup(self, device: str | torch.device = "cpu") -> DeidMethod:
        """Prepare to run on ``device`` (methods with models load them here). Returns self."""
        self.device = torch.device(device)
        return self

    @abstractmethod
    def apply(self, image: torch.Tensor, faces: list[Face]) -> torch.Tensor:
        ...

    def apply_batch(self, images: list[torch.Tensor], faces: list[list[Face]]) -> list[torch.Tensor]:
        """Several images (each (3, H, W), sizes may differ) with their faces."""
        return [self.apply(im, f) for im, f in zip(images, faces)]

    @property
    def honours_region(self) -> bool:
        return self.region in self.regions

    def describe(self) -> dict:
        """What the method does, for the manifest: the region only if it is really applied."""
        d = {"method": self.name, "strength": self.strength if self.uses_strength else None,
             "region": self.region if self.honours_region else None, "feather": self.feather}
        if not self.uses_strength and self.strength != 1.0:
            d["strength_ignored"] = self.strength
        if not self.honours_region:
            d["region_ignored"] = self.region
        return d


class RegionEffect(DeidMethod):
    """A method that replaces each face region by ``effect(crop, face)`` blended with its mask."""

    #: extra context (pixels, as a fraction of the face size) the effect needs around the region
    context: float = 0.0

    @abstractmethod
    def effect(self, crop: torch.Tensor, face: Face) -> torch.Tensor:
        """crop: (3, h, w) around the region; returns the same shape."""

    def apply(self, image: torch.Tensor, faces: list[Face]) -> torch.Tensor:
        out = image.clone()
        H, W = image.shape[-2:]
        for face in faces:
            reg = region_mask(face, (H, W), region=self.region, feather=self.feather, device=image.device)
            if reg is None:
                continue
            pad = int(round(self.context * face.size))
            y0, y1 = max(0, reg.y0 - pad), min(H, reg.y1 + pad)
            x0, x1 = max(0, reg.x0 - pad), min(W, reg.x1 + pad)
            crop = out[:, y0:y1, x0:x1]
            eff = self.effect(crop, face)[:, reg.y0 - y0: reg.y1 - y0, reg.x0 - x0: reg.x1 - x0]
            ys, xs = reg.slices
            out[:, ys, xs] = out[:, ys, xs] * (1 - reg.mask) + eff * reg.mask
        return out


METHODS: dict[str, Callable[..., DeidMethod]] = {}
#: other spellings accepted by :func:`create_method` (not listed separately)
ALIASES: dict[str, str] = {}


def register_method(cls=None, *, aliases: tuple[str, ...] = ()):
    """Class decorator adding a method to :data:`METHODS` under ``cls.name`` (and ``aliases``)."""

    def deco(c):
        METHODS[c.name] = c
        for a in aliases:
            ALIASES[a] = c.name
        return c

    return deco(cls) if cls is not None else deco


def canonical_name(name: str) -> str:
    name = name.strip().lower()
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise ConfigError(f"unknown deid method {name!r}; available: {', '.join(sorted(METHODS))}")
    return name


def create_method(name: str, **kwargs) -> DeidMethod:
    return METHODS[canonical_name(name)](**kwargs)
