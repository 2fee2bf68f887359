"""Face-verification quality of the offline recognition models on ../shared/data/deepface-pairs.

    .venv/bin/python benchmarks/fr_verification.py [--models dlib-resnet,facenet-casia,sface,sface-onnx]

Two protocols on the deepface test photos (MTCNN detection, largest face, each model's own
alignment template):

* ``labelled``: the 300 labelled pairs of ``master.csv`` (38 same / 262 different);
* ``all-pairs``: every pair of the 61 photos, identities taken from the connected components
  of the "Yes" pairs of ``master.csv`` + ``face-recognition-pivot.csv`` (13 people; a pair
  across two components is taken as "different": no labelled pair contradicts that).

Per model: ROC AUC, EER, verification accuracy at the best threshold and at the model's
default threshold, and TAR at FAR 1e-1/1e-2/1e-3 (impostor-quantile thresholds). Prints a
table and writes ``benchmarks/fr_verification.json``. Skips (exit 0) without ../shared.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = ROOT.parent / "shared"
DEFAULT_MODELS = "dlib-resnet,facenet-casia,sface,sface-onnx"


def deepface_dir(shared: Path) -> Path | None:
    d = shared / "data" / "deepface-pairs"
    return d if (d / "master.csv").is_file() else None


def deepface_identities(data: Path) -> dict[str, str]:
    """file name -> identity (connected components of the labelled "same" pairs of both CSVs)."""
    from facepriv.audit.inputs import LabelledPair, pair_components, read_pairs

    pairs = read_pairs(data / "master.csv", data)
    pivot = data / "face-recognition-pivot.csv"
    if pivot.is_file():
        with open(pivot, encoding="utf-8-sig") as f:
            for r in csv.DictReader(f):
                pairs.append(LabelledPair(data / Path(r["file_x"]).name, data / Path(r["file_y"]).name,
                                          r["decision"].strip().lower() == "yes"))
    comp = pair_components(pairs)
    contradictions = [p for p in pairs if not p.same and comp[p.a.resolve()] == comp[p.b.resolve()]]
    if contradictions:
        raise SystemExit(f"labelled pairs contradict each other: {contradictions[:3]}")
    names = {c: f"person{i + 1:02d}" for i, c in enumerate(sorted(set(comp.values()), key=lambda c: int(c.split('-')[1])))}
    return {p.name: names[c] for p, c in comp.items() if p.is_file()}


def all_pairs(ids: dict[str, str]) -> list[tuple[str, str, bool]]:
    return [(a, b, ids[a] == ids[b]) for a, b in itertools.combinations(sorted(ids), 2)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args(argv)
    data = deepface_dir(args.shared)
    if data is None:
        print(f"skipped: {args.shared}/data/deepface-pairs/master.csv not found")
        return 0
    import numpy as np

    from facepriv.audit.embed import FaceEmbeddingCache, model_metric
    from facepriv.audit.inputs import read_pairs
    from facepriv.models.thresholds import FARS, calibrate_scores
    from facepriv.models import create_model, get_spec
    from facepriv.models.recognition import similarity

    models = {m: create_model(m, device=args.device) for m in args.models.split(",")}
    detector = create_model("mtcnn", device=args.device)
    ids = deepface_identities(data)
    files = sorted(ids)
    cache = FaceEmbeddingCache(models, detector=detector, device=args.device, batch_size=args.batch_size)
    t0 = time.perf_counter()
    res = cache.process([data / f for f in files], progress=True, description="deepface photos")
    secs = time.perf_counter() - t0
    no_face = [f for f in files if not res[(data / f).resolve()].faces]
    labelled = [(p.a.name, p.b.name, p.same) for p in read_pairs(data / "master.csv", data)]
    protocols = {"labelled": labelled, "all-pairs": all_pairs(ids)}
    out = {"data": str(data), "images": len(files), "identities": len(set(ids.values())), "no_face": no_face,
           "embedding_seconds": round(secs, 2), "protocols": {}}
    for proto, pairs in protocols.items():
        out["protocols"][proto] = {}
        for name, model in models.items():
            gen, imp, skipped = [], [], 0
            for a, b, same in pairs:
                ra, rb = res[(data / a).resolve()], res[(data / b).resolve()]
                if not ra.faces or not rb.faces:
                    skipped += 1
                    continue
                s = float(similarity(ra.embeddings[name][:1], rb.embeddings[name][:1], model_metric(model))[0])
                (gen if same else imp).append(s)
            spec = get_spec(name)
            default = spec.thresholds.get("default")
            cal = calibrate_scores(gen, imp, default_threshold=default)
            out["protocols"][proto][name] = {
                "pairs": len(gen) + len(imp), "genuine": len(gen), "impostor": len(imp), "skipped": skipped,
                "auc": round(cal["auc"], 5), "eer": round(cal["eer"], 5),
                "best_accuracy": round(cal["best_accuracy"], 5), "best_threshold": round(cal["best_threshold"], 4),
                "default_threshold": default,
                "accuracy_at_default": None if default is None else round(cal["accuracy_at_default"], 5),
                "thresholds": {k: round(v, 5) for k, v in cal["thresholds"].items()},
                "tar_at_far": {k: round(v, 4) for k, v in cal["tar_at_far"].items()},
                "genuine_mean": round(float(np.mean(gen)), 4), "impostor_mean": round(float(np.mean(imp)), 4),
                "note": cal.get("note"),
            }
    print(f"\ndeepface-pairs: {len(files)} photos, {out['identities']} identities, no face found in: "
          f"{', '.join(no_face) or 'none'}; detection+embedding {secs:.1f} s on {args.device}")
    hdr = f"{'protocol':10} {'model':14} {'pairs (g/i)':>12} {'AUC':>7} {'EER':>7} {'best acc':>9} {'acc@default':>12} " \
          + " ".join(f"{'TAR@' + f:>9}" for f in FARS)
    print(hdr)
    print("-" * len(hdr))
    for proto, per in out["protocols"].items():
        for name, r in per.items():
            acc_d = "-" if r["accuracy_at_default"] is None else f"{100 * r['accuracy_at_default']:.2f}%"
            print(f"{proto:10} {name:14} {str(r['genuine']) + '/' + str(r['impostor']):>12} {r['auc']:7.4f} "
                  f"{100 * r['eer']:6.2f}% {100 * r['best_accuracy']:8.2f}% {acc_d:>12} "
                  + " ".join(f"{100 * r['tar_at_far'][f]:8.1f}%" for f in FARS))
    args.json.write_text(json.dumps(out, indent=1))
    print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
