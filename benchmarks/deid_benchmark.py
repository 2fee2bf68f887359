"""facepriv deid on ../shared/data/deepface-pairs: re-identification, quality and speed per
method, and throughput / face recall beside ``deface`` on the same photos.

    .venv/bin/python benchmarks/deid_benchmark.py [--methods blur,pixelate,...] [--device cpu]
        [--deface /tmp/deface-venv/bin/deface] [--work DIR] [--rounds 2]

1. The 64 photos (61 labelled portraits of 13 people, ``couple.jpg``, ``selfie-many-people.jpg``)
   are copied to a work folder (deface writes next to its inputs; ../shared stays untouched).
2. Reference faces: every face found by at least 2 of facepriv's 3 detectors (mtcnn, yunet,
   centerface; boxes matched at IoU >= 0.4). Recall of a tool = share of them it found.
3. Per method: ``run_deid`` over the 64 photos. Each photo is detected once by MTCNN (timed in
   step 2) and the detections are reused by every method, so "img/s" = 64 / (MTCNN's detection
   time + this method's read + edit + write time); "ms/face" is the method alone. Then
   ``facepriv audit`` (``run_audit``) of the 61 labelled photos against the clean ones with
   dlib-resnet, facenet-casia and sface: dodging against the *other* photos of the same person,
   thresholds at FAR 1e-1/1e-2/1e-3 calibrated on all pairs of the 61 clean photos; faces are
   found by YuNet (for speed; the deid runs use MTCNN) and embedded at the *original's*
   landmarks (an attacker who knows where the face is: a face the detector no longer finds is
   not counted as protected for free). Re-identification rate = 1 - PSR. PSNR / SSIM over the
   whole photo (from the audit).
4. deface (its own venv; ``pip install deface onnx onnxruntime``) vs ``facepriv deid`` as command
   lines, same blur method, same photos, alternating ``--rounds`` times (best kept): images/s,
   faces found, recall against the reference faces. deface's faces are counted by running its
   own CenterFace class at its default threshold (0.2) on the same photos.

The generative method needs ``google/ddpm-celebahq-256``; when it is not on this machine a tiny,
*untrained* diffusion model is made instead (mechanics and timing only; its results say nothing
about quality). Prints everything; writes benchmarks/deid_benchmark.json. Skips (exit 0) without
../shared.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
DEFAULT_SHARED = ROOT.parent / "shared"
DEFAULT_METHODS = ("blur,pixelate,mask,eyebar,noise,k-same-average,k-same-select,k-same-pixelate,"
                   "inpaint,adversarial")
FR_MODELS = "dlib-resnet,facenet-casia,sface"

DEFACE_COUNT = r"""
import json, sys, imageio.v2 as iio
from deface.centerface import CenterFace
cf = CenterFace(in_shape=None, backend="auto")
out = {}
for p in sys.argv[2:]:
    dets, _ = cf(iio.imread(p), threshold=float(sys.argv[1]))
    out[p.rsplit("/", 1)[-1]] = [[float(v) for v in d[:5]] for d in dets]
print(json.dumps(out))
"""


def iou_match(ref: list, found: list, thr: float = 0.4) -> int:
    """How many reference boxes are matched (one to one, IoU >= thr) by found boxes."""
    from facepriv.deid.video import box_iou

    if not ref or not found:
        return 0
    m = box_iou(np.asarray(ref)[:, :4], np.asarray(found)[:, :4])
    hit = 0
    while m.size and m.max() >= thr:
        i, j = np.unravel_index(int(m.argmax()), m.shape)
        hit += 1
        m[i, :] = 0
        m[:, j] = 0
    return hit


def reference_faces(photos: list[Path], dets: dict) -> tuple[dict, dict, dict]:
    """Per photo: boxes found by >= 2 of the 3 detectors; each detector's own boxes; and each
    detector's total time."""
    from facepriv.core.io import load_image
    from facepriv.deid.video import box_iou

    per = {n: {} for n in dets}
    secs = dict.fromkeys(dets, 0.0)
    ref = {}
    for p in photos:
        rgb = load_image(p).rgb
        found = {}
        for n, d in dets.items():
            t = time.perf_counter()
            found[n] = [list(map(float, f.box)) for f in d.detect(rgb) if f.size >= 20]
            secs[n] += time.perf_counter() - t
        for n in dets:
            per[n][p.name] = found[n]
        # candidates: every box; keep one per cluster of boxes that >= 2 detectors agree on
        cands = [(n, b) for n in found for b in found[n]]
        kept: list[list[float]] = []
        for n, b in cands:
            votes = {n} | {m for m in found if m != n and any(
                box_iou(np.asarray([b]), np.asarray([c]))[0, 0] >= 0.4 for c in found[m])}
            if len(votes) >= 2 and not any(box_iou(np.asarray([b]), np.asarray([k]))[0, 0] >= 0.4 for k in kept):
                kept.append(b)
        ref[p.name] = kept
    return ref, per, secs


def tiny_score_model(path: Path) -> Path:
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=64, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    unet.save_pretrained(path / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(path / "scheduler")
    return path


def method_config(name: str, work: Path, photos_dir: Path, args) -> tuple[object, str]:
    from facepriv.deid import DeidConfig
    from facepriv.models import availability

    note = ""
    opts: dict = {}
    k_pool = None
    if name.startswith("k-same"):
        opts = {"k": args.k}
        k_pool = str(photos_dir)
        note = f"k={args.k}, pool = the 64 photos (identities clustered by dlib-resnet; own identity excluded)"
    elif name == "inpaint":
        if availability("ddpm-celebahq-256").available:
            opts = {"steps": 100, "jump_length": 10, "jump_n_sample": 3}
            note = "google/ddpm-celebahq-256, 100 steps, jump 10 x 3"
        else:
            opts = {"score_model": str(tiny_score_model(work / "tiny-ddpm")), "steps": 10, "jump_length": 1,
                    "jump_n_sample": 1}
            note = "TINY UNTRAINED 64 px model (ddpm-celebahq-256 not on this machine): mechanics/timing only"
    elif name == "adversarial":
        opts = {"steps": args.adv_steps}
        note = f"default attack and surrogates, {args.adv_steps} steps"
    extra = json.loads(args.options).get(name) if args.options else None
    if extra:  # --options: per-method overrides, e.g. a thinner eye bar
        opts = {**opts, **extra}
        note = (note + "; " if note else "") + "options " + json.dumps(extra)
    return DeidConfig(methods=[name], options={name: opts} if opts else {}, k_pool=k_pool), note


def audit(protected: Path, photos_dir: Path, work: Path, models: dict, detector, args) -> dict:
    from facepriv.audit import AuditConfig, run_audit

    rep = run_audit(AuditConfig(protected=protected, original=photos_dir, models=list(models),
                                identities=work / "identities.csv", thresholds=work / "thresholds.json",
                                landmarks="original", device=args.device, glob="img*.jpg", lpips=None, fid=False,
                                progress=False, out=None), recognizers=models, detector=detector)
    out = {"models": {}, "quality": {k: rep["quality"].get(k) for k in ("psnr", "ssim")}, "faces": rep.get("faces")}
    for m, e in rep["models"].items():
        d = e["dodging"]
        out["models"][m] = {"n": d["n"], "psr": d["psr"], "reid": {f: round(1 - v, 4) for f, v in d["psr"].items()},
                            "mean_similarity": d["mean_similarity"], "protocol": d.get("protocol")}
    return out


def timed_cli(cmd: list[str], env=None) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({r.returncode}): {r.stderr[-2000:]}")
    return time.perf_counter() - t


def versus_deface(photos: list[Path], work: Path, ref: dict, args) -> dict | None:
    deface = Path(args.deface)
    if not deface.is_file():
        print(f"\n4. deface: {deface} not found; install it in its own venv "
              "(python3 -m venv /tmp/deface-venv && /tmp/deface-venv/bin/pip install deface onnx onnxruntime)")
        return None
    facepriv = [str(ROOT / ".venv" / "bin" / "facepriv")] if (ROOT / ".venv" / "bin" / "facepriv").is_file() else \
        [sys.executable, "-m", "facepriv"]
    env = {**os.environ, "FACEPRIV_OFFLINE": "1"}
    res: dict = {"deface_s": [], "facepriv": {}}
    detectors = args.vs_detectors.split(",")
    for d in detectors:
        res["facepriv"][d] = {"s": []}
    for r in range(args.rounds):
        srcs = {}
        for tool in ("deface", "facepriv"):  # each tool reads its own fresh copy of the photos
            srcs[tool] = work / f"vs-{tool}-{r}"
            shutil.rmtree(srcs[tool], ignore_errors=True)
            srcs[tool].mkdir()
            for p in photos:
                shutil.copy(p, srcs[tool] / p.name)
        # deface writes <name>_anonymized.jpg next to each input
        res["deface_s"].append(timed_cli([str(deface), str(srcs["deface"]), "--replacewith", "blur"]))
        for d in detectors:
            out = work / f"vs-out-{d}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            res["facepriv"][d]["s"].append(timed_cli(
                facepriv + ["--device", args.device, "--quiet", "deid", str(srcs["facepriv"]), "--method", "blur",
                            "--detector", d, "--out", str(out)], env=env))
            res["facepriv"][d]["out"] = out
        print(f"   round {r + 1}: deface {res['deface_s'][-1]:.1f} s, " + ", ".join(
            f"facepriv[{d}] {res['facepriv'][d]['s'][-1]:.1f} s" for d in detectors))
    n = len(photos)
    total_ref = sum(len(v) for v in ref.values())
    # faces found: deface via its own CenterFace; facepriv from its manifest
    py = deface.parent / "python"
    r = subprocess.run([str(py), "-c", DEFACE_COUNT, "0.2"] + [str(p) for p in photos], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"counting deface's faces failed: {r.stderr[-2000:]}")
    deface_boxes = json.loads(r.stdout.strip().splitlines()[-1])
    out = {"images": n, "reference_faces": total_ref, "rounds": args.rounds}
    found = sum(len(v) for v in deface_boxes.values())
    hit = sum(iou_match(ref[k], deface_boxes.get(k, [])) for k in ref)
    out["deface"] = {"s": [round(s, 2) for s in res["deface_s"]], "images_per_s": round(n / min(res["deface_s"]), 3),
                     "faces": found, "recall": round(hit / total_ref, 4), "extra": found - hit}
    from facepriv.core.batch import Manifest

    for d in detectors:
        rows = Manifest.read_all(res["facepriv"][d]["out"])
        boxes = {Path(row["input"]).name: row.get("boxes", []) for row in rows}
        found = sum(len(v) for v in boxes.values())
        hit = sum(iou_match(ref[k], boxes.get(k, [])) for k in ref)
        s = res["facepriv"][d]["s"]
        out[f"facepriv-{d}"] = {"s": [round(x, 2) for x in s], "images_per_s": round(n / min(s), 3), "faces": found,
                                "recall": round(hit / total_ref, 4), "extra": found - hit,
                                "speedup_vs_deface": round(min(res["deface_s"]) / min(s), 2)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--models", default=FR_MODELS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--adv-steps", type=int, default=20)
    ap.add_argument("--options", default="", help='per-method options as JSON, e.g. \'{"eyebar": {"height": 0.9}}\'')
    ap.add_argument("--deface", default="/tmp/deface-venv/bin/deface")
    ap.add_argument("--vs-detectors", default="mtcnn,yunet,centerface", help="facepriv detectors timed beside deface")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip", default="", help="parts to skip: methods,deface")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args(argv)
    data = args.shared / "data" / "deepface-pairs"
    if not (data / "master.csv").is_file():
        print(f"skipped: {data}/master.csv not found")
        return 0
    os.environ.setdefault("FACEPRIV_OFFLINE", "1")
    import csv
    import itertools

    import torch

    from facepriv.audit import CalibrationConfig, run_calibration
    from facepriv.deid import run_deid
    from facepriv.models import create_model
    from fr_verification import deepface_identities

    work = args.work or Path(tempfile.mkdtemp(prefix="facepriv-deid-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    photos_dir = work / "photos"
    photos_dir.mkdir(exist_ok=True)
    photos = []
    for p in sorted(data.glob("*.jpg")):
        shutil.copy(p, photos_dir / p.name)
        photos.append(photos_dir / p.name)
    ids = deepface_identities(data)
    labelled = sorted(ids)
    with open(work / "identities.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "identity"])
        w.writerows((n, ids[n]) for n in labelled)
    with open(work / "all_pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_x", "file_y", "decision"])
        for a, b in itertools.combinations(labelled, 2):
            w.writerow([photos_dir / a, photos_dir / b, "same" if ids[a] == ids[b] else "different"])
    result: dict = {"data": str(data), "images": len(photos), "labelled": len(labelled),
                    "identities": len(set(ids.values())), "device": args.device,
                    "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    print(f"{len(photos)} photos ({len(labelled)} labelled, {result['identities']} people), device {args.device}, "
          f"{torch.get_num_threads()} torch threads")

    from facepriv.deid.pipeline import CachedDetector

    # one MTCNN for everything, remembering its answers: each photo is detected once, and the
    # per-method speed adds that one-off detection time back (see below)
    dets = {"mtcnn": CachedDetector(create_model("mtcnn", device=args.device)),
            "yunet": create_model("yunet", device=args.device), "centerface": create_model("centerface", device=args.device)}
    t = time.perf_counter()
    ref, per_detector, det_secs = reference_faces(photos, dets)
    n_ref = sum(len(v) for v in ref.values())
    result["reference_faces"] = n_ref
    result["detect_s"] = {k: round(v, 2) for k, v in det_secs.items()}
    result["detector_recall"] = {d: round(sum(iou_match(ref[k], v[k]) for k in ref) / n_ref, 4)
                                 for d, v in per_detector.items()}
    print(f"\n2. reference faces (>= 2 of mtcnn/yunet/centerface agree): {n_ref} in {len(photos)} photos "
          f"({time.perf_counter() - t:.0f} s); recall per detector: {result['detector_recall']}; "
          f"detection time (s) per detector: {result['detect_s']}")

    if "methods" not in args.skip:
        models = {m: create_model(m, device=args.device) for m in args.models.split(",")}
        # the audit (calibration included) finds faces with YuNet: 10x faster than MTCNN on these
        # photos at the same recall; embeddings use the original photo's landmarks
        detector = CachedDetector(dets["yunet"])
        cal = run_calibration(CalibrationConfig(pairs=work / "all_pairs.csv", models=list(models), store=False,
                                                out=work / "thresholds.json", device=args.device, progress=False),
                              recognizers=models, detector=detector)
        result["thresholds"] = {m: r["thresholds"] for m, r in cal.items()}
        print(f"\nthresholds (calibrated on all pairs of the {len(labelled)} clean photos): {result['thresholds']}")
        base = audit(photos_dir, photos_dir, work, models, detector, args)
        result["methods"] = {"none (clean)": {"audit": base}}
        rows = [("none (clean)", None, base, "")]
        for name in args.methods.split(","):
            cfg, note = method_config(name, work, photos_dir, args)
            out = work / "deid" / name
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            summary = run_deid([photos_dir], out, cfg, device=args.device, progress=False, detector=dets["mtcnn"])
            wall = time.perf_counter() - t
            a = audit(out, photos_dir, work, models, detector, args)
            # end to end = read + edit + write of this run + MTCNN's one-off detection time
            from facepriv.core.batch import Manifest

            rows_m = Manifest.read_all(out)
            work_s = sum(r["timings"].get("total_s", 0) - r["timings"].get("detect_s", 0) for r in rows_m)
            e2e = work_s + det_secs["mtcnn"]
            edit_s = sum(r["timings"].get("edit_s", 0) for r in rows_m)
            n_faces = sum(r.get("faces", 0) for r in rows_m)
            entry = {"note": note, "counts": summary.counts, "faces": n_faces, "wall_s": round(wall, 2),
                     "images_per_s": round(len(photos) / e2e, 3),
                     "method_ms_per_face": round(1000 * edit_s / max(1, n_faces), 1),
                     "setup_s": round(wall - summary.elapsed, 2), "audit": a}
            result["methods"][name] = entry
            rows.append((name, entry, a, note))
            print(f"   {name}: {summary.counts}, {entry['images_per_s']} img/s end to end, "
                  f"{entry['method_ms_per_face']} ms/face for the method, setup (models, pool) {entry['setup_s']} s",
                  flush=True)
            args.json.write_text(json.dumps(result, indent=1, default=str))
        fars = ("1e-1", "1e-2", "1e-3")
        mnames = list(models)
        print("\n3. re-identification rate (1 - PSR, dodging vs other photos of the same person) at FAR "
              + "/".join(fars) + ", quality, speed")
        print(f"{'method':16} " + " ".join(f"{m:>20}" for m in mnames) + f" {'PSNR':>6} {'SSIM':>6} {'img/s':>7}"
              f" {'ms/face':>8}")
        for name, entry, a, note in rows:
            cells = " ".join(("/".join(f"{100 * a['models'][m]['reid'][f]:.0f}" for f in fars) + "%").rjust(20)
                             for m in mnames)
            q = a["quality"]
            psnr = f"{q['psnr']:.1f}" if isinstance(q.get("psnr"), (int, float)) else "-"
            ssim = f"{q['ssim']:.3f}" if isinstance(q.get("ssim"), (int, float)) else "-"
            speed = f"{entry['images_per_s']:.2f}" if entry else "-"
            ms = f"{entry['method_ms_per_face']:.0f}" if entry else "-"
            print(f"{name:16} {cells} {psnr:>6} {ssim:>6} {speed:>7} {ms:>8}" + (f"  [{note}]" if note else ""))
        args.json.write_text(json.dumps(result, indent=1, default=str))

    if "deface" not in args.skip:
        print(f"\n4. deface vs facepriv deid (blur), {len(photos)} photos, command lines, best of {args.rounds}")
        vs = versus_deface(photos, work, ref, args)
        if vs is not None:
            result["vs_deface"] = vs
            print(f"{'tool':22} {'img/s':>7} {'faces':>6} {'recall':>7} {'extra':>6} {'runs (s)':>16}")
            for tool in [k for k in vs if k == "deface" or k.startswith("facepriv-")]:
                r = vs[tool]
                print(f"{tool:22} {r['images_per_s']:7.3f} {r['faces']:6d} {100 * r['recall']:6.1f}% {r['extra']:6d} "
                      f"{', '.join(f'{s:.1f}' for s in r['s']):>16}"
                      + (f"  {r['speedup_vs_deface']:.2f}x deface" if "speedup_vs_deface" in r else ""))
            print(f"reference faces: {vs['reference_faces']}")
    args.json.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwritten: {args.json}; work folder {work}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
