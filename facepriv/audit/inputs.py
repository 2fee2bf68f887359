"""What the audit compares: protected <-> original matching, identities, pairs, galleries.

* :func:`match_files` pairs every protected file with its original by **relative path**
  (``protected/a/b.png`` <-> ``original/a/b.jpg``: same path, or same path with another
  image suffix), never by sorted order.
* Identities of clean photos come from, in order: an identities CSV (``file,identity``), the
  gallery folder structure (``gallery/<identity>/*.jpg``; an original whose first folder is
  a gallery identity, or which is the same file/content as a gallery photo), or a pairs file
  (connected components of its "same" pairs). Only the identities CSV may fall back to the
  bare file name (a row ``1.jpg,bob`` for ``photos/x/1.jpg``); galleries and pairs files
  match by path or content only, since two people's photos often share a name.
* :func:`read_pairs` reads a labelled pairs file: LFW's ``pairs.txt`` as distributed, or a
  list ``file_x,file_y,label`` (comma, semicolon, tab or space separated; label yes/no,
  same/different, 1/0, true/false, genuine/impostor, match/mismatch; header optional).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..core.batch import collect_inputs
from ..core.errors import ConfigError
from ..core.io import IMAGE_SUFFIXES

_SAME = {"yes", "y", "same", "1", "true", "t", "genuine", "match", "matched", "positive", "pos"}
_DIFF = {"no", "n", "different", "diff", "0", "-1", "false", "f", "impostor", "imposter", "mismatch",
         "mismatched", "negative", "neg"}


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (used to recognise the same photo under another name)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class DigestCache:
    """Content hashes, computed once per path."""

    def __init__(self):
        self._d: dict[Path, str] = {}

    def __call__(self, path: Path) -> str:
        path = Path(path).resolve()
        if path not in self._d:
            self._d[path] = file_digest(path)
        return self._d[path]


@dataclass(frozen=True)
class FilePair:
    """One protected file and its clean original, matched by relative path."""

    rel: str  # posix relative path of the protected file
    protected: Path
    original: Path
    original_rel: str


def _images(root: Path, glob: str | None, what: str | None = None) -> list[tuple[str, Path]]:
    """(relative posix path, path) of the images under ``root`` (or ``root`` itself when a file).

    ``what`` names the option in the error when ``root`` does not exist (``"--protected"`` ->
    "--protected folder X does not exist")."""
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"{what + ' folder ' if what else ''}{root} does not exist")
    if root.is_file():
        return [(root.name, root.resolve())]
    return [(it.rel.as_posix(), it.path) for it in collect_inputs([root], glob=glob)]


def match_files(protected: str | Path, original: str | Path, *, glob: str | None = None,
                labels: tuple[str, str] = ("--protected", "--original")) -> tuple[list[FilePair], list[dict]]:
    """Pair protected files with originals by relative path; unmatched files become errors.

    A protected file matches the original with the same relative path, else the unique
    original with the same path minus its image suffix (``x.png`` <-> ``x.jpg``). Two single
    files are paired directly. ``labels`` name the two inputs in error messages (the CLI's
    option names by default).
    """
    protected, original = Path(protected), Path(original)
    prot = _images(protected, glob, labels[0])
    orig = _images(original, glob, labels[1])
    if protected.is_file() and original.is_file():
        return [FilePair(prot[0][0], prot[0][1], orig[0][1], orig[0][0])], []
    if not prot:
        raise ConfigError(f"no images found under the {labels[0]} folder {protected}"
                          + (f" matching {glob!r}" if glob else ""))
    by_rel = {rel: p for rel, p in orig}
    by_stem: dict[str, list[tuple[str, Path]]] = {}
    for rel, p in orig:
        by_stem.setdefault(_stem(rel), []).append((rel, p))
    pairs, errors = [], []
    for rel, p in prot:
        if original.is_file():
            pairs.append(FilePair(rel, p, original.resolve(), original.name))
            continue
        if rel in by_rel:
            pairs.append(FilePair(rel, p, by_rel[rel], rel))
            continue
        cands = by_stem.get(_stem(rel), [])
        if len(cands) == 1:
            pairs.append(FilePair(rel, p, cands[0][1], cands[0][0]))
        elif len(cands) > 1:
            errors.append({"file": rel, "error": f"several originals match {rel}: "
                           + ", ".join(c[0] for c in cands)})
        else:
            errors.append({"file": rel, "error": f"no original with the relative path {rel} under {original}"})
    return pairs, errors


def _stem(rel: str) -> str:
    p = Path(rel)
    return (p.with_suffix("") if p.suffix.lower() in IMAGE_SUFFIXES else p).as_posix().lower()


# ------------------------------------------------------------------------------ pairs files
@dataclass(frozen=True)
class LabelledPair:
    a: Path
    b: Path
    same: bool
    line: int = field(default=0, compare=False)  # line of the pairs file (1-based; 0 = unknown)


class PairsList(list):
    """The pairs of a pairs file (a plain list of :class:`LabelledPair`), plus what was read:
    ``format`` (``"lfw"`` or ``"list"``), ``root`` (the folder relative names start from) and
    ``root_hint`` (what that folder must hold, for error messages)."""

    def __init__(self, pairs=(), *, format: str = "list", root: Path | None = None, root_hint: str = ""):
        super().__init__(pairs)
        self.format = format
        self.root = root
        self.root_hint = root_hint


def _label(value: str) -> bool | None:
    v = value.strip().lower()
    if v in _SAME:
        return True
    if v in _DIFF:
        return False
    return None


def _is_int(s: str) -> bool:
    return s.isdigit()


def _lfw_header(fields: list[str]) -> bool:
    """LFW's first line: ``FOLDS PAIRS_PER_FOLD`` (pairs.txt: ``10 300``) or ``N`` (pairsDevTrain.txt)."""
    return 1 <= len(fields) <= 2 and all(_is_int(f) for f in fields)


def _lfw_row(fields: list[str]) -> bool:
    """``name n1 n2`` (same person) or ``name1 n1 name2 n2`` (different people)."""
    return ((len(fields) == 3 and not _is_int(fields[0]) and _is_int(fields[1]) and _is_int(fields[2]))
            or (len(fields) == 4 and not _is_int(fields[0]) and _is_int(fields[1]) and not _is_int(fields[2])
                and _is_int(fields[3])))


LFW_SUBFOLDERS = ("images", "lfw")  # tried below --root when it does not hold the person folders


def _lfw_image(root: Path, name: str, number: str) -> Path:
    return root / name / f"{name}_{int(number):04d}.jpg"


def _read_lfw(path: Path, lines: list[tuple[int, str]], root: Path) -> PairsList:
    """LFW's pairs.txt (see :func:`read_pairs`)."""
    start = 1 if _lfw_header(lines[0][1].split()) else 0
    body = lines[start:]
    if not body:
        raise ConfigError(f"LFW pairs file {path} has no pairs (only the header line {lines[0][1].strip()!r})")
    pairs = []
    for no, text in body:
        f = text.split()
        if not _lfw_row(f):
            raise ConfigError(
                f"{path}: line {no}: {text.strip()!r} is not an LFW pair: expected 'name n1 n2' (same person) or "
                "'name1 n1 name2 n2' (different people), tab or space separated, image numbers as integers")
        if len(f) == 3:
            pairs.append((no, f[0], f[1], f[0], f[2], True))
        else:
            pairs.append((no, f[0], f[1], f[2], f[3], False))
    # The image root: --root (default: the pairs file's folder), or its images/ or lfw/ sub-folder
    # when the person folders are there (the LFW download keeps pairs.txt beside lfw/).
    names = [p[1] for p in pairs[:20]]
    candidates = [root] + [root / s for s in LFW_SUBFOLDERS]
    img_root = next((c for c in candidates if any((c / n).is_dir() for n in names)), root)
    hint = (f"LFW pairs name images as ROOT/<Name>/<Name>_NNNN.jpg: --root must be the folder that holds the person "
            f"folders (ROOT/{names[0]}/{names[0]}_0001.jpg; its {' or '.join(f'{s}/' for s in LFW_SUBFOLDERS)} "
            f"sub-folder is also tried); it was {root}")
    return PairsList((LabelledPair(_lfw_image(img_root, a, na), _lfw_image(img_root, b, nb), same, no)
                      for no, a, na, b, nb, same in pairs), format="lfw", root=img_root, root_hint=hint)


def _cfp_folds(path: Path) -> list[Path]:
    """The CFP folds under ``path`` (itself, or its numbered sub-folders) holding same.txt + diff.txt."""
    cands = [path] + sorted(p for p in path.iterdir() if p.is_dir())
    return [c for c in cands if (c / "same.txt").is_file() and (c / "diff.txt").is_file()]


def _cfp_list(path: Path) -> dict[int, str]:
    """``Pair_list_F.txt`` / ``Pair_list_P.txt``: ``index relative/path.jpg`` per line."""
    if not path.is_file():
        raise ConfigError(f"CFP protocol: {path} is missing (the split folder must sit in Protocol/Split/)")
    out = {}
    for no, line in enumerate(path.read_text().splitlines(), 1):
        f = line.split()
        if not f:
            continue
        if len(f) != 2 or not f[0].isdigit():
            raise ConfigError(f"{path}: line {no}: {line.strip()!r}: expected 'index path'")
        out[int(f[0])] = f[1]
    return out


def _read_cfp(split: Path, root: Path | None) -> PairsList:
    """CFP-FP / CFP-FF pairs from a split folder (see :func:`read_pairs`)."""
    protocol = next((p for p in (split, *split.parents)[:4] if (p / "Pair_list_F.txt").is_file()), None)
    if protocol is None:
        raise ConfigError(f"CFP split {split}: no Pair_list_F.txt in it or the 3 folders above it (Protocol/)")
    frontal = _cfp_list(protocol / "Pair_list_F.txt")
    profile = frontal if "FF" in split.parts[-2:] else _cfp_list(protocol / "Pair_list_P.txt")
    base = root if root is not None else protocol
    pairs = []
    for fold in _cfp_folds(split):
        for name, same in (("same.txt", True), ("diff.txt", False)):
            for no, line in enumerate((fold / name).read_text().splitlines(), 1):
                ij = [x for x in line.replace(",", " ").split() if x]
                if not ij:
                    continue
                if len(ij) != 2 or not all(x.isdigit() for x in ij) or int(ij[0]) not in frontal \
                        or int(ij[1]) not in profile:
                    raise ConfigError(f"{fold / name}: line {no}: {line.strip()!r}: expected 'i,j' indexes of the "
                                      "pair lists")
                pairs.append(LabelledPair(base / frontal[int(ij[0])], base / profile[int(ij[1])], same, no))
    return PairsList(pairs, format="cfp", root=base,
                     root_hint=f"CFP pair lists name images relative to the Protocol folder; it was {base}")


def _split_row(line: str, delim: str | None) -> list[str]:
    if delim is None:
        return line.split()
    return next(csv.reader([line], delimiter=delim), [])


def read_pairs(path: str | Path, root: str | Path | None = None) -> PairsList:
    """Labelled pairs from a pairs file; relative image names start at ``root`` (default: the
    pairs file's folder). Accepted formats, recognised from the content:

    * **LFW** ``pairs.txt`` (also ``pairsDevTrain.txt`` / ``pairsDevTest.txt``): an optional
      first line ``FOLDS N`` (``10 300``) or ``N``, then one pair per line, tab or space
      separated: ``name n1 n2`` (same person) or ``name1 n1 name2 n2`` (different people). The
      images are ``ROOT/<name>/<name>_<NNNN>.jpg`` (4-digit zero-padded number). ``root`` must
      hold the person folders; when it does not but its ``images/`` or ``lfw/`` sub-folder does,
      that one is used. The header's pair count is not checked, so a cut-down file works.
    * **A list of labelled pairs**: ``file_x,file_y,label`` per line, comma, semicolon, tab or
      space separated (space: paths without spaces, e.g. a flattened CFP-FP / CFP-FF protocol
      ``img1 img2 1``); label yes/no, same/different, 1/0 (or -1), true/false,
      genuine/impostor, match/mismatch. A first row whose third column is not a label is a
      header; columns named file_x/file_y/decision (or img1/img2/label, ...) are found by name.
    * **CFP** (Celebrities in Frontal-Profile) as distributed: ``path`` is a split folder,
      ``Protocol/Split/FP`` (frontal-profile) or ``Protocol/Split/FF`` (frontal-frontal), or one
      numbered fold in it; every fold's ``same.txt`` / ``diff.txt`` (``i,j`` per line) indexes
      ``Protocol/Pair_list_F.txt`` and, for FP, ``Pair_list_P.txt`` for the second image. The
      image paths in those lists start at the Protocol folder (or ``root`` when given).

    Blank lines and lines starting with ``#`` are skipped. Errors name the line and what was
    expected.
    """
    path = Path(path)
    if path.is_dir() and _cfp_folds(path):
        return _read_cfp(path, Path(root) if root is not None else None)
    if path.is_dir():
        raise ConfigError(f"--pairs {path} is a folder: give the pairs file itself (e.g. LFW's pairs.txt) "
                          "or a CFP split folder (Protocol/Split/FP or FF, or one of its numbered folds)")
    if not path.is_file():
        raise ConfigError(f"pairs file {path} does not exist")
    root = Path(root) if root is not None else path.parent
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"pairs file {path} is not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    lines = [(no, ln) for no, ln in enumerate(text.splitlines(), 1) if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ConfigError(f"pairs file {path} is empty")
    first = lines[0][1]
    if _lfw_header(first.split()) or _lfw_row(first.split()):
        return _read_lfw(path, lines, root)
    if "\t" in first:
        delim: str | None = "\t"
    elif ";" in first or "," in first:
        delim = ";" if first.count(";") > first.count(",") else ","
    else:
        delim = None  # whitespace
    rows = [(no, _split_row(ln, delim)) for no, ln in lines]
    cols = (0, 1, 2)
    header_no = None
    if len(rows[0][1]) >= 3 and _label(rows[0][1][2]) is None:
        header_no, hdr = rows[0]
        header = [h.strip().lower() for h in hdr]
        rows = rows[1:]

        def find(names, default):
            return next((header.index(n) for n in names if n in header), default)

        cols = (find(("file_x", "img1", "image1", "file1", "a", "path1"), 0),
                find(("file_y", "img2", "image2", "file2", "b", "path2"), 1),
                find(("decision", "label", "same", "match", "is_same", "issame", "y"), 2))
    if not rows:
        raise ConfigError(f"pairs file {path} has no pairs (a header only, line {header_no})")
    sep = {"\t": "tab", ",": "comma", ";": "semicolon", None: "space"}[delim]
    out = PairsList(format="list", root=root,
                    root_hint=f"the pairs' relative paths start at --root (default: the pairs file's folder); it was {root}")
    for no, r in rows:
        if len(r) <= max(cols):
            raise ConfigError(
                f"{path}: line {no} has {len(r)} {sep}-separated column(s), expected file_x{_SEP[sep]}file_y"
                f"{_SEP[sep]}label (or an LFW pairs.txt: 'name n1 n2' / 'name1 n1 name2 n2')")
        lab = _label(r[cols[2]])
        if lab is None:
            raise ConfigError(f"{path}: line {no}: unknown label {r[cols[2]]!r} "
                              "(use yes/no, same/different, 1/0, true/false)")
        a, b = (Path(r[c].strip()) for c in cols[:2])
        if not str(a).strip() or str(a) == "." or str(b) == ".":
            raise ConfigError(f"{path}: line {no}: an empty file name")
        out.append(LabelledPair(a if a.is_absolute() else (root / a), b if b.is_absolute() else (root / b), lab, no))
    return out


_SEP = {"tab": "<tab>", "comma": ",", "semicolon": ";", "space": " "}


def pair_components(pairs: Iterable[LabelledPair]) -> dict[Path, str]:
    """Identity labels from the connected components of "same" pairs (union-find).

    Every file in the pairs gets a label ``pairs-<n>``; a file only in "different" pairs gets
    its own component.
    """
    parent: dict[Path, Path] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        a, b = p.a.resolve(), p.b.resolve()
        find(a), find(b)
        if p.same:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    roots = sorted({find(x) for x in parent})
    names = {r: f"pairs-{i + 1}" for i, r in enumerate(roots)}
    return {x: names[find(x)] for x in parent}


# ------------------------------------------------------------------------------ identities
@dataclass
class IdentityIndex:
    """Looks up the identity of a clean photo by relative path, path or content, and by bare
    file name only when ``name_fallback`` is set (the identities CSV: names there are the
    user's explicit labels; a gallery's or pairs file's names are not)."""

    by_path: dict[Path, str] = field(default_factory=dict)
    by_rel: dict[str, str] = field(default_factory=dict)
    by_digest: dict[str, str] = field(default_factory=dict)
    by_name: dict[str, str | None] = field(default_factory=dict)  # None = ambiguous
    source: str = "none"
    name_fallback: bool = False

    def add(self, path: Path | None, identity: str, *, rel: str | None = None, digest: str | None = None) -> None:
        if path is not None:
            path = Path(path)
            self.by_path[path.resolve()] = identity
            name = path.name.lower()
            if name in self.by_name and self.by_name[name] != identity:
                self.by_name[name] = None
            else:
                self.by_name[name] = identity
        if rel is not None:
            self.by_rel[rel] = identity
        if digest is not None:
            self.by_digest[digest] = identity

    def lookup(self, path: Path, *, rel: str | None = None, digest: str | None = None) -> str | None:
        return self.lookup_how(path, rel=rel, digest=digest)[0]

    def lookup_how(self, path: Path, *, rel: str | None = None, digest: str | None = None
                   ) -> tuple[str | None, str | None]:
        """(identity, how): how is "rel", "path", "content" or "name" (None when not found)."""
        path = Path(path)
        if rel is not None and rel in self.by_rel:
            return self.by_rel[rel], "rel"
        hit = self.by_path.get(path.resolve())
        if hit is not None:
            return hit, "path"
        if digest is not None and digest in self.by_digest:
            return self.by_digest[digest], "content"
        if self.name_fallback:
            hit = self.by_name.get(path.name.lower())
            if hit is not None:
                return hit, "name"
        return None, None

    def __len__(self) -> int:
        return len(set(self.by_path.values()) | set(self.by_rel.values()) | set(self.by_digest.values()))


def read_identities(path: str | Path, root: str | Path | None = None) -> IdentityIndex:
    """``file,identity`` CSV (header optional). Files are relative to ``root`` (default: the CSV's folder)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"identities file {path} does not exist")
    root = Path(root) if root is not None else path.parent
    idx = IdentityIndex(source=f"identities file {path.name}", name_fallback=True)
    rows = [r for r in csv.reader(path.read_text(encoding="utf-8-sig").splitlines()) if r and r[0].strip()]
    if rows and [c.strip().lower() for c in rows[0][:2]] in (["file", "identity"], ["path", "identity"],
                                                             ["file", "id"], ["image", "identity"]):
        rows = rows[1:]
    for i, r in enumerate(rows, 1):
        if len(r) < 2 or not r[1].strip():
            raise ConfigError(f"{path}: row {i}: expected file,identity")
        f = Path(r[0].strip())
        full = f if f.is_absolute() else root / f
        idx.add(full, r[1].strip(), rel=f.as_posix() if not f.is_absolute() else None)
    return idx


@dataclass(frozen=True)
class GalleryImage:
    path: Path
    identity: str


def read_gallery(root: str | Path, *, glob: str | None = None) -> list[GalleryImage]:
    """``root/<identity>/**/*.jpg`` -> gallery images labelled with their top folder's name."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"gallery {root} is not a folder (expected gallery/<identity>/*.jpg)")
    out = []
    for rel, p in _images(root, glob):
        parts = Path(rel).parts
        if len(parts) < 2:
            raise ConfigError(f"gallery image {rel} is not inside an identity folder (gallery/<identity>/{rel})")
        out.append(GalleryImage(p, parts[0]))
    if not out:
        raise ConfigError(f"no images found in the gallery {root}")
    return out
