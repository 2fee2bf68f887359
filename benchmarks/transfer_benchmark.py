"""Does protection transfer to recognisers the attack never used?  LFW, held-out judges only.

    python benchmarks/transfer_benchmark.py calibrate            # FAR thresholds of every judge on LFW
    python benchmarks/transfer_benchmark.py run --config default --faces 200
    python benchmarks/transfer_benchmark.py run --config fixed32 --faces 200
    python benchmarks/transfer_benchmark.py run --config no-eot --faces 30      # an ablation
    python benchmarks/transfer_benchmark.py table                # every result so far
    python benchmarks/transfer_benchmark.py curve                # PSR vs face PSNR -> docs/img/transfer_curve.png

Protocol (docs/benchmarks.md, "Transfer"):
* data: ``../shared/data/lfw`` (or ``--lfw``); the protected photo is the first photo of N people
  (sorted names, evenly spaced) who have a second photo; that second photo is the comparison.
* judges: the three offline recognisers and the held-out ``mobileface_v2.onnx`` (never a
  surrogate; run with onnxruntime as its README says). A judge that was a surrogate *for that
  face* is never counted: leave-one-out.
* thresholds: FAR 1e-2 / 1e-3 calibrated here on LFW's 6,000 standard pairs (``calibrate``).
* dodging: the protected face, re-detected by MTCNN as an adversary would, no longer verifies
  against the person's other photo; self-verification (against its own original) is reported
  apart; also after JPEG quality 85 and after a 0.5x resize.
* quality: PSNR / SSIM on the face region (the ``face`` ellipse of the clean detection) and
  PSNR on the whole photo; seconds per face on this machine (torch threads: ``--threads``).

Skips cleanly (exit 0, one line) when the LFW folder or the held-out model is absent.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OFFLINE = ("dlib-resnet", "facenet-casia", "sface")
HELDOUT = "heldout-mobileface-v2"
FARS = ("1e-2", "1e-3")

# name -> (method, options); transfer options are TransferOptions fields, attack = TransferConfig fields
CONFIGS: dict[str, tuple[str, dict]] = {
    "default": ("transfer", {}),
    "fixed32": ("transfer", {"attack": {"start_psnr": 32.0}}),
    "all3-fixed32": ("transfer", {"verify_with": "none", "attack": {"start_psnr": 32.0}}),
    "no-eot": ("transfer", {"attack": {"start_psnr": 32.0, "eot": None}}),
    "no-hardest": ("transfer", {"attack": {"start_psnr": 32.0, "hardest": 0.0}}),
    "no-dropout": ("transfer", {"attack": {"start_psnr": 32.0, "dropout": 0.0}}),
    "no-texture": ("transfer", {"attack": {"start_psnr": 32.0, "texture": 0.0}}),
    "copies1": ("transfer", {"attack": {"start_psnr": 32.0, "copies": 1}}),
    "no-blur-jpeg": ("transfer", {"attack": {"start_psnr": 32.0, "eot": {"blur_prob": 0.0, "jpeg_prob": 0.0}}}),
    "fixed35": ("transfer", {"attack": {"start_psnr": 35.0, "min_psnr": 35.0}}),
    "fixed29": ("transfer", {"attack": {"start_psnr": 29.0, "min_psnr": 29.0}}),
    # per-person mode: --faces counts people; each has --per-person photos protected (copied to a folder of
    # their own, so the comparison photo is never among the photos the pattern and the centre use)
    "person": ("transfer", {"identity_folders": True}),
    "person-scratch": ("transfer", {}),
    "person-nopattern": ("transfer", {"identity_folders": True, "shared_pattern": False}),  # centre, no pattern
    "pgd-8": ("pgd", {"epsilon": 8 / 255, "steps": 50}),
    "tidim-8": ("tidim", {"epsilon": 8 / 255, "steps": 50}),
    "tidim-12": ("tidim", {"epsilon": 12 / 255, "steps": 50}),
}


# ----------------------------------------------------------------------------- data
def people(lfw: Path, n: int) -> list[tuple[Path, Path]]:
    """(photo to protect, other photo) of ``n`` people spread evenly over the sorted names."""
    names = sorted(p for p in (lfw / "images").iterdir() if p.is_dir())
    multi = [p for p in names if len(list(p.glob("*.jpg"))) >= 2]
    step = max(1, len(multi) // n)
    out = []
    for p in multi[::step][:n]:
        files = sorted(p.glob("*.jpg"))
        out.append((files[0], files[1]))
    return out


def person_sets(lfw: Path, n: int, k: int, cache: Path) -> list[tuple[Path, Path]]:
    """(copied photo to protect, the person's comparison photo) for ``k`` photos of ``n`` people
    who have more than ``k`` photos; the copies sit in ``cache/people/<name>/``."""
    import shutil

    names = sorted(p for p in (lfw / "images").iterdir() if p.is_dir() and len(list(p.glob("*.jpg"))) > k)
    step = max(1, len(names) // n)
    out = []
    for p in names[::step][:n]:
        files = sorted(p.glob("*.jpg"))
        folder = cache / "people" / p.name
        folder.mkdir(parents=True, exist_ok=True)
        for f in files[:k]:
            if not (folder / f.name).is_file():
                shutil.copy(f, folder / f.name)
            out.append((folder / f.name, files[k]))
    return out


def read_pairs(lfw: Path) -> list[tuple[Path, Path, bool]]:
    lines = (lfw / "pairs.txt").read_text().split("\n")[1:]
    img = lfw / "images"
    out = []
    for line in lines:
        f = line.split()
        if len(f) == 3:
            out.append((img / f[0] / f"{f[0]}_{int(f[1]):04d}.jpg", img / f[0] / f"{f[0]}_{int(f[2]):04d}.jpg", True))
        elif len(f) == 4:
            out.append((img / f[0] / f"{f[0]}_{int(f[1]):04d}.jpg", img / f[2] / f"{f[2]}_{int(f[3]):04d}.jpg", False))
    return out


# ----------------------------------------------------------------------------- judges
def heldout_judge(path: Path):
    """The held-out recogniser (112x112 ArcFace-aligned RGB, raw 0-255, cosine) through onnxruntime."""
    from facepriv.models.recognition import OnnxFaceRecognizer
    from facepriv.models.registry import ModelSpec

    spec = ModelSpec(name=HELDOUT, task="recognition", architecture="MobileFace V2", description="held-out judge",
                     license="MIT", sources=(), loader=lambda ctx: None, input_size=(112, 112),
                     template="arcface-112", embedding_size=256, metric="cosine", differentiable=False,
                     runtime="onnxruntime")
    return OnnxFaceRecognizer(spec, str(path), lambda x: x * 255.0)


def recognisers(heldout: Path) -> dict:
    """Every judge: the offline recognisers and the held-out model."""
    from facepriv.models import create_model

    return {**{n: create_model(n) for n in OFFLINE}, HELDOUT: heldout_judge(heldout)}


def similarity(metric, a, b) -> np.ndarray:
    import torch
    from facepriv.models.recognition import similarity as sim

    with torch.no_grad():
        return sim(a, b.expand_as(a), metric).cpu().numpy()


class Judges:
    def __init__(self, heldout: Path):
        self.models = recognisers(heldout)

    def embed(self, x, lm) -> dict:
        import torch
        from facepriv.core.align import align_faces

        with torch.no_grad():
            return {n: m(align_faces(x, lm, m.spec.template, size=tuple(m.spec.input_size)).crops)
                    for n, m in self.models.items()}

    def sim(self, name, a, b) -> float:
        return float(similarity(self.models[name].spec.metric or "cosine", a, b)[0])


# ----------------------------------------------------------------------------- images
def load(path: Path):
    from facepriv.core.io import load_image

    img = load_image(path)
    return img, img.to_tensor()


def largest(detector, rgb):
    faces = detector.detect(rgb)
    return max(faces, key=lambda f: f.width * f.height) if faces else None


def to_uint8(x) -> np.ndarray:
    return (x.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def half(rgb: np.ndarray) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(rgb)
    return np.asarray(im.resize((im.width // 2, im.height // 2), Image.BILINEAR))


def tensor(rgb: np.ndarray):
    import torch

    return torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)


def face_quality(x, q, face) -> dict:
    """Face-region PSNR / SSIM (the clean detection's face ellipse) and whole-photo PSNR."""
    import kornia
    from facepriv.attacks.budget import masked_psnr
    from facepriv.core.regions import region_mask

    r = region_mask(face, tuple(x.shape[-2:]), region="face", feather=0.0)
    full = torch_zeros_like_mask(x)
    full[:, r.y0:r.y1, r.x0:r.x1] = r.mask
    a, b = x[:, r.y0:r.y1, r.x0:r.x1][None], q[:, r.y0:r.y1, r.x0:r.x1][None]
    ssim_map = kornia.metrics.ssim(a, b, 7)
    m = (r.mask[None] > 0.5).expand_as(ssim_map)
    return {"face_psnr": masked_psnr(q, x, full), "photo_psnr": masked_psnr(q, x),
            "face_ssim": float(ssim_map[m].mean())}


def torch_zeros_like_mask(x):
    import torch

    return torch.zeros(1, *x.shape[-2:])


# ----------------------------------------------------------------------------- calibrate
def calibrate(args) -> dict:
    """FAR thresholds of every judge on LFW's standard pairs, through ``facepriv audit calibrate``'s
    engine (:func:`facepriv.audit.calibrate.run_calibration`, MTCNN, largest face); cached in
    ``--cache/thresholds.json``. ``--from FILE`` reads a JSON that engine already wrote."""
    out = args.cache / "thresholds.json"
    if out.is_file() and not args.force:
        return json.loads(out.read_text())
    if args.from_file is not None:
        res = json.loads(Path(args.from_file).read_text())
        res = res.get("models", res)  # the --out file of `facepriv audit calibrate` nests them
    else:
        from facepriv.audit.calibrate import CalibrationConfig, run_calibration

        models = recognisers(args.heldout)
        cfg = CalibrationConfig(pairs=args.lfw / "pairs.txt", root=args.lfw / "images", models=list(models),
                                store=False, detector="mtcnn", device="cpu")
        res = run_calibration(cfg, recognizers=models)
    keep = {m: {"thresholds": {f: r["thresholds"][f] for f in FARS},
                "tar_at_far": {f: r.get("tar_at_far", {}).get(f) for f in FARS},
                "n_genuine": r.get("n_genuine"), "n_impostor": r.get("n_impostor")}
            for m, r in res.items() if isinstance(r, dict) and "thresholds" in r}
    args.cache.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"source": "LFW pairs.txt, run_calibration (mtcnn)", "models": keep}, indent=2))
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- protect
def make_protector(config: str, device="cpu"):
    """``protect(x, faces, loaded) -> (image, surrogates of this face)`` for a named configuration."""
    from facepriv.models import create_model

    method, opts = CONFIGS[config]
    det = create_model("mtcnn")
    if method == "transfer":
        from facepriv.protect.transfer import TransferOptions, build_transfer_editor

        edit = build_transfer_editor(TransferOptions(**json.loads(json.dumps(opts))), device, det)

        def run(x, faces, loaded):
            y = edit(x, faces, loaded)
            return y, edit.last_roles[0], edit.last_result.per_face
        return run
    from facepriv.attacks import AttackConfig, AttackEditor

    edit = AttackEditor(AttackConfig(method=method, epsilon=opts["epsilon"], steps=opts["steps"]),
                        detector=det).setup(device)

    def run(x, faces, loaded):
        y = edit(x, faces, loaded)
        return y, list(edit.surrogates), edit.last_result.per_face
    return run


def evaluate_face(judges, det, surrogates, x, q, face, other_emb, self_emb) -> dict:
    """Verdicts of every non-surrogate judge on the protected photo and its re-encodings."""
    from facepriv.core.align import landmarks_tensor

    rec = face_quality(x, q, face)
    rgb = to_uint8(q)
    for variant, img in (("plain", rgb), ("jpeg85", jpeg(rgb, 85)), ("half", half(rgb))):
        found = largest(det, img)
        if found is None:
            rec[variant] = {"no_face": True}
            continue
        e = judges.embed(tensor(img), landmarks_tensor([found]))
        v = {}
        for name in judges.models:
            if name in surrogates:
                continue
            other, own = judges.sim(name, e[name], other_emb[name]), judges.sim(name, e[name], self_emb[name])
            v[name] = {"other": other, "self": own}
        rec[variant] = v
    return rec


def run(args) -> None:
    import torch
    from facepriv.core.align import landmarks_tensor
    from facepriv.core.progress import make_progress
    from facepriv.models import create_model

    torch.set_num_threads(args.threads)
    det, judges = create_model("mtcnn"), Judges(args.heldout)
    protect = make_protector(args.config)
    out = args.cache / f"run-{args.config}-{args.faces}.jsonl"
    done = {json.loads(line)["photo"] for line in out.read_text().splitlines()} if out.is_file() else set()
    with make_progress() as bar, out.open("a") as fh:
        chosen = (person_sets(args.lfw, args.faces, args.per_person, args.cache) if args.config.startswith("person")
                  else people(args.lfw, args.faces))
        todo = [p for p in chosen if str(p[0]) not in done]
        task = bar.add_task(f"protect {args.config}", total=len(todo))
        for a, b in todo:
            img_a, xa = load(a)
            img_b, xb = load(b)
            fa, fb = largest(det, img_a.rgb), largest(det, img_b.rgb)
            bar.advance(task)
            if fa is None or fb is None:
                continue
            self_emb = judges.embed(xa, landmarks_tensor([fa]))
            other_emb = judges.embed(xb, landmarks_tensor([fb]))
            t = time.perf_counter()
            q, surr, rows = protect(xa, [fa], img_a)
            dt = time.perf_counter() - t
            q = tensor(to_uint8(q))  # what a PNG output holds
            rec = evaluate_face(judges, det, surr, xa, q, fa, other_emb, self_emb)
            rec.update({"photo": str(a), "other": str(b), "seconds": dt, "surrogates": surr,
                        "clean_other": {n: judges.sim(n, self_emb[n], other_emb[n]) for n in judges.models},
                        "attack": {k: rows[0].get(k) for k in ("status", "steps", "psnr_level", "face_psnr")}})
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
    if (args.cache / "thresholds.json").is_file():
        print(table(args, [args.config]))
    else:
        print(f"records in {out}; run `calibrate`, then `table`")


# ----------------------------------------------------------------------------- report
def summarise(records: list[dict], thr: dict) -> dict:
    """Per judge: PSR at each FAR (other photo / self / JPEG 85 / 0.5x) over the faces it judged."""
    judges: dict[str, dict] = {}
    for name, m in thr["models"].items():
        rows = [r for r in records if name not in r["surrogates"]]
        if not rows:
            continue
        d = {"faces": len(rows)}
        for far in FARS:
            t = m["thresholds"][far]
            def psr(variant, key, rows=rows, t=t, name=name):
                ok = [r[variant].get("no_face") or r[variant][name][key] < t for r in rows]
                return 100.0 * float(np.mean(ok))
            d[far] = {"other": psr("plain", "other"), "self": psr("plain", "self"),
                      "jpeg85": psr("jpeg85", "other"), "half": psr("half", "other"),
                      "clean": 100.0 * float(np.mean([r["clean_other"][name] < t for r in rows]))}
        judges[name] = d
    q = {k: float(np.mean([r[k] for r in records])) for k in ("face_psnr", "photo_psnr", "face_ssim", "seconds")}
    q["face_psnr_min"] = float(min(r["face_psnr"] for r in records))
    return {"faces": len(records), "quality": q, "judges": judges}


def table(args, configs: list[str] | None = None) -> str:
    thr = calibrate(args)
    files = sorted(args.cache.glob("run-*.jsonl"))
    lines = ["| config | faces | judge | PSR 1e-2 other | self | JPEG 85 | 0.5x | PSR 1e-3 other | clean "
             "unmatched 1e-2 | face PSNR (min) | face SSIM | photo PSNR | s/face |", "|" + "---|" * 14]
    for f in files:
        name, n_set = f.stem.split("-", 1)[1].rsplit("-", 1)
        if configs and name not in configs:
            continue
        name = f"{name} ({n_set})"  # the face set: configs compare only on the same set
        recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if not recs:
            continue
        s = summarise(recs, thr)
        q = s["quality"]
        for judge, d in s["judges"].items():
            a, b = d["1e-2"], d["1e-3"]
            lines.append(f"| {name} | {d['faces']} | {judge} | {a['other']:.1f} | {a['self']:.1f} | {a['jpeg85']:.1f} "
                         f"| {a['half']:.1f} | {b['other']:.1f} | {a['clean']:.1f} | {q['face_psnr']:.1f} "
                         f"({q['face_psnr_min']:.1f}) | {q['face_ssim']:.3f} | {q['photo_psnr']:.1f} | {q['seconds']:.1f} |")
    return "\n".join(lines)


CURVE = (("fixed35", "fixed32", "fixed29"), ("pgd-8", "tidim-8"))  # the transfer floors, the L-inf baselines


def curve(args, out: Path) -> str:
    """The trade-off users choose with ``--min-psnr``: held-out PSR (other photo, FAR 1e-2) against the
    mean face PSNR, on one face set (``--faces``), beside PGD / TI-DIM at 8/255."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr = calibrate(args)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    printed = []
    for group, style in zip(CURVE, ("-o", "s")):
        for judge, colour in ((HELDOUT, "tab:blue"), ("sface", "tab:red")):
            pts = []
            for cfg in group:
                f = args.cache / f"run-{cfg}-{args.faces}.jsonl"
                recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
                s = summarise(recs, thr) if recs else {"judges": {}}
                if judge in s["judges"]:
                    d = s["judges"][judge]
                    pts.append((s["quality"]["face_psnr"], d["1e-2"]["other"], d["1e-2"]["jpeg85"], cfg, d["faces"]))
            if not pts:
                continue
            shown = "MobileFaceNet (held out)" if judge == HELDOUT else f"{judge} (left out)"
            if group is CURVE[0]:
                xs, ys, js = zip(*[(p[0], p[1], p[2]) for p in pts])
                ax.plot(xs, ys, style, color=colour, label=f"{shown}: transfer")
                ax.plot(xs, js, ":", color=colour, alpha=0.6, label=f"{shown}: transfer, after JPEG 85")
            for x, y, _, cfg, n in pts if group is CURVE[1] else ():  # n: faces judged
                ax.plot([x], [y], "s" if cfg.startswith("pgd") else "^", color=colour, mfc="none",
                        label=f"{shown}: {cfg.replace('-8', ' 8/255')} ({n} faces)")
            printed += [f"{c}: {judge} {y:.1f} % (JPEG 85 {j:.1f} %) at {x:.1f} dB, {n} faces" for x, y, j, c, n in pts]
    ax.axhline(60, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("face-region PSNR (dB, higher = less visible)")
    ax.set_ylabel("PSR at FAR 1e-2 vs other photo (%)")
    ax.set_title(f"Held-out transfer on {args.faces} LFW faces", fontsize=10)
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return "\n".join(printed + [f"wrote {out}"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("calibrate", "run", "table", "curve"))
    ap.add_argument("--config", default="default", choices=sorted(CONFIGS))
    ap.add_argument("--faces", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-person", type=int, default=6, help="person configs: photos protected per person")
    ap.add_argument("--lfw", type=Path, default=SHARED / "data" / "lfw")
    ap.add_argument("--heldout", type=Path, default=SHARED / "models" / "heldout" / "mobileface_v2.onnx")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "facepriv-bench" / "transfer")
    ap.add_argument("--force", action="store_true", help="recalibrate")
    ap.add_argument("--from", dest="from_file", type=Path, help="calibrate: read run_calibration's JSON output")
    args = ap.parse_args(argv)
    if not (args.lfw / "pairs.txt").is_file() or not args.heldout.is_file():
        print(f"skipped: needs {args.lfw}/pairs.txt and {args.heldout} (../shared)")
        return 0
    if args.what == "calibrate":
        print(json.dumps({k: v["thresholds"] | {"tar": v["tar_at_far"]} for k, v in calibrate(args)["models"].items()},
                         indent=1))
    elif args.what == "run":
        run(args)
    elif args.what == "curve":
        print(curve(args, ROOT / "docs" / "img" / "transfer_curve.png"))
    else:
        print(table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
