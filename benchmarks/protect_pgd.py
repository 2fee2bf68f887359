"""Baseline figures of the L-inf noise protections (issue 7): PGD against two surrogates.

    python benchmarks/protect_pgd.py [--n 20] [--eps 8/255,16/255] [--steps 20] [--method pgd]
                                     [--threads 1] [--work DIR] [--json benchmarks/protect_pgd.json]

1. N photos of ../shared/data/deepface-pairs (those that appear in a genuine pair of
   master.csv first, in name order) are protected through the real pipeline
   (``facepriv.protect.baselines.build_editor`` -> ``core.photo.process_photo`` ->
   ``core.batch.run_batch``, PNG outputs so the saved pixels are the attack's), with surrogates
   dlib-resnet + facenet-casia, for each epsilon.
2. FAR thresholds of sface, dlib-resnet and facenet-casia are calibrated with
   ``facepriv.audit.run_calibration`` on *all* pairs of the clean photos of the folder whose
   identity is known: identities are the connected components of the "Yes" pairs of master.csv
   and face-recognition-pivot.csv (as benchmarks/patch_benchmark.py does; img11_reflection.jpg
   counts as img11's person), every two photos of different identities are an impostor pair.
   The 62 photos / 13 identities give ~1,740 impostor and ~150 genuine pairs (master.csv alone
   has ~260 impostors), so FAR 1e-3 is resolved by ~2 impostor scores instead of sitting above
   the highest one. The pairs file is written to the work dir (``all_pairs.csv``); the script
   warns if fewer than 1,000 impostor pairs are scored.
3. ``facepriv.audit.run_audit`` measures dodging: each protected face against every *other*
   clean photo of the same person (identities from the same all-pairs file; photos with no
   other photo fall back to self-verification against their own original), PSR = share of
   attempts below the threshold; "before" is the same with the clean original (the clean
   false-reject rate). SFace is never used for the optimisation (transfer / black-box);
   dlib-resnet and facenet-casia are the surrogates (white-box). Quality: PSNR and SSIM of
   the whole photos (LPIPS/FID off: their weights cannot be downloaded here).
4. Seconds per face: the attack's wall time (``edit_s`` of each photo) / faces, on this CPU with
   ``--threads`` intra-op threads (the machine is shared; the load average is recorded).

Skips (exit 0) when ../shared is absent. Writes the figures to ``--json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deepface_ids import identities, write_all_pairs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODELS_AUDIT = ["sface", "dlib-resnet", "facenet-casia"]
MIN_IMPOSTORS = 1000  # FAR 1e-3 needs at least this many impostor pairs to be resolved


def pick_photos(data: Path, n: int) -> list[Path]:
    rows = list(csv.DictReader((data / "master.csv").open()))
    genuine = sorted({r[k] for r in rows if r["Decision"].strip().lower() == "yes" for k in ("file_x", "file_y")})
    others = sorted({r[k] for r in rows for k in ("file_x", "file_y")} - set(genuine))

    def key(name: str):
        stem = Path(name).stem
        digits = "".join(c for c in stem if c.isdigit())
        return (int(digits) if digits else 0, stem)

    names = sorted(genuine, key=key) + sorted(others, key=key)
    return [data / nm for nm in names[:n] if (data / nm).is_file()]


def protect(photos: list[Path], out: Path, eps: float, args, detector) -> dict:
    from facepriv.core.batch import collect_inputs, run_batch
    from facepriv.core.faces import FacePolicy
    from facepriv.core.photo import SaveOptions, process_photo
    from facepriv.attacks import AttackConfig, AttackEditor

    cfg = AttackConfig(method=args.method, epsilon=eps, steps=args.steps)
    edit = AttackEditor(cfg, args.surrogates.split(","), detector=detector).setup("cpu")
    white: dict[str, list[float]] = {}
    linf: list[float] = []
    edit_s: list[float] = []
    faces = 0

    def process(item, dst):
        nonlocal faces
        res = process_photo(item, dst, detector=detector, policy=FacePolicy(on_no_face="copy"), edit=edit,
                            save=SaveOptions())
        if res.status == "ok":
            faces += res.faces
            edit_s.append(res.timings["edit_s"])
            linf.append(edit.last_result.linf)
            for row in edit.last_result.per_face:
                for m, c in row.get("source_cosine", {}).items():
                    white.setdefault(m, []).append(c)
        return res

    items = collect_inputs([str(p) for p in photos])
    summary = run_batch(items, process, out_dir=out, config={"bench": "protect_pgd", **cfg.to_json(), "surrogates": edit.surrogates},
                        output_suffix=".png", description=f"{args.method} eps {eps * 255:.0f}/255", progress=True)
    return {
        "photos": len(photos), "faces": faces, "counts": summary.counts,
        "seconds_per_face": round(sum(edit_s) / max(1, faces), 2),
        "seconds_total_attack": round(sum(edit_s), 1),
        "max_linf_255": round(max(linf, default=0.0) * 255, 3),
        "white_box_cosine_to_clean_mean": {m: round(sum(v) / len(v), 4) for m, v in white.items()},
        "config": {**cfg.to_json(), "surrogates": edit.surrogates},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--eps", default="8/255,16/255", help="comma list of budgets (8/255 or 8 = 8 levels)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--method", default="pgd")
    ap.add_argument("--surrogates", default="dlib-resnet,facenet-casia")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--work", type=Path, default=None, help="keep protected photos and audit reports here")
    ap.add_argument("--json", type=Path, default=Path(__file__).with_name("protect_pgd.json"))
    args = ap.parse_args(argv)

    data = args.shared / "data" / "deepface-pairs"
    if not (data / "master.csv").is_file():
        print(f"skipped: {data}/master.csv not found (the benchmark needs ../shared)")
        return 0
    import torch

    from facepriv.attacks import parse_epsilon
    from facepriv.audit import AuditConfig, CalibrationConfig, run_audit, run_calibration
    from facepriv.models import create_model

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="protect_pgd_"))
    work.mkdir(parents=True, exist_ok=True)
    photos = pick_photos(data, args.n)
    detector = create_model("mtcnn")
    print(f"{len(photos)} photos from {data}; work dir {work}; threads {args.threads}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    t = time.perf_counter()
    ids = identities(data)
    pairs_file = work / "all_pairs.csv"
    n_gen, n_imp = write_all_pairs(ids, pairs_file)
    print(f"all pairs of {len(ids)} photos / {len(set(ids.values()))} identities: {n_gen} genuine, "
          f"{n_imp} impostor -> {pairs_file}", flush=True)
    thr_file = work / "thresholds.json"
    cal = run_calibration(CalibrationConfig(pairs=pairs_file, root=data, models=MODELS_AUDIT, store=False,
                                            out=thr_file, device="cpu", progress=False), detector=detector)
    thresholds = {m: {k: round(v, 5) for k, v in rec["thresholds"].items()} for m, rec in cal.items()}
    n_pairs = {m: (len(rec.get("genuine_scores", [])), len(rec.get("impostor_scores", []))) for m, rec in cal.items()}
    print(f"calibrated on all pairs in {time.perf_counter() - t:.0f} s: {json.dumps(thresholds)}; "
          f"(genuine, impostor) pairs scored {n_pairs}", flush=True)
    for m, (_, imp) in n_pairs.items():
        if imp < MIN_IMPOSTORS:
            print(f"WARNING: {m}: only {imp} impostor pairs scored (< {MIN_IMPOSTORS}): FAR 1e-3 is not resolved",
                  flush=True)

    results: dict = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                     "photos": [p.name for p in photos], "thresholds": thresholds,
                     "calibration": {"pairs": "all pairs of the folder's photos with a known identity "
                                              "(master.csv + face-recognition-pivot.csv)",
                                     "photos": len(ids), "identities": len(set(ids.values())),
                                     "pairs_written": {"genuine": n_gen, "impostor": n_imp}},
                     "calibration_pairs": n_pairs,
                     "threads": args.threads, "load_average_start": round(os.getloadavg()[0], 2), "runs": {}}
    for eps_text in args.eps.split(","):
        eps = parse_epsilon(eps_text)
        label = f"{round(eps * 255)}/255"
        out = work / f"eps{round(eps * 255)}"
        run = protect(photos, out, eps, args, detector)
        rep = run_audit(AuditConfig(protected=out, original=data, models=MODELS_AUDIT, pairs=pairs_file, pairs_root=data,
                                    thresholds=thr_file, out=work / f"audit_eps{round(eps * 255)}", device="cpu",
                                    lpips=None, fid=False, download=False, progress=False))
        run["audit"] = {}
        for m in MODELS_AUDIT:
            d = rep["models"][m]["dodging"]
            run["audit"][m] = {"role": "transfer (never optimised)" if m not in args.surrogates.split(",")
                               else "white-box surrogate",
                               "n": d["n"], "psr": d["psr"], "psr_before": d["before"]["psr"],
                               "mean_similarity": d["mean_similarity"],
                               "mean_similarity_before": d["before"]["mean_similarity"],
                               "protocol": d.get("protocol")}
        run["quality"] = {k: rep["quality"].get(k) for k in ("psnr", "ssim")}
        run["protocol_notes"] = rep.get("protocol_notes", [])
        run["load_average"] = round(os.getloadavg()[0], 2)
        results["runs"][label] = run
        print(f"\n== {args.method}, eps {label}, {args.steps} steps, surrogates {args.surrogates} ==")
        print(f"photos {run['photos']}, faces {run['faces']}, attack {run['seconds_per_face']} s/face "
              f"(CPU, {args.threads} thread(s), load {run['load_average']}), max |delta| {run['max_linf_255']}/255")
        print(f"PSNR {run['quality']['psnr']:.2f} dB, SSIM {run['quality']['ssim']:.4f}")
        print(f"{'model':<15}{'role':<28}{'n':>5}{'PSR@1e-2':>10}{'PSR@1e-3':>10}{'before@1e-2':>13}"
              f"{'mean sim':>10}{'before':>9}")
        for m, a in run["audit"].items():
            print(f"{m:<15}{a['role']:<28}{a['n']:>5}{a['psr']['1e-2']:>10.3f}{a['psr']['1e-3']:>10.3f}"
                  f"{a['psr_before']['1e-2']:>13.3f}{a['mean_similarity']:>10.3f}{a['mean_similarity_before']:>9.3f}")
        print(f"white-box cosine to the clean face (mean): {run['white_box_cosine_to_clean_mean']}", flush=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"\nwritten {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
