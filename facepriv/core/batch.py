"""The batch runner every command uses on folders of photos.

* Inputs: files, folders (recursive, ``glob``), or text lists (``@list.txt`` / ``*.txt``, one
  path per line, ``#`` comments). The output tree mirrors the input tree under ``out``. The
  output folder is left out of the search only when it lies strictly inside an input folder,
  and then only if it is empty or a facepriv output folder (it holds a manifest); an --out
  folder inside the inputs that holds other files is refused.
* Files a folder holds that are not supported images are skipped and reported in one warning
  line per folder ("skipped 3 files in photos/ that are not supported images (.gif x2, .txt
  x1)"); hidden files, manifests and desktop clutter are skipped silently. Files named
  directly (or listed) are taken as given, except GIFs, which are skipped with the same
  warning wherever they come from: a GIF holds at most 256 colours (the changes are lost when
  it is written back) and an animated one would lose every frame but the first.
* Before any work, the planned outputs (after ``output_suffix``, e.g. ``--format``) are checked:
  an empty input set, two inputs mapping to one output, an output that would replace any
  input of the run, or an output written into a folder that holds inputs of the run (``--out``
  at the input folder: outputs beside the originals, which a rerun would take for inputs) is a
  :class:`ConfigError` (a usage error, exit 2). During the run every input is protected from
  every writer (:func:`facepriv.core.io.protect_inputs`).
* One bad file never stops the batch: its error is recorded and reported at the end.
* A JSONL manifest (``out/manifest.jsonl``; ``manifest.rankN.jsonl`` per process under
  accelerate) gets one line per input as soon as it is done: input, output, status, faces,
  timings, error, a hash of the settings, and the ``run_id`` / ``run_started`` of the run that
  wrote it (runs append to the same file; the run id tells them apart). ``resume=True`` skips
  inputs whose last record succeeded with the same settings, an unchanged input and an
  existing output. :func:`plan_batch` says beforehand which inputs a process will run, in order
  (its rank's share, less the resumed ones), for commands that work ahead of the runner.
* Outputs are written atomically by the commands (see :mod:`facepriv.core.io`); Ctrl-C stops
  after the current file is finished or discarded, never leaving a half-written one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, FaceprivError
from .io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, protect_inputs
from .progress import is_quiet, make_progress, stderr_console

OK_STATUSES = ("ok", "copied", "skipped")
LIST_SUFFIXES = (".txt", ".lst")
#: never inputs and never worth a word: facepriv's own manifests and desktop clutter
QUIET_SKIPS = ("manifest*.jsonl", "thumbs.db", "desktop.ini", "icon\r")
#: unsupported even when named directly: suffix -> why, and what to do instead
UNSUPPORTED = {
    ".gif": "GIF is not supported (at most 256 colours, and an animated GIF would keep only its first "
            "frame): convert it to PNG, or an animation to MP4 for facepriv deid",
}


@dataclass(frozen=True)
class InputItem:
    path: Path  # absolute input path
    rel: Path  # relative path under the output folder
    root: Path | None = field(default=None, compare=False)  # the input folder it was found in


@dataclass
class SkippedFiles:
    """Files :func:`collect_inputs` left out: in an input folder (``where``, as the user gave
    it) because they are not supported images, or named directly (``where`` None) as GIF."""

    where: str | None
    suffixes: Counter = field(default_factory=Counter)
    examples: list[Path] = field(default_factory=list)
    supported: tuple[str, ...] = IMAGE_SUFFIXES  # what the command reads

    @property
    def count(self) -> int:
        return sum(self.suffixes.values())

    def add(self, path: Path) -> None:
        self.suffixes[path.suffix.lower() or "(no suffix)"] += 1
        if len(self.examples) < 3:
            self.examples.append(path)

    def message(self) -> str:
        kinds = ", ".join(f"{suf} x{n}" for suf, n in sorted(self.suffixes.items(), key=lambda kv: (-kv[1], kv[0])))
        n = self.count
        files = "file" if n == 1 else "files"
        if self.where is None:
            names = ", ".join(p.name for p in self.examples) + (", ..." if n > len(self.examples) else "")
            head = f"skipped {n} {files} named directly ({names}): "
            return head + "; ".join(UNSUPPORTED.get(suf, f"{suf} is not a supported image")
                                    for suf in sorted(self.suffixes))
        where = self.where if self.where.endswith(("/", os.sep)) else self.where + "/"
        video = bool(set(self.supported) & set(VIDEO_SUFFIXES))
        what = ("is not a supported image" + (" or video" if video else "") if n == 1
                else "are not supported images" + (" or videos" if video else ""))
        text = f"skipped {n} {files} in {where} that {what} ({kinds}); supported: {' '.join(self.supported)}"
        extra = [why for suf, why in UNSUPPORTED.items() if suf in self.suffixes]
        return text + ("; " + "; ".join(extra) if extra else "")


def warn(text: str) -> None:
    """``warning: TEXT`` on stderr, unless quiet (``--quiet`` / ``--json``)."""
    if is_quiet():
        return
    from rich.text import Text

    stderr_console.print(Text.assemble(("warning:", "yellow"), " ", text), soft_wrap=True)


def _quietly_skipped(p: Path) -> bool:
    name = p.name.lower()
    return name.startswith(".") or any(fnmatch.fnmatch(name, pat) for pat in QUIET_SKIPS)


def _walk(root: Path, recursive: bool, inside: Sequence[Path]) -> Iterable[Path]:
    """Files under ``root`` (sorted; not in hidden folders nor in the ``inside`` folders)."""
    walker = root.rglob("*") if recursive else root.glob("*")
    for f in sorted(walker):
        if any(f == e or e in f.parents for e in inside):
            continue
        if any(part.startswith(".") for part in f.relative_to(root).parts[:-1]):
            continue
        if f.is_file():
            yield f


def unsupported_in_folders(inputs: Sequence[str | os.PathLike], *, supported: Iterable[str],
                           glob: str | None = None, recursive: bool = True,
                           exclude: Iterable[Path] = ()) -> list[SkippedFiles]:
    """Per input folder, the files a command that reads ``supported`` suffixes leaves out
    (none with a ``glob``: the user chose the files). For commands that filter
    :func:`collect_inputs`' results themselves (deid keeps photos and videos)."""
    if glob:
        return []
    supported = tuple(s.lower() for s in supported)
    keep = set(supported)
    excl = [Path(e).resolve() for e in exclude]
    out = []
    for raw in inputs:
        s = str(raw)
        p = Path(s).expanduser()
        if s.startswith("@") or not p.is_dir():
            continue
        root = p.resolve()
        rep = SkippedFiles(s, supported=supported)
        for f in _walk(root, recursive, [e for e in excl if root in e.parents]):
            if not _quietly_skipped(f) and f.suffix.lower() not in keep:
                rep.add(f)
        if rep.count:
            out.append(rep)
    return out


@dataclass
class ItemResult:
    status: str = "ok"  # ok | copied (no face, copied through) | skipped | error
    output: Path | None = None
    faces: int = 0
    error: str | None = None
    timings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class BatchSummary:
    total: int
    counts: dict[str, int]
    failures: list[tuple[str, str]]
    resumed: int
    elapsed: float
    manifest: Path
    interrupted: bool = False
    run_id: str = ""
    no_face: dict[str, int] = field(default_factory=dict)  # status -> files where no face was found

    @property
    def failed(self) -> int:
        return self.counts.get("error", 0)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed else 0

    @property
    def copied_without_face(self) -> int:
        """Files written through unchanged because no face was found (``--on-no-face copy``)."""
        return self.no_face.get("copied", 0)

    def to_json(self) -> dict:
        return {
            "total": self.total, "counts": self.counts, "resumed": self.resumed,
            "no_face": dict(self.no_face),
            "failures": [{"input": p, "error": e} for p, e in self.failures],
            "elapsed_s": round(self.elapsed, 3), "manifest": str(self.manifest),
            "interrupted": self.interrupted, "run_id": self.run_id,
        }


def _is_image(p: Path, glob: str | None) -> bool:
    if p.name.startswith("."):
        return False
    if glob:
        return fnmatch.fnmatch(p.name, glob) or fnmatch.fnmatch(p.as_posix(), glob)
    return p.suffix.lower() in IMAGE_SUFFIXES


def _read_list(path: Path) -> list[Path]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            out.append(p if p.is_absolute() else (path.parent / p))
    return out


def collect_inputs(inputs: Sequence[str | os.PathLike], *, glob: str | None = None, recursive: bool = True,
                   exclude: Iterable[Path] = (), report: bool = True,
                   skipped: list[SkippedFiles] | None = None) -> list[InputItem]:
    """Expand files, folders and list files into input items with output-relative paths.

    With one folder the outputs mirror its tree; with several arguments each one's outputs go
    under a sub-folder named after it, so names never collide. ``exclude``: folders (the output
    folder) whose files are skipped, but only where such a folder lies strictly inside an input
    folder; an exclude that is an input folder itself, or above it, excludes nothing (the
    planned outputs are refused later, by :func:`check_outputs`). An exclude strictly inside an
    input folder that holds files but no facepriv manifest is refused (:class:`ConfigError`):
    those files would silently drop out of the inputs and mix with the outputs.

    Files left out because they are not supported images (in folders, without a ``glob``), and
    GIFs wherever they come from, are appended to ``skipped`` and, with ``report``, printed as
    one warning line per folder (not with ``--quiet``). When they leave nothing to do, the
    :class:`ConfigError` says so.
    """
    excl = [Path(e).resolve() for e in exclude]
    groups: list[tuple[Path, list[tuple[Path, Path]], Path | None]] = []
    reports: list[SkippedFiles] = []
    named = SkippedFiles(None)
    for raw in inputs:
        s = str(raw)
        is_list = s.startswith("@")
        p = Path(s[1:] if is_list else s).expanduser()
        if not p.exists():
            raise ConfigError(f"input {p} does not exist")
        if is_list or (p.is_file() and p.suffix.lower() in LIST_SUFFIXES):
            files = []
            for f in _read_list(p):
                if f.suffix.lower() in UNSUPPORTED:
                    named.add(f)
                else:
                    files.append(f)
            groups.append((p, [(f, Path(f.name)) for f in files], None))
        elif p.is_dir():
            root = p.resolve()
            inside = [e for e in excl if root in e.parents]  # strictly inside this input folder
            for e in inside:
                _check_out_inside(e, root, s, glob)
            found = []
            rep = SkippedFiles(s)
            for f in _walk(root, recursive, inside):
                if _is_image(f, glob):
                    found.append((f, f.relative_to(root)))
                elif not glob and not _quietly_skipped(f):
                    rep.add(f)
            if rep.count:
                reports.append(rep)
            groups.append((p, found, root))
        elif p.suffix.lower() in UNSUPPORTED:
            named.add(p)
        else:
            groups.append((p, [(p, Path(p.name))], None))
    if named.count:
        reports.insert(0, named)
    multi = len(groups) > 1
    items: list[InputItem] = []
    seen: dict[Path, Path] = {}
    for arg, files, root in groups:
        prefix = Path(arg.stem if arg.is_file() and arg.suffix.lower() in LIST_SUFFIXES else arg.name)
        for f, rel in files:
            rel = (prefix / rel) if (multi and arg.is_dir()) else rel
            if rel in seen and seen[rel] != f.resolve():
                raise ConfigError(f"two inputs map to the same output {rel}: {seen[rel]} and {f}")
            seen[rel] = f.resolve()
            items.append(InputItem(f.resolve(), rel, root))
    if skipped is not None:
        skipped.extend(reports)
    if reports and not items:
        raise ConfigError("no input files to process: " + "; ".join(r.message() for r in reports))
    if report:
        for r in reports:
            warn(r.message())
    return items


def _outside_suggestion(folders: Iterable[Path]) -> str:
    """``, e.g. FOLDER-out`` next to the outermost of ``folders`` (input folders), or ``""``."""
    folders = [Path(f) for f in folders]
    if not folders:
        return ""
    top = min(folders, key=lambda f: len(f.parts))
    if top.parent == top:
        return ""
    cand = top.parent / f"{top.name}-out"
    if any(cand == f or f in cand.parents for f in folders):
        return ""
    return f", e.g. {cand}"


def _check_out_inside(out: Path, root: Path, shown: str, glob: str | None) -> None:
    """``out`` lies strictly inside the input folder ``root``: fine when it does not exist, is
    empty of photos and videos, or is a facepriv output folder (it holds a manifest); otherwise
    those files would silently drop out of the inputs and mix with the outputs."""
    if not out.is_dir() or any(out.glob("manifest*.jsonl")):
        return
    media = set(IMAGE_SUFFIXES) | set(VIDEO_SUFFIXES)
    files = [f for f in _walk(out, True, ()) if not _quietly_skipped(f) and f.suffix.lower() in media
             and (not glob or _is_image(f, glob))]
    if files:
        raise ConfigError(
            f"--out {out} lies inside the input folder {shown} and already holds {len(files)} photo(s) or "
            f"video(s) that facepriv did not write (e.g. {files[0].relative_to(out)}): they would be left out of "
            f"the inputs and mixed with the outputs. Choose an --out folder outside {shown}"
            f"{_outside_suggestion([root])}")


def config_hash(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Manifest:
    """Append-only JSONL record of a batch run (one line per input, flushed immediately)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @staticmethod
    def read_all(out_dir: Path) -> list[dict]:
        rows = []
        for f in sorted(Path(out_dir).glob("manifest*.jsonl")):
            for line in f.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by a crash is ignored
        return rows

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _stamp(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def done_inputs(out_dir: Path, cfg_hash: str) -> set[str]:
    """Inputs whose latest record in the manifests succeeded with these settings and still holds."""
    latest: dict[str, dict] = {}
    for row in Manifest.read_all(out_dir):
        if "input" in row:
            latest[row["input"]] = row
    done = set()
    for inp, row in latest.items():
        if row.get("status") not in OK_STATUSES or row.get("config") != cfg_hash:
            continue
        p = Path(inp)
        try:
            if [row.get("input_size"), row.get("input_mtime_ns")] != list(_stamp(p)):
                continue
        except OSError:
            continue
        out = row.get("output")
        if out and not Path(out).exists():
            continue
        done.add(inp)
    return done


@dataclass
class BatchPlan:
    """What :func:`run_batch` will do with a batch in this process: ``shard`` (this process's
    share of the items, in order), ``todo`` (the shard less the inputs ``--resume`` skips, in the
    order ``process`` is called), ``resumed`` (how many it skips) and ``config_hash``."""

    shard: list[InputItem]
    todo: list[InputItem]
    resumed: int
    config_hash: str


def plan_batch(items: Sequence[InputItem], out_dir: str | os.PathLike, config: dict, *, resume: bool = False,
               rank: int | None = None, world_size: int = 1) -> BatchPlan:
    """The items :func:`run_batch` will hand to ``process`` here, in its order: items
    ``rank::world_size`` (all of them with one process), without the inputs whose last manifest
    record in ``out_dir`` succeeded with the same ``config`` when ``resume``. Commands that work
    ahead of the batch runner (reading ahead, a first pass over the faces) plan with this."""
    cfg = config_hash(config)
    shard = list(items)[(rank or 0)::world_size] if world_size > 1 else list(items)
    already = done_inputs(Path(out_dir), cfg) if resume else set()
    todo = [it for it in shard if str(it.path) not in already]
    return BatchPlan(shard, todo, len(shard) - len(todo), cfg)


def planned_output(item: InputItem, out_dir: Path, output_suffix: str | None) -> Path:
    """Where ``item``'s output goes: ``out_dir/rel``, with ``output_suffix`` for images (videos
    keep their container's suffix)."""
    dst = out_dir / item.rel
    if output_suffix and item.path.suffix.lower() not in VIDEO_SUFFIXES:
        dst = dst.with_suffix(output_suffix)
    return dst


def check_outputs(items: Sequence[InputItem], out_dir: Path, output_suffix: str | None = None) -> dict[Path, Path]:
    """Plan every output and refuse (:class:`ConfigError`) collisions before any work is done.

    Two inputs must never share an output, and no output may be any input of the run (not just
    its own). Returns ``{input: output}``.
    """
    from .io import _Protected

    if not items:
        raise ConfigError(
            "no input files to process: the inputs hold no supported files (an empty folder, a --glob "
            f"that matches nothing?); supported images: {' '.join(IMAGE_SUFFIXES)}")
    out_abs = Path(out_dir).absolute()
    inputs = _Protected(it.path for it in items)
    planned: dict[Path, Path] = {}
    owner: dict[str, Path] = {}
    for it in items:
        dst = planned_output(it, out_abs, output_suffix)
        key = os.path.normcase(str(dst))
        if key in owner and owner[key] != it.path:
            hint = " (--format gives them the same name)" if output_suffix and owner[key].suffix != it.path.suffix else ""
            raise ConfigError(f"two inputs map to the same output {dst}: {owner[key]} and {it.path}{hint}; "
                              "rename one, or process them into different --out folders")
        owner[key] = it.path
        hit = inputs.match(dst)
        if hit is not None:
            raise ConfigError(f"the output {dst} would overwrite the input {hit}; choose an --out folder "
                              f"outside the input folders{_outside_suggestion(_input_folders(items))}")
        planned[it.path] = dst
    # no output may land in a folder that holds inputs of the run: beside the originals (--out
    # at the input folder with another --format), where a rerun would take it for an input
    holding: dict[str, Path] = {}
    for it in items:
        holding.setdefault(os.path.normcase(str(it.path.parent)), it.path)
    resolved: dict[Path, str] = {}
    for it in items:
        dst = planned[it.path]
        if dst.parent not in resolved:
            resolved[dst.parent] = os.path.normcase(str(dst.parent.resolve()))
        beside = holding.get(resolved[dst.parent])
        if beside is not None:
            raise ConfigError(
                f"--out {out_dir} would write the outputs beside the inputs (e.g. {dst} next to {beside}), "
                "mixing them with the originals (a rerun would take them for inputs); choose an --out folder "
                f"outside the input folders{_outside_suggestion(_input_folders(items))}")
    return planned


def _input_folders(items: Sequence[InputItem]) -> list[Path]:
    """The input folders of ``items`` (the folder each was found in, or that holds a named file)."""
    return list({(it.root or it.path.parent) for it in items})


def run_batch(items: Sequence[InputItem], process: Callable[[InputItem, Path], ItemResult], *,
              out_dir: str | os.PathLike, config: dict, resume: bool = False, description: str = "processing",
              output_suffix: str | None = None, rank: int | None = None, world_size: int = 1,
              progress: bool = True, verbose: bool = False, command: str = "",
              run_id: str | None = None) -> BatchSummary:
    """Run ``process(item, output_path)`` over ``items``; see the module docstring.

    ``rank``/``world_size`` shard the items across processes (each writes its own manifest).
    ``run_id`` labels this run's manifest rows (default: ``FACEPRIV_RUN_ID`` or a fresh id).
    """
    out_dir = Path(out_dir)
    check_outputs(items, out_dir, output_suffix)  # before anything is created or run
    out_dir.mkdir(parents=True, exist_ok=True)
    all_inputs = [it.path for it in items]
    name = "manifest.jsonl" if world_size <= 1 else f"manifest.rank{rank or 0}.jsonl"
    manifest = Manifest(out_dir / name)
    run_id = run_id or os.environ.get("FACEPRIV_RUN_ID") or uuid.uuid4().hex[:12]
    run_started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    plan = plan_batch(items, out_dir, config, resume=resume, rank=rank, world_size=world_size)
    items, todo, resumed, cfg = plan.shard, plan.todo, plan.resumed, plan.config_hash
    counts: dict[str, int] = {}
    no_face: dict[str, int] = {}
    failures: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    interrupted = False
    with protect_inputs(all_inputs), make_progress(enabled=progress) as bar:
        task = bar.add_task(description, total=len(todo))
        for item in todo:
            dst = planned_output(item, out_dir, output_suffix)
            t_item = time.perf_counter()
            try:
                res = process(item, dst)
            except KeyboardInterrupt:
                interrupted = True
                break
            except FaceprivError as exc:
                res = ItemResult(status="error", error=str(exc))
            except Exception as exc:  # noqa: BLE001 - one bad file never stops the batch
                msg = f"{type(exc).__name__}: {exc}"
                if verbose:
                    msg += "\n" + traceback.format_exc()
                res = ItemResult(status="error", error=msg)
            res.timings.setdefault("total_s", round(time.perf_counter() - t_item, 4))
            counts[res.status] = counts.get(res.status, 0) + 1
            if res.status != "error" and res.extra.get("reason") == "no face":
                no_face[res.status] = no_face.get(res.status, 0) + 1
            if res.status == "error":
                failures.append((str(item.path), res.error or "unknown error"))
            try:
                size, mtime = _stamp(item.path)
            except OSError:
                size, mtime = None, None
            manifest.append({
                "input": str(item.path), "output": str(res.output) if res.output else None,
                "status": res.status, "faces": res.faces, "error": res.error, "timings": res.timings,
                "config": cfg, "input_size": size, "input_mtime_ns": mtime, "command": command,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **res.extra,
                "run_id": run_id, "run_started": run_started,
            })
            bar.advance(task)
    if interrupted:
        stderr_console.print("[yellow]interrupted: finished files are kept, rerun with --resume to continue")
    return BatchSummary(len(items), counts, failures, resumed, time.perf_counter() - t0, manifest.path, interrupted,
                        run_id, no_face)
