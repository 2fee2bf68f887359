"""Who is in each photo: identity labels of the clean photos, the pool of clean reference
photos, the impersonation targets and the gallery, each embedded once."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import ConfigError
from . import inputs as inp
from .common import _rel_label
from .config import AuditConfig
from .embed import FaceEmbeddingCache, ImageFaces

REF_SEED = 0  # seed of the per-image sample of reference photos (--max-refs)


class _Identities:
    """Identity of clean photos from the identities CSV, the gallery layout or a pairs file."""

    def __init__(self, cfg: AuditConfig, digest: inp.DigestCache, gallery: list[inp.GalleryImage]):
        self.digest = digest
        self.by_name: set[Path] = set()  # photos labelled from the identities CSV by bare file name
        self.csv = None
        if cfg.identities is not None:
            root = cfg.original if cfg.original.is_dir() else cfg.original.parent
            self.csv = inp.read_identities(cfg.identities, root=root)
        self.gallery_ids = {g.identity for g in gallery}
        self.gallery = inp.IdentityIndex(source="gallery")
        for g in gallery:
            self.gallery.add(g.path, g.identity, digest=digest(g.path))
        self.pairs = None
        self.pair_list: list[inp.LabelledPair] = []
        if cfg.pairs is not None:
            self.pair_list = inp.read_pairs(cfg.pairs, cfg.pairs_root)
            comp = inp.pair_components(self.pair_list)
            self.pairs = inp.IdentityIndex(source="pairs")
            for p, ident in comp.items():
                self.pairs.add(p, ident, digest=digest(p) if p.is_file() else None)

    def __call__(self, path: Path, rel: str | None = None) -> tuple[str | None, str | None]:
        d = self.digest(path)
        if self.csv is not None:
            hit, how = self.csv.lookup_how(path, rel=rel, digest=d)
            if hit:
                if how == "name":
                    self.by_name.add(Path(path).resolve())
                    return hit, "identities (file name)"
                return hit, "identities"
        if self.gallery_ids:
            parts = Path(rel).parts if rel else ()
            if len(parts) >= 2 and parts[0] in self.gallery_ids:
                return parts[0], "gallery-folder"
            hit = self.gallery.lookup(path, digest=d)
            if hit:
                return hit, "gallery"
        if self.pairs is not None:
            hit = self.pairs.lookup(path, digest=d)
            if hit:
                return hit, "pairs"
        return None, None

    def of_target(self, path: Path) -> str | None:
        """Identity of a target photo by path or content only (never by bare file name, and
        without counting it among the name-labelled originals)."""
        d = self.digest(path)
        for index in (self.csv, self.gallery if self.gallery_ids else None, self.pairs):
            if index is None:
                continue
            hit, how = index.lookup_how(path, digest=d)
            if hit and how != "name":
                return hit
        return None


def sample_refs(refs: list, k: int, key: str, seed: int = REF_SEED) -> list:
    """At most ``k`` of ``refs`` (all when ``k`` is 0 or there are no more): a sample drawn with a
    generator seeded by ``seed`` and ``key`` (the image's relative path), so the same image gets
    the same references in every run whatever the order of the images; the order of ``refs`` is kept."""
    if k <= 0 or len(refs) <= k:
        return list(refs)
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
    idx = np.random.default_rng(h).choice(len(refs), k, replace=False)
    return [refs[i] for i in sorted(idx.tolist())]


class ReferencePool:
    """The clean photos of known identity (originals, gallery, pairs file), each photo once
    (by content): the "other photos" dodging compares with, and the ROC's genuine / impostor pool."""

    def __init__(self, digest: inp.DigestCache):
        self.digest = digest
        self.entries: list[tuple[Path, str]] = []  # (resolved path, identity)
        self._seen: set[str] = set()

    def add(self, path: Path, ident: str | None) -> None:
        if ident is None or not path.is_file():
            return
        d = self.digest(path)
        if d in self._seen:
            return
        self._seen.add(d)
        self.entries.append((path.resolve(), ident))

    def by_identity(self) -> dict[str, list[Path]]:
        out: dict[str, list[Path]] = {}
        for path, ident in self.entries:
            out.setdefault(ident, []).append(path)
        return out


def label_images(pairs: list[inp.FilePair], gallery: list[inp.GalleryImage], identities: _Identities,
                 digest: inp.DigestCache) -> tuple[dict[str, tuple[str | None, str | None]], ReferencePool]:
    """The identity (and where it came from) of each image's original, by relative path of the
    protected image, and the pool of clean reference photos."""
    pair_ident = {}
    for fp in pairs:
        pair_ident[fp.rel] = identities(fp.original, fp.original_rel)
    pool = ReferencePool(digest)
    for fp in pairs:
        pool.add(fp.original, pair_ident[fp.rel][0])
    for g in gallery:
        pool.add(g.path, g.identity)
    for lp in identities.pair_list:
        for p in (lp.a, lp.b):
            if p.is_file():
                pool.add(p, identities(p)[0])
    return pair_ident, pool


def resolve_targets(cfg: AuditConfig, digest: inp.DigestCache, notes: list[str]) -> list[Path]:
    """The impersonation target photos, less the one(s) used to protect (``target_used``)."""
    if cfg.target is None:
        return []
    all_targets = [p for _, p in inp._images(cfg.target, cfg.glob, "--target")]
    used = {digest(p) for p in cfg.target_used}
    targets = [p for p in all_targets if digest(p) not in used]
    if not targets:
        raise ConfigError("no target photo is left once the photo(s) used for protection are excluded; "
                          "give another photo of the target identity")
    if not cfg.target_used:
        notes.append(f"--allow-target-reuse: impersonation is measured against all {len(all_targets)} target "
                     "photo(s), which probably include the one used to protect (optimistic); the usual "
                     "protocol excludes it (--target-used) and uses other photos of the target")
    return targets


@dataclass
class GallerySet:
    """The gallery photos with a detected face, embedded per model (identification)."""

    ok: list[tuple[inp.GalleryImage, ImageFaces]]
    ids: list[str]  # identity of each photo of ``ok``
    emb: dict[str, torch.Tensor]  # model -> (len(ok), D)
    by_digest: dict[str, list[int]]  # content digest -> indices into ``ok``
    identities: set[str]  # every identity of the gallery (with or without a face)

    @classmethod
    def build(cls, gallery: list[inp.GalleryImage], cache: FaceEmbeddingCache, digest: inp.DigestCache,
              models: dict, identities: set[str], notes: list[str]) -> GallerySet:
        rows = [(g, cache.get(g.path)) for g in gallery]
        ok = [(g, r) for g, r in rows if not r.error and r.faces]
        if gallery and len(ok) < len(gallery):
            notes.append(f"{len(gallery) - len(ok)} gallery photo(s) without a detected face were left out")
        by_digest: dict[str, list[int]] = {}
        for k, (g, _) in enumerate(ok):
            by_digest.setdefault(digest(g.path), []).append(k)
        emb = {m: torch.stack([r.embeddings[m][0] for _, r in ok]) for m in models} if ok else {}
        return cls(ok=ok, ids=[g.identity for g, _ in ok], emb=emb, by_digest=by_digest, identities=identities)


@dataclass
class TargetSet:
    """The impersonation target photos with a detected face, embedded per model."""

    ok: list[Path]
    emb: dict[str, torch.Tensor]  # model -> (len(ok), D)
    digests: list[str]
    idents: list[str | None]  # identity of each target photo, where the labels know it
    labels: list[str]  # as the report names them

    @classmethod
    def build(cls, cfg: AuditConfig, targets: list[Path], cache: FaceEmbeddingCache, digest: inp.DigestCache,
              models: dict, identities: _Identities) -> TargetSet:
        ok = [p for p in targets if cache.get(p).faces and not cache.get(p).error]
        if targets and not ok:
            raise ConfigError("no face was found in any target photo")
        emb = {m: torch.stack([cache.get(t).embeddings[m][0] for t in ok]) for m in models} if ok else {}
        return cls(ok=ok, emb=emb, digests=[digest(t) for t in ok], idents=[identities.of_target(t) for t in ok],
                   labels=[_rel_label(t, cfg) for t in ok])
