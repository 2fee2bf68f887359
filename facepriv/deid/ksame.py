"""k-Same de-identification: replace each face by the average of k faces of other people.

k-Same (Newton, Sweeney & Malin, IEEE TKDE 2005) replaces a face by the mean of the k
closest faces of a face set, so that no output can be linked back to fewer than k people.
facepriv's variants work on faces aligned to one template (:func:`ksame_template`, the
ArcFace five-point layout with room for brows and chin):

``k-same-average``
    the k pool faces closest **in pixels** (masked grey aligned crops), averaged
    (k-Same-Pixel).
``k-same-select``
    the k pool faces closest **in identity** (embedding distance of a face-recognition model
    from the registry, default dlib-resnet), averaged: the result keeps the look (age,
    gender, skin tone) of similar-looking people, the selection criterion of k-Same-Select.
``k-same-pixelate``
    the k-same average, shown as a mosaic (blocks of the average = averages of the blocks).

**The guarantee.** Every output face is the exact mean of k aligned pool faces belonging to
k *distinct identities*, none of them the person being replaced:

* identity = the pool sub-folder name when the pool is a folder of identity folders
  (``pool/alice/*.jpg``, ``pool/bob/*.jpg``); faces in images directly in the pool folder
  (also next to identity folders) are grouped into identities by the recognition model (faces
  it matches at its threshold are one person, transitively; a loose face it matches to an
  identity folder joins that identity), or each face is its own identity when no model is used;
* the face itself (when the pool contains the photo being processed, e.g. a batch that is its
  own pool) and every pool identity the recognition model matches to it are excluded;
* fewer than k eligible identities is an error, never a weaker output.

The average is pasted back into the photo with a feathered mask in aligned space chosen by
``region``: ``face`` an ellipse from brows to chin, cheek to cheek (hair, ears and background
stay the photo's own); ``box`` the rectangle around that ellipse; ``head`` a larger ellipse
with hair and ears (the pool is then aligned on a zoomed-out template, ``ksame-head-128``, so
the crops hold the whole head; a pool aligned for one template is refused by the other). ``match_color``
(default on) shifts the average's mean colour inside that ellipse to the replaced face's, so
the seam does not show; it is a per-channel constant and carries no facial structure.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.align import TEMPLATES, Template, align_faces, landmarks_tensor, paste_back
from ..core.config import ConfigBase
from ..core.errors import ConfigError, FaceprivError
from ..core.faces import Face, FacePolicy
from ..core.saving import SaveFormat, load_weights, read_metadata, read_settings, save_network
from .base import DeidMethod, register_method

WORK_SIZE = 128


#: the head region is wider and taller than the face: the head template shows the face smaller
HEAD_ZOOM = 1.25


def _face_geometry(points) -> tuple[float, float, float, float]:
    """Centre x, y and semi-axes (across, along) of the face ellipse (brows to chin) of five points."""
    p = np.asarray(points, dtype=np.float64)
    eye_y, mouth_y = p[:2, 1].mean(), p[3:, 1].mean()
    em = mouth_y - eye_y
    eye_d = float(np.hypot(*(p[1] - p[0])))
    top, bottom = eye_y - 0.75 * em, mouth_y + 0.65 * em
    return float(p[:2, 0].mean()), float((top + bottom) / 2), eye_d, float((bottom - top) / 2)


def _region_geometry(points, region: str) -> tuple[float, float, float, float, str]:
    """Centre, half-sizes and shape of ``region`` in aligned space (turned with the face): the
    face ellipse (brows to chin, cheek to cheek); head: an ellipse 1.37 x 1.39 times larger and
    shifted up, the proportions of the head to the face region in :mod:`facepriv.core.regions`
    (hair and ears); box: the rectangle around the face ellipse."""
    cx, cy, a, b = _face_geometry(points)
    if region == "face":
        return cx, cy, a, b, "ellipse"
    if region == "head":
        return cx, cy - 0.136 * b, a * 0.85 / 0.62, b * 0.92 / 0.66, "ellipse"
    if region == "box":
        return cx, cy, a, b, "box"
    raise ConfigError(f"unknown region {region!r}")


def ksame_template(size: int = WORK_SIZE, region: str = "face") -> Template:
    """ArcFace's five points, scaled so that brows-to-chin fits a ``size`` square crop
    (``region="head"``: zoomed out by :data:`HEAD_ZOOM` and centred on the head ellipse, so
    hair and ears are in the crop)."""
    arc = np.asarray(TEMPLATES["arcface-112"].points, dtype=np.float64)
    eye_y, mouth_y = arc[:2, 1].mean(), arc[3:, 1].mean()
    s = 0.3 * 128 / (mouth_y - eye_y)  # eye-to-mouth distance = 0.3 x crop side
    pts = (arc - 56.0) * s
    # centre the face ellipse (see face_ellipse) in the crop
    em = (mouth_y - eye_y) * s
    cy = pts[:2, 1].mean() + 0.45 * em
    pts = pts + np.array([64.0, 64.0 - cy])
    name = f"ksame-{size}"
    if region == "head":
        hx, hy = _region_geometry(pts, "head")[:2]
        pts = (pts - [hx, hy]) / HEAD_ZOOM + 64.0
        name = f"ksame-head-{size}"
    elif region not in ("face", "box"):
        raise ConfigError(f"unknown region {region!r}")
    pts = pts * (size / 128.0)
    return Template(name, (size, size), tuple((float(x), float(y)) for x, y in pts))


def _smooth(r: torch.Tensor, feather: float) -> torch.Tensor:
    if feather > 0:
        m = ((1 + feather - r) / (2 * feather)).clamp(0, 1)
        return m * m * (3 - 2 * m)
    return (r <= 1).float()


def face_ellipse(template: Template, *, feather: float = 0.15, device=None) -> torch.Tensor:
    """(1, 1, h, w) soft ellipse of the face (brows to chin) in ``template``'s aligned space."""
    return region_mask_aligned(template, "face", feather=feather, device=device)


def region_mask_aligned(template: Template, region: str = "face", *, feather: float = 0.15,
                        device=None) -> torch.Tensor:
    """(1, 1, h, w) soft mask of ``region`` (face | head | box) in ``template``'s aligned space."""
    h, w = template.size
    cx, cy, a, b, shape = _region_geometry(template.points, region)
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None]
    xs = torch.arange(w, device=device, dtype=torch.float32)[None, :]
    u, v = (xs - cx) / a, (ys - cy) / b
    r = torch.sqrt(u**2 + v**2) if shape == "ellipse" else torch.maximum(u.abs(), v.abs())
    return _smooth(r, feather)[None, None]


def grey_features(crops: torch.Tensor, mask: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Masked, mean-removed, unit-norm grey 32x32 vectors for pixel-space nearest neighbours."""
    g = (0.299 * crops[:, 0] + 0.587 * crops[:, 1] + 0.114 * crops[:, 2])[:, None]
    g = F.interpolate(g, size=(size, size), mode="area")
    m = F.interpolate(mask.to(g), size=(size, size), mode="area")
    mean = (g * m).sum((2, 3), keepdim=True) / m.sum((2, 3), keepdim=True).clamp_min(1e-6)
    v = ((g - mean) * m).flatten(1)
    return v


@dataclass
class PoolSettings(ConfigBase):
    """What a saved pool records besides its faces: the template they are aligned on and how
    their identities were found (folders | clustered | faces)."""

    config_name = "k-same pool setting"

    template: str
    size: list[int]
    points: list[list[float]]
    identity_mode: str = "faces"


#: a saved pool: ``config.json`` + ``pool.safetensors`` (crops and embeddings), see core.saving
POOL_FORMAT = SaveFormat("facepriv-face-pool", 1, "k-same pool")
POOL_WEIGHTS = "pool.safetensors"


@dataclass
class FacePool:
    """Aligned faces (on the k-Same template) with their identities and where they came from."""

    crops: torch.Tensor  # (N, 3, S, S) float [0, 1], CPU
    identities: list[str]
    sources: list[str]  # "path#face_index"
    template: Template
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # model name -> (N, D)
    identity_mode: str = "faces"  # folders | clustered | faces

    def __len__(self) -> int:
        return int(self.crops.shape[0])

    @property
    def n_identities(self) -> int:
        return len(set(self.identities))

    @classmethod
    def empty(cls, size: int = WORK_SIZE, region: str = "face") -> FacePool:
        return cls(torch.zeros(0, 3, size, size), [], [], ksame_template(size, region))

    def own_faces(self) -> list[bool]:
        """Faces whose identity is not known yet (not from a folder name, not clustered)."""
        return [self.identities[i] == self.sources[i] for i in range(len(self))]

    def add(self, image: torch.Tensor, faces: Sequence[Face], source: str, identity: str | None = None,
            models: dict | None = None) -> None:
        """Add the faces of one image (3, H, W); ``identity`` None = each face its own."""
        if not faces:
            return
        from ..models.recognition import embed_faces

        lm = landmarks_tensor(list(faces), device=image.device)
        crops = align_faces(image, lm, self.template).crops.float().cpu()
        self.crops = torch.cat([self.crops, crops], 0)
        for i in range(len(faces)):
            self.sources.append(f"{source}#{i}")
            self.identities.append(identity if identity is not None else f"{source}#{i}")
        for name, model in (models or {}).items():
            with torch.no_grad():
                e = embed_faces(model, image, lm).float().cpu()
            prev = self.embeddings.get(name)
            self.embeddings[name] = e if prev is None else torch.cat([prev, e], 0)

    def cluster_identities(self, model, threshold: float) -> None:
        """Give the faces whose identity is still unknown (each its own: images directly in the
        pool folder, or a pool built from the inputs) the identity ``model`` finds for them.

        Faces the model matches (similarity >= ``threshold``) are one person, transitively. A
        face that matches faces of an identity folder joins that folder's identity; when such
        matches join several folders, those folders become one identity (counting them as
        distinct could put one person twice into an average). Folder faces are never split
        and never linked to each other by the model: their names are the user's labels.
        """
        from ..models.recognition import similarity_matrix

        own = self.own_faces()
        if not any(own):
            return
        emb = self.embeddings.get(model.spec.name)
        if emb is None or len(self) == 0:
            raise FaceprivError(f"k-same: the pool has no {model.spec.name} embeddings to group its faces by identity")
        sim = similarity_matrix(emb, emb, model.metric)
        parent = list(range(len(self)))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        def union(i, j):
            parent[find(i)] = find(j)

        first_of: dict[str, int] = {}
        for i in range(len(self)):  # a folder's faces are one person
            if not own[i]:
                union(i, first_of.setdefault(self.identities[i], i))
        ii, jj = torch.nonzero(sim >= threshold, as_tuple=True)
        for i, j in zip(ii.tolist(), jj.tolist()):
            if i < j and (own[i] or own[j]):
                union(i, j)
        groups: dict[int, list[int]] = {}
        for i in range(len(self)):
            groups.setdefault(find(i), []).append(i)
        for members in groups.values():
            folders = sorted({self.identities[i] for i in members if not own[i]})
            if folders:
                name = "+".join(folders)
            else:
                root = members[0]
                name = f"person-{root}:{self.sources[root]}"
            if len(folders) > 1 or any(own[i] for i in members):
                for i in members:
                    self.identities[i] = name
        if self.identity_mode == "faces":
            self.identity_mode = "clustered"
        elif self.identity_mode == "folders":
            self.identity_mode = "folders+clustered"

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, detector, *, policy: FacePolicy | None = None,
                    size: int = WORK_SIZE, models: dict | None = None, device="cpu", progress: bool = True,
                    max_pixels: int | None = None, region: str = "face") -> FacePool:
        """Detect and align every face of every image under ``folder`` (see the module doc)."""
        from ..core.batch import collect_inputs
        from ..core.io import load_image
        from ..core.progress import make_progress

        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"--k-pool {folder} is not a folder")
        items = collect_inputs([folder])
        pool = cls.empty(size, region)
        layout = any(len(it.rel.parts) > 1 for it in items)
        kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
        with make_progress(enabled=progress) as bar:
            task = bar.add_task("k-same pool", total=len(items))
            for it in items:
                try:
                    img = load_image(it.path, **kwargs)
                except FaceprivError:
                    bar.advance(task)
                    continue  # an unreadable pool file is not worth stopping for
                faces = (policy or FacePolicy()).select(detector.detect(img.rgb))
                identity = it.rel.parts[0] if len(it.rel.parts) > 1 else None
                pool.add(img.to_tensor(device), faces, str(it.path), identity, models)
                bar.advance(task)
        if layout:
            pool.identity_mode = "folders"
        return pool

    def save(self, path: str | os.PathLike) -> Path:
        """Store the pool as a folder (facepriv's save format, :data:`POOL_FORMAT`, written
        atomically) to reuse it without detection; returns the folder."""
        settings = PoolSettings(self.template.name, list(self.template.size),
                                [list(p) for p in self.template.points], self.identity_mode)
        tensors = {"crops": self.crops, **{f"emb.{k}": v for k, v in self.embeddings.items()}}
        return save_network(path, POOL_FORMAT, settings, weights={POOL_WEIGHTS: tensors},
                            extra={"identities": list(self.identities), "sources": list(self.sources)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> FacePool:
        """A pool written by :meth:`save` (a folder), or by older versions (one .safetensors file)."""
        path = Path(path).expanduser()
        if path.is_file():
            return cls._load_single_file(path)
        meta = read_metadata(path, POOL_FORMAT)
        settings = PoolSettings.from_dict(read_settings(meta, POOL_FORMAT))
        tensors = load_weights(path, POOL_WEIGHTS, POOL_FORMAT)
        return cls._from_saved(tensors, meta.get("identities") or [], meta.get("sources") or [], settings)

    @classmethod
    def _from_saved(cls, tensors: dict, identities: list, sources: list, settings: PoolSettings) -> FacePool:
        crops = tensors["crops"]
        if not len(identities) == len(sources) == int(crops.shape[0]):
            raise ConfigError(f"a saved k-same pool with {int(crops.shape[0])} faces, {len(identities)} identities "
                              f"and {len(sources)} sources: damaged")
        template = Template(settings.template, tuple(settings.size), tuple(tuple(p) for p in settings.points))
        return cls(crops, list(identities), list(sources), template,
                   {k[4:]: v for k, v in tensors.items() if k.startswith("emb.")}, settings.identity_mode)

    @classmethod
    def _load_single_file(cls, path: Path) -> FacePool:
        """The one-file layout of earlier versions: tensors + JSON names in the safetensors header."""
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if "template" not in meta or "crops" not in tensors:
            raise ConfigError(f"{path} is not a saved k-same pool")
        name, size, points = json.loads(meta["template"])
        settings = PoolSettings(name, size, points, meta.get("identity_mode", "faces"))
        return cls._from_saved(tensors, json.loads(meta["identities"]), json.loads(meta["sources"]), settings)


def is_saved_pool(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a pool written by :meth:`FacePool.save` (a folder, or an older
    single file) rather than a folder of photos to build one from."""
    path = Path(path).expanduser()
    if path.is_file():
        return True
    try:
        read_metadata(path, POOL_FORMAT)
    except ConfigError:
        return False
    return True


class KSame(DeidMethod):
    """Shared machinery of the k-Same variants (see the module docstring)."""

    name = "k-same"
    default_feather = 0.15
    select_by = "pixels"  # or "identity"
    mosaic = False

    def __init__(self, *, k: int = 5, pool: FacePool | str | os.PathLike | None = None, model: str | None = "dlib-resnet",
                 threshold: float | None = None, match_color: bool = True, size: int = WORK_SIZE, **kw):
        super().__init__(**kw)
        if int(k) < 2:
            raise ConfigError(f"{self.name}: k must be at least 2 (k=1 would copy a real face)")
        if self.select_by == "identity" and not model:
            raise ConfigError(f"{self.name} needs a face-recognition model (--k-model)")
        if threshold is not None and not model:
            raise ConfigError(f"{self.name}: --k-threshold needs a recognition model (--k-model)")
        self.k = int(k)
        self.model_name = model
        self.threshold = threshold
        self.match_color = bool(match_color)
        self.size = int(size)
        self.template = ksame_template(self.size, self.region)
        self.model = None
        self.pool: FacePool | None = None
        self.pool_path: Path | None = None
        if isinstance(pool, FacePool):
            self.set_pool(pool)
        elif pool is not None:
            self.pool_path = Path(pool)
            if not self.pool_path.exists():
                raise ConfigError(f"--k-pool {self.pool_path} does not exist")

    # ------------------------------------------------------------------ setup
    def setup(self, device="cpu") -> KSame:
        super().setup(device)
        if self.model_name and self.model is None:
            from ..models import create_model, get_spec

            spec = get_spec(self.model_name)
            if spec.task != "recognition":
                raise ConfigError(f"--k-model {self.model_name}: a {spec.task} model, not face recognition")
            self.model = create_model(self.model_name, device=self.device)
            if self.threshold is None:
                th = spec.thresholds
                self.threshold = th.get("default", th.get("1e-3"))
        if self.pool is None and self.pool_path is not None and is_saved_pool(self.pool_path):
            self.set_pool(FacePool.load(self.pool_path))  # a pool saved with FacePool.save
        elif self.pool is not None:
            self.set_pool(self.pool)  # cluster its identities now that the model is loaded
        return self

    def pool_models(self) -> dict:
        return {self.model.spec.name: self.model} if self.model is not None else {}

    def set_pool(self, pool: FacePool) -> None:
        if pool.template.name != self.template.name or pool.template.size != self.template.size:
            raise ConfigError(f"{self.name}: the pool was aligned on the template {pool.template.name}, the method "
                              f"(--region {self.region}) works on {self.template.name}; build the pool again")
        if self.model is not None and self.threshold is not None and any(pool.own_faces()):
            self._pool_embeddings_of(pool)
            pool.cluster_identities(self.model, self.threshold)
        self.pool = pool

    def build_pool(self, folder: str | os.PathLike, detector, *, policy: FacePolicy | None = None,
                   progress: bool = True) -> FacePool:
        pool = FacePool.from_folder(folder, detector, policy=policy, size=self.size, models=self.pool_models(),
                                    device=self.device, progress=progress, region=self.region)
        self.set_pool(pool)
        return pool

    # ------------------------------------------------------------------ selection
    def _pool_embeddings(self) -> torch.Tensor | None:
        return self._pool_embeddings_of(self.pool)

    def _pool_embeddings_of(self, pool: FacePool) -> torch.Tensor | None:
        if self.model is None:
            return None
        name = self.model.spec.name
        emb = pool.embeddings.get(name)
        if emb is None or len(emb) != len(pool):  # a pool built without this model: embed the aligned crops
            from ..attacks.identity import SurrogateEnsemble

            ens = SurrogateEnsemble([name], models=[self.model])
            chunks = [ens.embed_aligned(c.to(self.device), pool.template)[name].float().cpu()
                      for c in pool.crops.split(32)]
            emb = torch.cat(chunks) if chunks else torch.zeros(0, 1)
            pool.embeddings[name] = emb
        return emb

    def select(self, crops: torch.Tensor, query_emb: torch.Tensor | None) -> list[list[int]]:
        """Indices of the k pool faces (k distinct identities, never the query's) per query."""
        from ..models.recognition import similarity_matrix

        pool = self.pool
        if pool is None or len(pool) == 0:
            raise ConfigError(f"{self.name} needs a face pool: give --k-pool DIR or several photos to process")
        mask = face_ellipse(self.template, feather=0.0)
        pf = grey_features(pool.crops, mask)
        qf = grey_features(crops.float().cpu(), mask)
        pixel_d = torch.cdist(qf, pf)
        # the query itself: a pool crop (nearly) equal to it
        same_pix = (crops.float().cpu()[:, None] - pool.crops[None]).abs().flatten(2).mean(2) < 2.0 / 255
        sim = None
        pool_emb = self._pool_embeddings()
        if pool_emb is not None and query_emb is not None and len(pool_emb):
            sim = similarity_matrix(query_emb.float().cpu(), pool_emb, self.model.metric)
        out = []
        for q in range(crops.shape[0]):
            excluded = {pool.identities[j] for j in torch.nonzero(same_pix[q]).flatten().tolist()}
            if sim is not None and self.threshold is not None:
                excluded |= {pool.identities[j] for j in torch.nonzero(sim[q] >= self.threshold).flatten().tolist()}
            if self.select_by == "identity":
                if sim is None:
                    raise ConfigError(f"{self.name}: no identity embeddings (is --k-model set?)")
                order = torch.argsort(sim[q], descending=True).tolist()
            else:
                order = torch.argsort(pixel_d[q]).tolist()
            chosen, ids = [], set()
            for j in order:
                ident = pool.identities[j]
                if ident in excluded or ident in ids:
                    continue
                chosen.append(j)
                ids.add(ident)
                if len(chosen) == self.k:
                    break
            if len(chosen) < self.k:
                avail = len(set(pool.identities) - excluded)
                raise FaceprivError(
                    f"{self.name}: only {avail} pool identit{'y' if avail == 1 else 'ies'} other than the face's own "
                    f"(k={self.k}); give a larger --k-pool or a smaller --k")
            out.append(chosen)
        return out

    # ------------------------------------------------------------------ synthesis
    def synthesize(self, crops: torch.Tensor, chosen: list[list[int]]) -> torch.Tensor:
        """The k-same faces in aligned space: mean of the chosen pool crops (+ colour shift, mosaic)."""
        pool = self.pool.crops
        avg = torch.stack([pool[idx].mean(0) for idx in chosen]).to(crops)
        if self.match_color:
            m = face_ellipse(self.template, feather=0.0, device=crops.device)
            area = m.sum().clamp_min(1.0)
            shift = ((crops - avg) * m).sum((2, 3), keepdim=True) / area
            avg = avg + shift
        if self.mosaic:
            avg = self._mosaic(avg)
        return avg.clamp(0, 1)

    def block(self) -> int:
        return max(2, int(round(self.size * self.strength / 8.0)))

    def _mosaic(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block()
        h, w = x.shape[-2:]
        ph, pw = (-h) % b, (-w) % b
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate")
        means = F.avg_pool2d(xp, b, b)
        return means.repeat_interleave(b, 2).repeat_interleave(b, 3)[..., :h, :w]

    def apply(self, image: torch.Tensor, faces: list[Face]) -> torch.Tensor:
        self.last_info = {}
        if not faces:
            return image.clone()
        if self.pool is None and self.pool_path is not None:
            raise ConfigError(f"{self.name}: the pool {self.pool_path} has not been built (call build_pool)")
        lm = landmarks_tensor(faces, device=image.device)
        aligned = align_faces(image, lm, self.template)
        q_emb = None
        if self.model is not None:
            from ..models.recognition import embed_faces

            with torch.no_grad():
                q_emb = embed_faces(self.model, image, lm)
        chosen = self.select(aligned.crops, q_emb)
        synth = self.synthesize(aligned.crops, chosen)
        mask = region_mask_aligned(self.template, self.region, feather=self.feather, device=image.device)
        out = paste_back(image, synth, aligned.matrices, mask=mask.expand(len(faces), 1, -1, -1))
        self.last_info = {"k": self.k, "faces": [
            {"pool": [self.pool.sources[j] for j in idx], "identities": [self.pool.identities[j] for j in idx]}
            for idx in chosen]}
        return out

    def describe(self) -> dict:
        return {**super().describe(), "k": self.k, "model": self.model_name, "threshold": self.threshold,
                "match_color": self.match_color, "size": self.size, "template": self.template.name}


@register_method(aliases=("ksame", "k-same", "ksame-average"))
class KSameAverage(KSame):
    """k-Same-Pixel: the average of the k faces closest in (aligned, masked) pixels."""

    name = "k-same-average"
    uses_strength = False  # k is the privacy parameter; an exact average has nothing to scale
    select_by = "pixels"


@register_method(aliases=("ksame-select",))
class KSameSelect(KSame):
    """The average of the k faces closest in identity (face-recognition embedding distance)."""

    name = "k-same-select"
    uses_strength = False  # k is the privacy parameter; an exact average has nothing to scale
    select_by = "identity"


@register_method(aliases=("ksame-pixelate",))
class KSamePixelate(KSame):
    """The k-same average shown as a mosaic of ``size / (8 / strength)`` pixel blocks."""

    name = "k-same-pixelate"
    select_by = "pixels"
    mosaic = True


def ksame_methods(methods: Iterable[DeidMethod]) -> list[KSame]:
    return [m for m in methods if isinstance(m, KSame)]
