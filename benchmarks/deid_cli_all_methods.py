"""Every ``facepriv deid`` method through the command line on the real group photos of ../shared.

    python benchmarks/deid_cli_all_methods.py [--work DIR] [--photos couple.jpg,selfie-many-people.jpg,img1.jpg]

Runs ``facepriv deid PHOTOS --method M --out WORK/M`` as a subprocess (the installed console
script, exactly as a user types it) for every registered method, on copies of the group photos
of ``../shared/data/deepface-pairs`` plus one portrait. For each method it prints the exit code,
the faces treated per photo (from the manifest), the share of pixels changed inside and outside
the detected face boxes, and the wall time. ``inpaint`` needs a face diffusion model: when
``google/ddpm-celebahq-256`` is not on this machine a tiny *untrained* model is made for it
(mechanics only). ``adversarial`` uses 5 steps to keep the run short. Exit 0 with "skipped" when
../shared is absent; exit 1 when any method fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "deepface-pairs"


def changed_fraction(a: np.ndarray, b: np.ndarray, boxes: list) -> tuple[float, float]:
    """Share of pixels that differ inside the face boxes and outside them (grown by 60 %)."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2) > 0
    inside = np.zeros(diff.shape, bool)
    near = np.zeros(diff.shape, bool)
    h, w = diff.shape
    for x0, y0, x1, y1 in (bx[:4] for bx in boxes):
        inside[max(0, int(y0)):int(y1), max(0, int(x0)):int(x1)] = True
        gx, gy = 0.6 * (x1 - x0), 0.6 * (y1 - y0)
        near[max(0, int(y0 - gy)):min(h, int(y1 + gy)), max(0, int(x0 - gx)):min(w, int(x1 + gx))] = True
    fin = float(diff[inside].mean()) if inside.any() else float("nan")
    fout = float(diff[~near].mean()) if (~near).any() else float("nan")
    return fin, fout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--photos", default="couple.jpg,selfie-many-people.jpg,img1.jpg")
    args = ap.parse_args(argv)
    if not DATA.is_dir():
        print(f"skipped: {DATA} not found")
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from deid_benchmark import tiny_score_model

    from facepriv.core.io import load_image
    from facepriv.deid import METHODS
    from facepriv.models import availability

    work = args.work or Path(tempfile.mkdtemp(prefix="facepriv-deid-cli-"))
    src = work / "photos"
    src.mkdir(parents=True, exist_ok=True)
    for name in args.photos.split(","):
        shutil.copy(DATA / name, src / name)
    exe = ROOT / ".venv" / "bin" / "facepriv"
    cmd0 = [str(exe)] if exe.is_file() else [sys.executable, "-m", "facepriv"]
    env = {**os.environ, "FACEPRIV_OFFLINE": "1"}
    pool = work / "pool"  # k-same pool: the other labelled photos (disjoint from the inputs)
    pool.mkdir(exist_ok=True)
    for p in sorted(DATA.glob("img*.jpg"))[1:25]:
        shutil.copy(p, pool / p.name)
    extra = {
        "k-same-average": ["--k-pool", str(pool), "--k", "3"],
        "k-same-select": ["--k-pool", str(pool), "--k", "3"],
        "k-same-pixelate": ["--k-pool", str(pool), "--k", "3"],
        "adversarial": ["--steps", "5"],
    }
    if not availability("ddpm-celebahq-256").available:
        tiny = tiny_score_model(work / "tiny-ddpm")
        extra["inpaint"] = ["--score-model", str(tiny), "--inpaint-steps", "5", "--jump-length", "1",
                            "--jump-samples", "1", "--guard-tries", "2"]
    originals = sorted(src.iterdir())
    failed = []
    print(f"{'method':16} {'exit':>4} {'faces per photo':>22} {'changed in faces':>17} {'changed far away':>17} {'s':>7}")
    for method in sorted(METHODS):
        out = work / "out" / method
        shutil.rmtree(out, ignore_errors=True)
        cmd = cmd0 + ["--quiet", "deid", str(src), "--method", method, "--format", "png", "--out", str(out)]
        cmd += extra.get(method, [])
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        dt = time.perf_counter() - t
        faces, fin, fout = [], [], []
        manifest = out / "manifest.jsonl"
        rows = [json.loads(x) for x in manifest.read_text().splitlines()] if manifest.is_file() else []
        for row in rows:
            faces.append(f"{Path(row['input']).stem[:8]}:{row.get('faces', 0)}")
            if row.get("status") == "ok" and row.get("output"):
                a = np.asarray(load_image(row["input"]).rgb)
                b = np.asarray(load_image(row["output"]).rgb)
                i, o = changed_fraction(a, b, row.get("boxes", []))
                fin.append(i)
                fout.append(o)
        if r.returncode != 0 or len(rows) != len(originals):
            failed.append(method)
            print(r.stderr[-1500:])
        print(f"{method:16} {r.returncode:>4} {' '.join(faces):>22} {100 * np.nanmean(fin) if fin else float('nan'):>16.1f}%"
              f" {100 * np.nanmean(fout) if fout else float('nan'):>16.3f}% {dt:>7.1f}")
    print(f"outputs in {work / 'out'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
