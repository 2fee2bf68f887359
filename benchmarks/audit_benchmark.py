"""facepriv audit on ../shared/data/deepface-pairs: calibration, clean-vs-clean, blurred-vs-clean,
and the embedding pipeline's throughput next to the raw forward pass of the same model.

    .venv/bin/python benchmarks/audit_benchmark.py [--models dlib-resnet,facenet-casia,sface]
        [--batch-size 32] [--device cpu] [--work DIR]

1. ``calibrate``: FAR thresholds from every pair of the 61 deepface photos (13 identities from
   the labelled "Yes" pairs, see fr_verification.py), stored in WORK/thresholds.json.
2. Audit clean vs clean (the originals as their own "protected" set): dodging against the other
   photos of the same person. Expected PSR ~ 0 at FAR 1e-3 (it is the clean false-reject rate).
   Identification against a gallery of the first photo of each of the 13 people (the other
   photos are the probes).
3. Audit blurred vs clean: the blurred set is made with facepriv.deid's ``blur`` (default
   strength) -- the benchmark may import deid, the audit package never does. Expected PSR high.
4. Throughput at the same batch size, per model: raw ``model(crops)`` on pre-aligned crops
   (faces/s), vs the audit's embedding pipeline (read + decode + align + batch + forward;
   detections cached so the detector is not counted) in images/s and faces/s, and the full
   pipeline with MTCNN detection. Overhead = 1 - pipeline faces/s / raw faces/s
   (target <= 20 %), from the best of ``--repeat`` alternating runs each, and the median of
   the per-round ratios; and the same in CPU seconds per face (all threads, ``process_time``),
   which other processes' load on a shared machine does not distort. With several models, one
   more row ("all together") times them in a single pass, as ``audit --models a,b,c`` runs:
   every photo is read, decoded and aligned once for all models, against their forward passes
   back to back.

Prints everything and writes benchmarks/audit_benchmark.json. Skips (exit 0) without ../shared.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fr_verification import DEFAULT_SHARED, deepface_dir, deepface_identities  # noqa: E402

DEFAULT_MODELS = "dlib-resnet,facenet-casia,sface"


class CachedFaces:
    """A detector that answers from a first pass (keyed by pixel hash): detection is not timed."""

    name = "cached"

    def __init__(self, detector):
        self.detector, self.cache = detector, {}

    @staticmethod
    def key(rgb) -> str:
        # 32 whole rows: unique enough for 61 different photos, and cheap (contiguous rows, not
        # a pixel-strided gather), since this lookup is timed as part of the pipeline
        return f"{rgb.shape}:{hashlib.blake2b(rgb[:: max(1, len(rgb) // 32)].tobytes(), digest_size=16).hexdigest()}"

    def detect(self, rgb):
        k = self.key(rgb)
        if k not in self.cache:
            self.cache[k] = self.detector.detect(rgb)
        return self.cache[k]


def _print_audit(title: str, rep: dict) -> dict:
    from facepriv.models.thresholds import FARS

    print(f"\n{title}")
    print(f"{'model':14} {'n':>5} " + " ".join(f"{'PSR@' + f:>9}" for f in FARS) + f" {'mean sim':>9} {'not det.':>8}"
          f" {'rank1 b/a':>12}")
    out = {}
    for m, e in rep["models"].items():
        d = e["dodging"]
        ident = e.get("identification")
        r1 = f"{100 * ident['rank1_before']:.0f}/{100 * ident['rank1_after']:.0f}%" if ident and ident["n"] else "-"
        print(f"{m:14} {d['n']:5d} " + " ".join(f"{100 * d['psr'][f]:8.1f}%" for f in FARS)
              + f" {d['mean_similarity']:9.3f} {d['not_detected']:8d} {r1:>12}")
        for proto, sub in (d.get("by_protocol") or {}).items():
            if sub["n"] and sub["n"] != d["n"]:  # the split, when both protocols occur
                print(f"{'  ' + proto:14} {sub['n']:5d} " + " ".join(f"{100 * sub['psr'][f]:8.1f}%" for f in FARS)
                      + f" {sub['mean_similarity']:9.3f} {sub['not_detected']:8d}")
        out[m] = {"n": d["n"], "n_faces": d["n_faces"], "psr": d["psr"], "psr_faces": d["psr_faces"],
                  "mean_similarity": d["mean_similarity"], "not_detected": d["not_detected"],
                  "protocol": d["protocol"], "by_protocol": d.get("by_protocol"), "identification": ident}
    q = rep["quality"]
    print(f"quality: PSNR {q['psnr']} dB, SSIM {q['ssim']}, LPIPS {q['lpips']}, FID {q['fid']}; "
          f"unavailable: {q.get('unavailable')}")
    print(f"faces: {rep['faces']}; audit wall time {rep['timings']['total_s']:.1f} s")
    return {"models": out, "quality": q, "faces": rep["faces"], "wall_s": rep["timings"]["total_s"]}


def throughput(models: dict, paths: list[Path], detector, batch_size: int, device: str, repeat: int) -> dict:
    import numpy as np
    import torch

    from facepriv.audit.embed import FaceEmbeddingCache, model_input_size, model_template
    from facepriv.core.align import align_faces, landmarks_tensor
    from facepriv.core.io import load_image

    cached = CachedFaces(detector)
    t0 = time.perf_counter()
    faces = {p: cached.detect(load_image(p).rgb) for p in paths}
    detect_s = time.perf_counter() - t0
    n_faces = sum(len([f for f in fs if f.size >= 20]) for fs in faces.values())
    out = {"images": len(paths), "faces": n_faces, "batch_size": batch_size, "device": device,
           "torch_threads": torch.get_num_threads(), "mtcnn_images_per_s": round(len(paths) / detect_s, 2), "models": {}}
    all_crops = {}
    for name, model in models.items():
        # raw forward on pre-aligned crops at the same batch size
        crops = []
        for p, fs in faces.items():
            fs = [f for f in fs if f.size >= 20]
            if fs:
                crops.append(align_faces(load_image(p).to_tensor(), landmarks_tensor(fs), model_template(model),
                                         size=model_input_size(model)).crops)
        crops = all_crops[name] = torch.cat(crops).to(device)
        with torch.no_grad():
            model(crops[:batch_size])  # warm-up
        # raw and pipeline runs alternate, so both see the same machine load (shared CPUs are noisy)
        raw, pipe, fwd_in_pipe, raw_cpu, pipe_cpu = [], [], [], [], []
        for _ in range(repeat):
            t, c = time.perf_counter(), time.process_time()
            with torch.no_grad():
                for i in range(0, len(crops), batch_size):
                    model(crops[i: i + batch_size])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            raw.append(time.perf_counter() - t)
            raw_cpu.append(time.process_time() - c)
            cache = FaceEmbeddingCache({name: model}, detector=cached, device=device, batch_size=batch_size)
            t, c = time.perf_counter(), time.process_time()
            cache.process(paths, progress=False)
            pipe.append(time.perf_counter() - t)
            pipe_cpu.append(time.process_time() - c)
            fwd_in_pipe.append(cache.timings["forward_s"])
            stages = dict(cache.timings)
        full = FaceEmbeddingCache({name: model}, detector=detector, device=device, batch_size=batch_size)
        t = time.perf_counter()
        full.process(paths, progress=False)
        full_s = time.perf_counter() - t
        raw_fps = len(crops) / min(raw)
        pipe_fps = n_faces / min(pipe)
        out["models"][name] = {
            "raw_faces_per_s": round(raw_fps, 2),
            "pipeline_faces_per_s": round(pipe_fps, 2),
            "pipeline_images_per_s": round(len(paths) / min(pipe), 2),
            "read_decode_ms_per_image": round(1000 * stages["load_s"] / len(paths), 1),
            "align_ms_per_image": round(1000 * stages["align_s"] / len(paths), 1),
            "forward_ms_per_face_in_pipeline": round(1000 * stages["forward_s"] / n_faces, 1),
            "forward_share_of_pipeline": round(fwd_in_pipe[pipe.index(min(pipe))] / min(pipe), 3),
            "overhead": round(1 - pipe_fps / raw_fps, 3),
            "overhead_median_of_rounds": round(float(np.median(
                [1 - (n_faces / p) / (len(crops) / r) for r, p in zip(raw, pipe)])), 3),
            "with_detection_images_per_s": round(len(paths) / full_s, 2),
            # CPU seconds (all threads) per face: robust to other processes' load on a shared machine
            "raw_cpu_ms_per_face": round(1000 * float(np.median(raw_cpu)) / len(crops), 2),
            "pipeline_cpu_ms_per_face": round(1000 * float(np.median(pipe_cpu)) / n_faces, 2),
            "cpu_overhead": round(1 - float(np.median(raw_cpu)) / len(crops) / (float(np.median(pipe_cpu)) / n_faces), 3),
            "raw_runs_s": [round(v, 3) for v in raw], "pipeline_runs_s": [round(v, 3) for v in pipe],
        }
    if len(models) > 1:
        out["together"] = _together(models, all_crops, paths, cached, n_faces, batch_size, device, repeat)
    return out


def _together(models: dict, crops: dict, paths: list, cached, n_faces: int, batch_size: int, device: str,
              repeat: int) -> dict:
    """The audit as it runs: every model in one pass (``--models a,b,c``), each photo read,
    decoded and aligned once for all of them. Raw = the models' forward passes back to back on
    their pre-aligned crops; overhead = 1 - raw time / pipeline time."""
    import numpy as np
    import torch

    from facepriv.audit.embed import FaceEmbeddingCache

    raw, pipe, raw_cpu, pipe_cpu = [], [], [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for name, model in models.items():
                x = crops[name]
                for i in range(0, len(x), batch_size):
                    model(x[i: i + batch_size])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        raw.append(time.perf_counter() - t)
        raw_cpu.append(time.process_time() - c)
        cache = FaceEmbeddingCache(models, detector=cached, device=device, batch_size=batch_size)
        t, c = time.perf_counter(), time.process_time()
        cache.process(paths, progress=False)
        pipe.append(time.perf_counter() - t)
        pipe_cpu.append(time.process_time() - c)
    return {
        "models": list(models),
        "raw_faces_per_s": round(n_faces / min(raw), 2),  # faces embedded by every model, per second
        "pipeline_faces_per_s": round(n_faces / min(pipe), 2),
        "pipeline_images_per_s": round(len(paths) / min(pipe), 2),
        "overhead": round(1 - min(raw) / min(pipe), 3),
        "overhead_median_of_rounds": round(float(np.median([1 - r / p for r, p in zip(raw, pipe)])), 3),
        "cpu_overhead": round(1 - float(np.median(raw_cpu)) / float(np.median(pipe_cpu)), 3),
        "raw_runs_s": [round(v, 3) for v in raw], "pipeline_runs_s": [round(v, 3) for v in pipe],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    ap.add_argument("--only", choices=("all", "audits", "throughput"), default="all",
                    help="run only part; the other part's figures are kept from an existing JSON")
    ap.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args(argv)
    data = deepface_dir(args.shared)
    if data is None:
        print(f"skipped: {args.shared}/data/deepface-pairs/master.csv not found")
        return 0
    import os

    os.environ.setdefault("FACEPRIV_OFFLINE", "1")  # quality metrics must not try to download here
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from facepriv.models import create_model

    work = args.work or Path(tempfile.mkdtemp(prefix="facepriv-audit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    models = {m: create_model(m, device=args.device) for m in args.models.split(",")}
    detector = create_model("mtcnn", device=args.device)
    ids = deepface_identities(data)
    files = sorted(ids)
    with open(work / "identities.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "identity"])
        w.writerows((n, ids[n]) for n in files)
    with open(work / "all_pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_x", "file_y", "decision"])
        for a, b in itertools.combinations(files, 2):
            w.writerow([data / a, data / b, "same" if ids[a] == ids[b] else "different"])
    previous = json.loads(args.json.read_text()) if args.only != "all" and args.json.is_file() else {}
    result: dict = {**previous, "data": str(data), "images": len(files), "identities": len(set(ids.values())),
                    "models": list(models), "device": args.device, "batch_size": args.batch_size}

    if args.only != "throughput":
        run_audits(args, data, work, files, ids, models, detector, result)
    # 4. throughput
    if args.only != "audits":
        paths = [data / f for f in files]
        tp = throughput(models, paths, detector, args.batch_size, args.device, args.repeat)
        result["throughput"] = tp
        print(f"\n4. embedding throughput, batch size {args.batch_size}, {tp['images']} images / {tp['faces']} faces, "
              f"device {args.device}, {tp['torch_threads']} torch threads (MTCNN alone: {tp['mtcnn_images_per_s']} img/s)")
        print(f"{'model':14} {'raw faces/s':>12} {'pipeline faces/s':>17} {'pipeline img/s':>15} {'overhead':>9} "
              f"{'(median)':>9} {'CPU ms/face raw':>16} {'pipeline':>9} {'CPU overhead':>13} {'with MTCNN img/s':>17}"
              f" {'read+decode ms/img':>19} {'align ms/img':>13}")
        for m, r in tp["models"].items():
            print(f"{m:14} {r['raw_faces_per_s']:12.1f} {r['pipeline_faces_per_s']:17.1f} "
                  f"{r['pipeline_images_per_s']:15.1f} {100 * r['overhead']:8.1f}% {100 * r['overhead_median_of_rounds']:8.1f}% "
                  f"{r['raw_cpu_ms_per_face']:16.1f} {r['pipeline_cpu_ms_per_face']:9.1f} {100 * r['cpu_overhead']:12.1f}% "
                  f"{r['with_detection_images_per_s']:17.2f} {r['read_decode_ms_per_image']:19.1f} {r['align_ms_per_image']:13.1f}")
        tg = tp.get("together")
        if tg:
            print(f"{'all together':14} {tg['raw_faces_per_s']:12.1f} {tg['pipeline_faces_per_s']:17.1f} "
                  f"{tg['pipeline_images_per_s']:15.1f} {100 * tg['overhead']:8.1f}% "
                  f"{100 * tg['overhead_median_of_rounds']:8.1f}% {'':16} {'':9} {100 * tg['cpu_overhead']:12.1f}%"
                  f"   ({' + '.join(tg['models'])} in one pass, as `audit --models` runs them)")
    args.json.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwritten: {args.json}; reports under {work}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def run_audits(args, data, work, files, ids, models, detector, result) -> None:
    from facepriv.audit import AuditConfig, CalibrationConfig, run_audit, run_calibration
    from facepriv.models.thresholds import FARS
    from facepriv.deid import DeidConfig, run_deid

    # 1. calibration
    t = time.perf_counter()
    cal = run_calibration(CalibrationConfig(pairs=work / "all_pairs.csv", models=list(models), store=False,
                                            out=work / "thresholds.json", device=args.device,
                                            batch_size=args.batch_size),
                          recognizers=models, detector=detector)
    print(f"\n1. calibrate on all {len(files)}-photo pairs ({time.perf_counter() - t:.1f} s)")
    print(f"{'model':14} {'gen/imp':>9} {'AUC':>7} {'EER':>7} " + " ".join(f"{'thr ' + f:>9}" for f in FARS)
          + " " + " ".join(f"{'TAR@' + f:>9}" for f in FARS))
    result["calibration"] = {}
    for m, r in cal.items():
        print(f"{m:14} {str(r['n_genuine']) + '/' + str(r['n_impostor']):>9} {r['auc']:7.4f} {100 * r['eer']:6.2f}% "
              + " ".join(f"{r['thresholds'][f]:9.4f}" for f in FARS) + " "
              + " ".join(f"{100 * r['tar_at_far'][f]:8.1f}%" for f in FARS))
        result["calibration"][m] = {k: r[k] for k in ("n_genuine", "n_impostor", "auc", "eer", "thresholds", "tar_at_far",
                                                       "best_accuracy")}

    # identification gallery: the first photo of every person (symlinks in the work folder)
    gallery = work / "gallery"
    shutil.rmtree(gallery, ignore_errors=True)
    for person in sorted(set(ids.values())):
        first = next(f for f in files if ids[f] == person)
        (gallery / person).mkdir(parents=True)
        (gallery / person / first).symlink_to(data / first)
    common = dict(models=list(models), identities=work / "identities.csv", gallery=gallery, thresholds=work / "thresholds.json",
                  device=args.device, batch_size=args.batch_size, glob="img*.jpg", progress=True)
    # 2. clean vs clean
    rep = run_audit(AuditConfig(protected=data, original=data, out=work / "clean", **common),
                    recognizers=models, detector=detector)
    result["clean_vs_clean"] = _print_audit("2. clean vs clean (dodging against the other photos of the same person)",
                                            rep)
    # 3. blurred vs clean
    blurred = work / "blurred"
    summary = run_deid([data], blurred, DeidConfig(methods=["blur"]), glob="img*.jpg", progress=False)
    print(f"\nblurred set: {summary.counts} with facepriv.deid blur (default strength)")
    rep = run_audit(AuditConfig(protected=blurred, original=data, out=work / "blurred_report", **common),
                    recognizers=models, detector=detector)
    result["blurred_vs_clean"] = _print_audit("3. blurred (facepriv deid --method blur) vs clean", rep)



if __name__ == "__main__":
    sys.exit(main())
