"""First load (conversion from the original format) vs cached load (safetensors) per model.

    python benchmarks/model_load.py [--models dlib-resnet,facenet-casia,...] [--repeat 3]

Each measurement runs in a fresh process (imports, including facenet_pytorch's ~2-3 s, done
before the clock starts) against a
private FACEPRIV_HOME holding only the extracted source files, so "first" really converts and
"cached" really reads the safetensors. Needs the models fetched once (scripts/install.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT = "dlib-resnet,facenet-casia,sface,sface-onnx,expr-fer7,mtcnn,yunet,centerface"
CHILD = """
import sys, time, torch
torch.set_num_threads(2)
from facepriv.models import create_model, get_spec
get_spec(sys.argv[1])  # registry imported before timing
import facenet_pytorch, onnxruntime  # noqa: E401,F401 - library imports are not weight loading
t = time.perf_counter()
create_model(sys.argv[1])
print(time.perf_counter() - t)
"""


def run(name: str, home: Path) -> float:
    env = dict(os.environ, FACEPRIV_HOME=str(home), FACEPRIV_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", CHILD, name], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from facepriv.models import availability, home

    rows = []
    print(f"{'model':<14} {'first load (convert) s':>24} {'cached load s':>15} {'speed-up':>9}")
    for name in args.models.split(","):
        av = availability(name)
        if not av.available:
            print(f"{name:<14} not available offline (run `facepriv models fetch {name}`)")
            continue
        firsts, cached = [], []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                tmp_home = Path(tmp)
                src = Path(av.path)
                if src.is_relative_to(home()):  # copy just the extracted source file
                    dst = tmp_home / src.relative_to(home())
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst)
                    for marker in src.parent.glob(src.name + ".sha256"):
                        shutil.copy2(marker, dst.parent / marker.name)
                firsts.append(run(name, tmp_home))
                cached.append(run(name, tmp_home))
        f, c = statistics.median(firsts), statistics.median(cached)
        rows.append({"model": name, "first_s": round(f, 4), "cached_s": round(c, 4)})
        print(f"{name:<14} {f:>24.3f} {c:>15.3f} {f / c:>8.1f}x")
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
