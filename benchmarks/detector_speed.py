"""Per-detector time on real photos (tests/fixtures and, when present, ../shared).

    python benchmarks/detector_speed.py [--repeat 5]

Prints the median time of ``detect`` per photo for mtcnn, yunet and centerface (one warm-up
call first) and the number of faces each found.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = [ROOT / "tests/fixtures" / n for n in ("obama.jpg", "biden.jpg", "group.jpg")] + [
    ROOT.parent / "shared/data/portraits/obama.jpg",
    ROOT.parent / "shared/data/deepface-pairs/selfie-many-people.jpg",
    ROOT.parent / "shared/data/deepface-pairs/img40.jpg",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from facepriv.models import create_model

    photos = [(p, np.asarray(Image.open(p).convert("RGB"))) for p in PHOTOS if p.is_file()]
    print(f"{'detector':<11} {'photo':<40} {'size':>10} {'faces':>5} {'median ms':>10}")
    for name in ("mtcnn", "yunet", "centerface"):
        det = create_model(name)
        for path, img in photos:
            faces = det.detect(img)
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                det.detect(img)
                times.append(time.perf_counter() - t)
            label = str(path.relative_to(ROOT.parent)) if path.is_relative_to(ROOT.parent) else path.name
            print(f"{name:<11} {label:<40} {img.shape[1]:>4}x{img.shape[0]:<5} {len(faces):>5} "
                  f"{statistics.median(times) * 1000:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
