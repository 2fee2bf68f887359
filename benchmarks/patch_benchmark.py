"""Patch generator vs per-image PGD patches: protection (held-out FR model) and apply speed.

    python benchmarks/patch_benchmark.py [--epochs 30] [--region eyeglass] [--pgd-steps 50]
        [--surrogates dlib-resnet,facenet-casia] [--eval sface] [--work /tmp/facepriv-patch-bench]

Data: ../shared/data/deepface-pairs (62 photos, 13 identities; identities from the labelled
pairs in master.csv and face-recognition-pivot.csv). Split by photo: every third photo of each
identity (sorted by name) is a test photo, the rest train the generator. Nothing is copied:
the generator reads a list file of paths; outputs go to --work (outside the repository).

Protocol
  * Train a generator on the training photos (targets = the training photos too, so it
    learns impersonation and - with evasion_prob - evasion) against the surrogates.
  * Protect every test photo (largest face) four ways: generator (evasion, one pass),
    generator (impersonation of another identity, conditioned on one training photo of that
    identity), per-image PGD on the patch pixels with the same surrogates / placement /
    objective (evasion and impersonation), plus two controls: a mid-grey and a random-noise
    patch in the same region (how much is mere occlusion).
  * Judge with a model NOT used in training (default sface) and, for reference, with the
    surrogates (white-box). Thresholds: the model's published one (sface 0.363) and
    thresholds at FAR 1e-1 / 1e-2 / 1e-3 calibrated on all impostor pairs of the clean photos.
    - dodging PSR (audit schema): share of protected faces whose similarity to their own
      original stays below the threshold;
    - genuine-pair PSR: share of (protected probe, other clean photo of the same person)
      pairs below the threshold (before protection: the false-reject rate);
    - rank-1 identification: gallery = all other clean photos; rank-1 before / after;
    - impersonation success: share of protected faces whose similarity to the target's other
      photos (not the conditioning one) reaches the threshold (mean over target photos).
  * Speed: images/s of the edit step (alignment + patch + paste, faces already detected) for
    the generator (one photo per call, and batched over all photos) and for PGD, same
    machine, same thread count, timed back to back on each photo; the ratio is the headline.

If facepriv.audit is importable, the evasion outputs are also written as PNG and audited by
``facepriv.audit.run_audit`` (its report is printed next to ours); otherwise the local
computation above is the audit. Exit 0 with a message when ../shared is absent.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "deepface-pairs"


def identities(folder: Path) -> dict[str, str]:
    """file name -> identity id, from the labelled pairs (union-find over 'Yes' pairs)."""
    parent: dict[str, str] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for name, dec in (("master.csv", "Decision"), ("face-recognition-pivot.csv", "decision")):
        p = folder / name
        if not p.is_file():
            continue
        for r in csv.DictReader(open(p, newline="")):
            a, b = os.path.basename(r["file_x"]), os.path.basename(r["file_y"])
            find(a), find(b)
            if r[dec] == "Yes":
                parent[find(a)] = find(b)
    files = {f.name for f in folder.glob("img*.jpg")}
    # img11_reflection.jpg is a mirrored img11.jpg (same person)
    for f in files:
        if f not in parent and "_" in f and f.split("_")[0] + ".jpg" in parent:
            parent[f] = find(f.split("_")[0] + ".jpg")
    roots = {}
    return {f: roots.setdefault(find(f), f"id{len(roots):02d}") for f in sorted(files) if f in parent}


def _num(name: str) -> int:
    return int(name[3:].split(".")[0].split("_")[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--region", default="eyeglass")
    ap.add_argument("--patch-size", type=int, default=64)
    ap.add_argument("--surrogates", default="dlib-resnet,facenet-casia")
    ap.add_argument("--eval", default="sface")
    ap.add_argument("--pgd-steps", type=int, default=50)
    ap.add_argument("--tv", type=float, default=0.02)
    ap.add_argument("--evasion-prob", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/facepriv-patch-bench")
    ap.add_argument("--retrain", action="store_true", help="train again even if --work holds a generator")
    ap.add_argument("--json", default=str(Path(__file__).with_suffix(".json")))
    args = ap.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} not found (the benchmark needs ../shared/data/deepface-pairs)")
        return 0

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from facepriv.attacks.identity import SurrogateEnsemble
    from facepriv.core.device import seed_everything
    from facepriv.core.io import load_image
    from facepriv.models import create_model, get_spec
    from facepriv.models.recognition import embed_faces, similarity, similarity_matrix
    from facepriv.patch import GeneratorConfig, PatchApplier, PatchLossWeights, PatchTrainConfig
    from facepriv.patch.generator import PatchGenerator
    from facepriv.patch.pgd import optimize_patches
    from facepriv.patch.placement import get_region, patch_to_photo, paste_patch
    from facepriv.patch.train import PatchTrainer

    seed_everything(0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ids = identities(SHARED)
    by_id: dict[str, list[str]] = defaultdict(list)
    for f, i in ids.items():
        by_id[i].append(f)
    train, test = [], []
    for _i, fs in sorted(by_id.items()):
        for k, f in enumerate(sorted(fs, key=_num)):
            (test if k % 3 == 2 else train).append(f)
    (work / "train.txt").write_text("\n".join(str(SHARED / f) for f in train) + "\n")
    print(f"data: {len(ids)} photos, {len(by_id)} identities; train {len(train)} photos, test {len(test)} photos")

    # ------------------------------------------------------------------ training
    surrogate_names = [s for s in args.surrogates.split(",") if s]
    gen_dir = work / f"gen-{args.region}"
    wts = PatchLossWeights(pull=1.0, push=1.0, tv=args.tv)
    cfg = PatchTrainConfig(data=[f"@{work / 'train.txt'}"], targets=[f"@{work / 'train.txt'}"], out=str(gen_dir),
                           surrogates=surrogate_names, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           weights=wts, evasion_prob=args.evasion_prob,
                           generator=GeneratorConfig(patch_size=args.patch_size, region=args.region), seed=0)
    train_s = None
    if args.retrain or not (gen_dir / "train_state.json").is_file() or \
            json.loads((gen_dir / "train_state.json").read_text())["epoch"] < args.epochs:
        t = time.perf_counter()
        trainer = PatchTrainer(cfg, device="cpu", progress=True)
        res = trainer.fit(resume=not args.retrain)
        train_s = time.perf_counter() - t
        print(f"trained {res.epochs} epochs / {res.steps} steps on {res.faces} faces in {train_s:.0f} s "
              f"(this run; resumed from epoch {res.resumed_from})")
        history = res.history
    else:
        history = json.loads((gen_dir / "train_state.json").read_text())["history"]
        print(f"using the generator in {gen_dir} ({len(history)} epochs)")
    print("last epoch:", {k: v for k, v in history[-1].items()})

    # ------------------------------------------------------------------ test faces
    lm_cache = work / "landmarks.json"  # MTCNN on 62 large photos is slow on CPU: once per work folder
    known = json.loads(lm_cache.read_text()) if lm_cache.is_file() else {}
    det = None
    photos = {}
    for f in sorted(ids, key=_num):
        img = load_image(SHARED / f)
        if f not in known:
            det = det or create_model("mtcnn")
            faces = det.detect(img.rgb)
            known[f] = max(faces, key=lambda q: q.width * q.height).landmarks.tolist() if faces else None
        if known[f] is None:
            continue
        photos[f] = (img.to_tensor(), torch.tensor(known[f], dtype=torch.float32)[None])
    lm_cache.write_text(json.dumps(known))
    test = [f for f in test if f in photos]
    id_list = sorted(by_id)
    # impersonation target: the next identity (cyclic); condition on its first training photo
    target_of = {}
    for f in test:
        j = (id_list.index(ids[f]) + 1) % len(id_list)
        tid = id_list[j]
        cond = next(g for g in sorted(by_id[tid], key=_num) if g in train and g in photos)
        target_of[f] = (tid, cond)

    gen = PatchGenerator.from_pretrained(gen_dir)
    applier = PatchApplier(gen, device="cpu")
    region = get_region(args.region)
    P = args.patch_size

    def q(x):  # what a saved 8-bit file holds
        return (x.clamp(0, 1) * 255).round() / 255

    results: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    # Generator and PGD are timed back to back on each photo (interleaved), so a busy machine
    # slows both alike; the first call of each is a warm-up (kernel selection), not timed.
    from facepriv.core.align import align_faces

    sur = SurrogateEnsemble(surrogate_names)
    spent: dict[str, float] = defaultdict(float)
    applier.apply(*photos[test[0]])
    optimize_patches(*photos[test[0]], sur, region=region, patch_size=P, steps=1, weights=wts)
    for mode in ("evasion", "impersonation"):
        for k, f in enumerate(test):
            img, lm = photos[f]
            _, cond = target_of[f]
            t = time.perf_counter()
            if mode == "impersonation":  # encoding the target is part of the cost
                applier.set_target(align_faces(photos[cond][0], photos[cond][1], "arcface-112",
                                               size=(gen.config.input_size,) * 2).crops[0])
            else:
                applier.set_target(None)
            results[f"generator-{mode}"][f] = q(applier.apply(img, lm))
            spent[f"generator-{mode}"] += time.perf_counter() - t
            t = time.perf_counter()
            tref = sur.reference(*photos[cond]) if mode == "impersonation" else None
            out, _ = optimize_patches(img, lm, sur, region=region, patch_size=P, steps=args.pgd_steps,
                                      weights=wts, target_ref=tref)
            spent[f"pgd-{mode}"] += time.perf_counter() - t
            results[f"pgd-{mode}"][f] = q(out)
            print(f"\r{mode}: {k + 1}/{len(test)}", end="", file=sys.stderr)
        print(file=sys.stderr)
        if mode == "evasion":  # the generator batched over all test photos at once
            applier.set_target(None)
            t = time.perf_counter()
            applier.apply_many([photos[f][0] for f in test], [photos[f][1] for f in test])
            spent["generator-evasion-batched"] += time.perf_counter() - t
    timing = {k: v / len(test) for k, v in spent.items()}
    # controls: a mid-grey and a random patch in the same region (occlusion alone)
    g = torch.Generator().manual_seed(0)
    for name, make in (("grey-patch", lambda: torch.full((1, 3, P, P), 0.5)),
                       ("noise-patch", lambda: torch.rand((1, 3, P, P), generator=g))):
        for f in test:
            img, lm = photos[f]
            results[name][f] = q(paste_patch(img, make(), region, patch_to_photo(region, P, lm)))

    # ------------------------------------------------------------------ evaluation
    eval_models = [args.eval] + surrogate_names
    report: dict = {"setup": {
        "train_photos": len(train), "test_photos": len(test), "identities": len(by_id), "epochs": args.epochs,
        "steps": history[-1]["step"], "batch_size": args.batch_size, "lr": args.lr, "region": args.region,
        "patch_size": P, "surrogates": surrogate_names, "eval": args.eval, "pgd_steps": args.pgd_steps,
        "threads": args.threads, "train_s": train_s, "generator_params": gen.num_parameters(),
    }, "timing_s_per_image": {k: round(v, 4) for k, v in timing.items()}, "models": {}}

    names_all = sorted(photos, key=_num)
    for mname in eval_models:
        model = create_model(mname)
        spec = get_spec(mname)
        with torch.no_grad():
            clean = {f: embed_faces(model, *photos[f])[0] for f in names_all}
            E = torch.stack([clean[f] for f in names_all])
            S = similarity_matrix(E, E, spec.metric)
            same = torch.tensor([[ids[a] == ids[b] for b in names_all] for a in names_all])
            iu = torch.triu_indices(len(names_all), len(names_all), 1)
            imp_scores = S[iu[0], iu[1]][~same[iu[0], iu[1]]].sort(descending=True).values
            thr = {}
            for far in ("1e-1", "1e-2", "1e-3"):
                k = max(1, int(np.ceil(float(far) * len(imp_scores))))
                thr[far] = float(imp_scores[k - 1])  # similarity >= thr accepted -> FAR ~ far
            if "default" in spec.thresholds:
                thr["published"] = float(spec.thresholds["default"])
            mrep = {"thresholds": {k: round(v, 4) for k, v in thr.items()},
                    "impostor_pairs": len(imp_scores), "methods": {}}
            for method in ["clean", *results]:
                probes = {f: (clean[f] if method == "clean" else embed_faces(model, results[method][f],
                                                                                photos[f][1])[0]) for f in test}
                row = {}
                for tk, tv in thr.items():
                    self_sim = torch.stack([similarity(probes[f], clean[f], spec.metric) for f in test])
                    gen_pairs = [similarity(probes[f], clean[h], spec.metric) for f in test for h in names_all
                                 if h != f and ids[h] == ids[f]]
                    gp = torch.stack(gen_pairs)
                    row[tk] = {"dodging_psr": round(float((self_sim < tv).float().mean()), 4),
                               "genuine_pair_psr": round(float((gp < tv).float().mean()), 4)}
                    if method in ("clean", "generator-impersonation", "pgd-impersonation"):
                        succ = []
                        for f in test:
                            tid, cond = target_of[f]
                            others = [h for h in by_id[tid] if h != cond and h in photos]
                            s = torch.stack([similarity(probes[f], clean[h], spec.metric) for h in others])
                            succ.append(float((s >= tv).float().mean()))
                        row[tk]["impersonation_success"] = round(float(np.mean(succ)), 4)
                # identification: gallery = all other clean photos
                r1, r5 = [], []
                for f in test:
                    gal = [h for h in names_all if h != f]
                    sims = torch.stack([similarity(probes[f], clean[h], spec.metric) for h in gal])
                    order = [ids[gal[i]] for i in sims.argsort(descending=True).tolist()]
                    ranked = list(dict.fromkeys(order))
                    r1.append(ranked[0] == ids[f])
                    r5.append(ids[f] in ranked[:5])
                row["rank1"] = round(float(np.mean(r1)), 4)
                row["rank5"] = round(float(np.mean(r5)), 4)
                row["mean_self_similarity"] = round(float(torch.stack(
                    [similarity(probes[f], clean[f], spec.metric) for f in test]).mean()), 4)
                mrep["methods"][method] = row
        report["models"][mname] = mrep

    # quality: PSNR of the whole photo (patches are local) for reference
    def psnr(a, b):
        mse = float(((a - b) ** 2).mean())
        return 99.0 if mse == 0 else 10 * np.log10(1.0 / mse)

    report["psnr"] = {m: round(float(np.mean([psnr(results[m][f], q(photos[f][0])) for f in test])), 2)
                      for m in results}

    # ------------------------------------------------------------------ print
    tg = timing["generator-evasion"]
    print("\n== apply speed (edit step, faces already detected; CPU, "
          f"{args.threads} threads) ==")
    for k, v in timing.items():
        print(f"  {k:<28} {v * 1000:9.1f} ms/image  {1 / v:8.2f} images/s")
    report["speedup_generator_vs_pgd"] = {
        "evasion": round(timing["pgd-evasion"] / tg, 1),
        "evasion_batched": round(timing["pgd-evasion"] / timing["generator-evasion-batched"], 1),
        "impersonation": round(timing["pgd-impersonation"] / timing["generator-impersonation"], 1)}
    print("  speed-up generator vs PGD:", report["speedup_generator_vs_pgd"])
    for mname, mrep in report["models"].items():
        role = "held-out" if mname == args.eval else "surrogate (white-box)"
        print(f"\n== {mname} ({role}); thresholds {mrep['thresholds']} ==")
        keys = list(mrep["thresholds"])
        hdr = "  method                       " + " ".join(f"dodgePSR@{k:<9}" for k in keys) + \
              " " + " ".join(f"pairPSR@{k:<9}" for k in keys) + "  rank1  rank5  self-sim"
        print(hdr)
        for method, row in mrep["methods"].items():
            cells = " ".join(f"{row[k]['dodging_psr']:<18.3f}" for k in keys) + " " + \
                    " ".join(f"{row[k]['genuine_pair_psr']:<17.3f}" for k in keys)
            print(f"  {method:<28} {cells}  {row['rank1']:.3f}  {row['rank5']:.3f}  {row['mean_self_similarity']:.3f}")
        print("  impersonation success (share of target's other photos matched):")
        for method, row in mrep["methods"].items():
            if "impersonation_success" in row[keys[0]]:
                print(f"    {method:<26} " + "  ".join(f"@{k}: {row[k]['impersonation_success']:.3f}" for k in keys))
    print("\nPSNR (whole photo) per method:", report["psnr"])

    # ------------------------------------------------------------------ facepriv audit, if present
    try:
        from facepriv.audit import AuditConfig, run_audit  # noqa: F401
    except ImportError:
        report["facepriv_audit"] = "facepriv.audit not available in this checkout; the figures above are the audit"
        print("\nfacepriv.audit is not available in this checkout: the local computation above is the audit.")
    else:
        from PIL import Image

        for m in ("generator-evasion", "pgd-evasion"):
            d = work / "audit" / m
            (d / "protected").mkdir(parents=True, exist_ok=True)
            (d / "original").mkdir(parents=True, exist_ok=True)
            for f in test:
                name = Path(f).with_suffix(".png").name
                arr = (results[m][f].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
                Image.fromarray(arr).save(d / "protected" / name)
                Image.fromarray((q(photos[f][0]).permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(
                    d / "original" / name)
            try:
                rep = run_audit(AuditConfig(protected=d / "protected", original=d / "original", models=[args.eval],
                                            out=d / "report"))
                report.setdefault("facepriv_audit", {})[m] = rep.get("models", rep)
                print(f"\nfacepriv audit ({m}):", json.dumps(rep.get("models", rep))[:2000])
            except Exception as exc:  # noqa: BLE001 - the audit's API may differ; say so
                report.setdefault("facepriv_audit", {})[m] = f"failed: {type(exc).__name__}: {exc}"
                print(f"\nfacepriv audit ({m}) failed: {exc}")

    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
