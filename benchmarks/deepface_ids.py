"""The labelled deepface photos of ../shared/data/deepface-pairs, as the benchmarks use them."""

from __future__ import annotations

import csv
import os
from pathlib import Path


def identities(folder: Path) -> dict[str, str]:
    """file name -> identity id: union-find over the "Yes" pairs of master.csv and
    face-recognition-pivot.csv (img11_reflection.jpg, a mirrored img11.jpg, joins its identity)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for name, dec in (("master.csv", "Decision"), ("face-recognition-pivot.csv", "decision")):
        p = folder / name
        if not p.is_file():
            continue
        for r in csv.DictReader(p.open(newline="")):
            a, b = os.path.basename(r["file_x"]), os.path.basename(r["file_y"])
            find(a), find(b)
            if r[dec].strip().lower() == "yes":
                parent[find(a)] = find(b)
    files = {f.name for f in folder.glob("img*.jpg")}
    for f in files:  # img11_reflection.jpg is a mirrored img11.jpg (same person)
        if f not in parent and "_" in f and f.split("_")[0] + ".jpg" in parent:
            parent[f] = find(f.split("_")[0] + ".jpg")
    roots: dict[str, str] = {}
    return {f: roots.setdefault(find(f), f"id{len(roots):02d}") for f in sorted(files) if f in parent}


def write_all_pairs(ids: dict[str, str], path: Path) -> tuple[int, int]:
    """Every unordered pair of the photos, labelled Yes (same identity) / No; (genuine, impostor)."""
    names = sorted(ids)
    genuine = impostor = 0
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_x", "file_y", "decision"])
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                same = ids[a] == ids[b]
                genuine += same
                impostor += not same
                w.writerow([a, b, "Yes" if same else "No"])
    return genuine, impostor
