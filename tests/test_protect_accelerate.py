"""``accelerate launch -m facepriv protect``: two real processes shard the inputs.

accelerate's ``--cpu`` launcher starts a single process unless an MPI hostfile is given, so
the two CPU processes are started with its torchrun launcher (``--multi_gpu``) while CUDA is
hidden; facepriv then sees ``WORLD_SIZE=2`` and accelerate's ``PartialState`` sets up a CPU
(gloo) group. Each process must take its own share of the photos, write its own manifest
part, and no photo may be processed twice.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import fixture_path
from facepriv.core.batch import Manifest

pytest.importorskip("accelerate")
pytestmark = pytest.mark.realmodels

PHOTOS = ("biden.jpg", "obama.jpg", "obama2.jpg")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", FACEPRIV_OFFLINE="1", FACEPRIV_QUIET="1",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           "-m", "facepriv", "protect", *map(str, args), "--device", "cpu"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _json_docs(text: str) -> list[dict]:
    """The JSON summaries the processes printed (one each, possibly interleaved with nothing else)."""
    dec, docs, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) != -1:
        try:
            doc, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        if isinstance(doc, dict) and "counts" in doc:
            docs.append(doc)
        i = end
    return docs


def _photos(tmp_path: Path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    for name in PHOTOS:
        shutil.copy(fixture_path(name), d / name)
    return d


def _check_sharding(out: Path, photos: Path, suffix: str) -> list[dict]:
    assert sorted(p.name for p in out.glob("manifest*.jsonl")) == ["manifest.rank0.jsonl", "manifest.rank1.jsonl"]
    per_rank = [[json.loads(line) for line in (out / f"manifest.rank{r}.jsonl").read_text().splitlines()]
                for r in (0, 1)]
    assert all(per_rank), "each process must process (and record) part of the photos"
    inputs = [Path(row["input"]).name for rows in per_rank for row in rows]
    assert sorted(inputs) == sorted(PHOTOS)  # every photo exactly once, across both processes
    # the split is the documented rank::world one (sorted inputs: biden, obama, obama2)
    assert [Path(r["input"]).name for r in per_rank[0]] == ["biden.jpg", "obama2.jpg"]
    assert [Path(r["input"]).name for r in per_rank[1]] == ["obama.jpg"]
    rows = [row for rows in per_rank for row in rows]
    assert len(Manifest.read_all(out)) == len(PHOTOS)  # what `--resume` and audit read back
    assert all(r["status"] == "ok" and r["faces"] == 1 for r in rows), rows
    for name in PHOTOS:
        assert (out / name).with_suffix(suffix).is_file()
        assert (photos / name).read_bytes() == fixture_path(name).read_bytes()  # inputs untouched
    return rows


@pytest.mark.slow  # ~20 s: two fresh interpreters load torch and the models on 2 shared cores
def test_accelerate_launch_two_processes_pgd(tmp_path):
    photos = _photos(tmp_path)
    out = tmp_path / "out"
    res = _launch([photos, "--out", out, "--method", "pgd", "--attack-steps", "1", "--surrogates", "dlib-resnet",
                   "--format", "png", "--json"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    docs = _json_docs(res.stdout)
    assert len(docs) == 2, res.stdout[-2000:]
    assert sorted(d["details"]["rank"] for d in docs) == [0, 1]
    assert all(d["details"]["world_size"] == 2 for d in docs)
    assert sorted(d["total"] for d in docs) == [1, 2]
    rows = _check_sharding(out, photos, ".png")
    assert all(r["attack"][0]["steps"] == 1 for r in rows)
    assert not (out / "manifest.jsonl").exists()


@pytest.mark.slow
def test_accelerate_launch_two_processes_map(tmp_path):
    from test_protect_map import tiny_unet_dir

    tiny = tiny_unet_dir(tmp_path / "tiny")
    photos = _photos(tmp_path)
    out, saved = tmp_path / "out", tmp_path / "saved"
    res = _launch([photos, "--out", out, "--score-model", tiny, "--surrogates", "dlib-resnet", "--steps", "1", "--w-exp", "0", "--lr", "1e-3",
                   "--t0", "100", "--n-inv", "4", "--n-gen", "2", "--save-model", saved, "--quiet"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    _check_sharding(out, photos, ".jpg")
    # each process fine-tuned its own copy on its own shard and logged / saved it separately
    assert (out / "map_log.rank0.json").is_file() and (out / "map_log.rank1.json").is_file()
    logs = [json.loads((out / f"map_log.rank{r}.json").read_text()) for r in (0, 1)]
    assert [log[0]["faces"] for log in logs] == [2, 1]
    for r in (0, 1):
        meta = json.loads((saved / f"rank{r}" / "facepriv.json").read_text())
        assert meta["method"] == "map" and meta["faces"] == (2 if r == 0 else 1)
        assert meta["base"] == str(tiny.resolve())
