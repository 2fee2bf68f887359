"""MAP fine-tuning cost, and a small end-to-end experiment with a score network trained here.

    python benchmarks/protect_map.py timing [--sizes 64,256] [--steps 3] [--threads 1]
    python benchmarks/protect_map.py experiment [--minutes 20] [--out DIR]

``timing``: seconds per fine-tuning step and peak memory of one MAP step with the real
surrogates (dlib-resnet + facenet-casia) and the real expression model (expr-fer7), for
  * ``tiny-64``: a small UNet2DModel at 64 px (what the tests use, scaled up), and
  * ``ddpm-256``: google/ddpm-celebahq-256's architecture built from its config (UNet2DModel,
    block_out_channels 128,128,256,256,512,512, 2 layers per block, attention at 16x16;
    113.7 M parameters) with random weights - the real weights cannot be downloaded here,
    and the cost of a step does not depend on the weights' values.
Each configuration runs in a fresh process; CPU memory is the process's peak RSS
(``resource.getrusage``) minus the RSS before the first step, GPU memory
``torch.cuda.max_memory_allocated``. n_inv / n_gen / batch size are printed with the figures.

``experiment``: since no real face score network can be downloaded offline, a small DDPM
(64 px) is *trained here* for a few minutes on the faces of ../shared (aligned to the
CelebA-HQ template, jittered and flipped), then ``facepriv.protect.run_protect`` fine-tunes
it with MAP on held-out photos and writes protected photos, an image grid and figures:
identity similarity to the original before/after (the two surrogates and SFace, which MAP
never saw), expression probabilities, PSNR of the faces. It shows the mechanics on real
photos; the quality of a 64 px model trained for minutes is far from a 256 px CelebA-HQ one.

Both skip (exit 0) when ../shared is absent. Both print every figure of the tables in
docs/benchmarks.md (``timing``: one line and one markdown row per configuration; ``experiment``:
the pre-training, the untuned reconstruction, one line per photo and a markdown row of means),
so the printed log is the record. The raw figures also go to JSON files next to this file
(protect_map.json, protect_map_experiment.json); benchmarks/*.json is git-ignored, so those
are local working files, not something the docs can point to.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PORTRAITS = SHARED / "data" / "portraits"
PAIRS = SHARED / "data" / "deepface-pairs"
HERE = Path(__file__).resolve().parent

DDPM_CELEBAHQ_256 = dict(  # google/ddpm-celebahq-256 unet/config.json
    sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, act_fn="silu", center_input_sample=False,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1, time_embedding_type="positional",
)
TINY_64 = dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 64),
               down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8)
EXPERIMENT_UNET = dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64, 96, 128),
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                       norm_num_groups=16, attention_head_dim=32)


def _skip_without_shared() -> None:
    if not PORTRAITS.is_dir():
        print(f"skipped: {PORTRAITS} not found (the benchmark needs ../shared)")
        sys.exit(0)


def _score_model(unet_kwargs: dict, seed: int = 0):
    import torch
    from diffusers import DDIMScheduler, UNet2DModel

    from facepriv.models.diffusion import ScoreModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**unet_kwargs)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    return ScoreModel(unet, sched)


def _aligned_faces(score, photos: list[Path], detector, device="cpu"):
    import torch

    from facepriv.core.align import landmarks_tensor
    from facepriv.core.io import load_image
    from facepriv.protect.map import align_for_score_model

    crops = []
    for p in photos:
        img = load_image(p)
        faces = detector.detect(img.rgb)
        if faces:
            face = max(faces, key=lambda f: f.width * f.height)
            crops.append(align_for_score_model(score, img.to_tensor(device), landmarks_tensor([face], device)).crops)
    return torch.cat(crops)


# ----------------------------------------------------------------------------------- timing
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def time_one(name: str, steps: int, n_inv: int, n_gen: int, batch: int, device: str) -> dict:
    """Run in a child process: build, fine-tune ``steps`` steps, report per-step time and memory."""
    import resource

    import torch

    from facepriv.attacks.identity import SurrogateEnsemble
    from facepriv.models import create_model
    from facepriv.protect.map import MAPConfig, MAPTuner

    dev = torch.device(device)
    score = _score_model(DDPM_CELEBAHQ_256 if name == "ddpm-256" else TINY_64)
    detector = create_model("mtcnn")
    photos = sorted(PORTRAITS.glob("*.jpg"))[:batch]
    crops = _aligned_faces(score, photos, detector)[:batch]
    ens = SurrogateEnsemble(["dlib-resnet", "facenet-casia"], device=dev)
    expr = create_model("expr-fer7", device=dev)
    cfg = MAPConfig(steps=steps, lr=1e-5, t0=300, n_inv=n_inv, n_gen=n_gen, batch_size=batch, expression="happy")
    tuner = MAPTuner(score, ensemble=ens, expression_model=expr, config=cfg, device=dev, progress=False)
    t = time.perf_counter()
    latents = tuner.invert(crops)
    invert_s = time.perf_counter() - t
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    rss0 = _rss_mb()
    per_step = []
    for _ in range(steps):
        t = time.perf_counter()
        tuner.step(crops, latents, tuner.source_reference(crops))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        per_step.append(time.perf_counter() - t)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {
        "config": name, "device": str(dev), "threads": torch.get_num_threads(), "resolution": score.resolution,
        "unet_parameters_M": round(sum(p.numel() for p in score.unet.parameters()) / 1e6, 2),
        "faces_per_step": int(crops.shape[0]), "n_inv": n_inv, "n_gen": n_gen, "steps": steps,
        "invert_s_per_face": round(invert_s / crops.shape[0], 3),
        "first_step_s": round(per_step[0], 3),
        "s_per_step": round(sum(per_step[1:]) / max(1, len(per_step) - 1), 3) if len(per_step) > 1 else round(per_step[0], 3),
        "peak_rss_MB": round(peak_rss, 1), "rss_before_steps_MB": round(rss0, 1),
        "step_rss_increase_MB": round(peak_rss - rss0, 1),
        "L_id": [round(h["L_id"], 4) for h in tuner.history],
    }
    if dev.type == "cuda":
        row["gpu_peak_MB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        row["gpu_step_peak_above_models_MB"] = round((torch.cuda.max_memory_allocated() - base_gpu) / 2**20, 1)
        row["gpu"] = torch.cuda.get_device_name(dev)
    return row


def cmd_timing(args) -> None:
    import torch

    _skip_without_shared()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for name in args.configs.split(","):
            n_gen = args.n_gen if name != "ddpm-256" or device == "cuda" else min(args.n_gen, 2)
            n_inv = args.n_inv if name != "ddpm-256" or device == "cuda" else min(args.n_inv, 4)
            steps = args.steps if name != "ddpm-256" or device == "cuda" else min(args.steps, 2)
            batch = args.batch if name != "ddpm-256" or device == "cuda" else 1
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            code = (f"import json, torch; torch.set_num_threads({args.threads}); import sys; sys.path.insert(0, {str(HERE)!r}); "
                    f"import protect_map as b; print('ROW', json.dumps(b.time_one({name!r}, {steps}, {n_inv}, {n_gen}, "
                    f"{batch}, {device!r})))")
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("ROW ")]
            if res.returncode != 0 or not line:
                print(f"{name} on {device}: failed\n{res.stderr[-2000:]}")
                continue
            row = json.loads(line[0][4:])
            row["wall_s"] = round(time.perf_counter() - t, 1)
            row["command"] = " ".join(sys.argv)
            rows.append(row)
            mem = f"peak RSS {row['peak_rss_MB']:.0f} MB (+{row['step_rss_increase_MB']:.0f} MB during steps)"
            mem_md = f"{row['peak_rss_MB'] / 1024:.2f} GB (+{row['step_rss_increase_MB'] / 1024:.2f} GB)"
            if "gpu_peak_MB" in row:
                mem = (f"GPU peak {row['gpu_peak_MB']:.0f} MB (+{row['gpu_step_peak_above_models_MB']:.0f} MB above "
                       f"the loaded models, {row['gpu']}); {mem}")
                mem_md = (f"GPU {row['gpu_peak_MB'] / 1024:.2f} GB (+{row['gpu_step_peak_above_models_MB'] / 1024:.2f} "
                          f"GB), {row['gpu']}")
            print(f"{name:9s} {device:4s} {row['resolution']}px {row['unet_parameters_M']:.1f}M params, "
                  f"batch {row['faces_per_step']}, n_inv {n_inv}, n_gen {n_gen}, {row['threads']} thread(s), "
                  f"{steps} steps: {row['s_per_step']:.2f} s/step (first {row['first_step_s']:.2f} s), "
                  f"inversion {row['invert_s_per_face']:.2f} s/face; {mem}; wall {row['wall_s']} s")
            print(f"| {name} ({device}) | {row['unet_parameters_M']:.1f} M | {row['resolution']} | "
                  f"{row['faces_per_step']} | {n_inv} | {n_gen} | {row['s_per_step']:.3g} s | "
                  f"{row['invert_s_per_face']:.3g} s / face | {mem_md} |", flush=True)
    out = HERE / "protect_map.json"
    keep = []
    if out.is_file():  # keep the figures of configurations not measured this time
        done = {(r["config"], r["device"]) for r in rows}
        keep = [r for r in json.loads(out.read_text()).get("rows", []) if (r["config"], r["device"]) not in done]
    out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": keep + rows}, indent=2))
    print(f"wrote {out}")


# ------------------------------------------------------------------------------- experiment
def _collect_training_faces(score, detector, exclude: set[str], jitter: int, seed: int = 0):
    """Every face of ../shared (except ``exclude``), aligned at the model's resolution with
    ``jitter`` random similarity perturbations of the landmarks each (scale, shift, rotation)."""
    import math

    import torch

    from facepriv.core.align import landmarks_tensor
    from facepriv.core.io import load_image
    from facepriv.protect.map import align_for_score_model

    g = torch.Generator().manual_seed(seed)
    crops = []
    files = sorted(PAIRS.glob("*.jpg")) + sorted(PORTRAITS.glob("*.jpg"))
    for p in files:
        if p.name in exclude:
            continue
        img = load_image(p)
        x = img.to_tensor()
        for face in detector.detect(img.rgb):
            if face.size < 48:
                continue
            lm = landmarks_tensor([face])
            centre = lm.mean(1, keepdim=True)
            lms = [lm]
            for _ in range(jitter):
                s = 1 + 0.06 * (torch.rand(1, generator=g) * 2 - 1)
                a = math.radians(6) * (torch.rand(1, generator=g) * 2 - 1)
                shift = 0.04 * face.size * (torch.rand(1, 1, 2, generator=g) * 2 - 1)
                rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float32)
                lms.append((lm - centre) @ rot.T * s + centre + shift)
            lms = torch.cat(lms)
            crops.append(align_for_score_model(score, x, lms, image_index=torch.zeros(len(lms), dtype=torch.long)).crops)
    return torch.cat(crops)


def _train_ddpm(score, crops, minutes: float, batch: int, lr: float, seed: int = 0) -> dict:
    import copy

    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    unet = score.unet.train()
    ema = copy.deepcopy(unet).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    abar = score.scheduler.alphas_cumprod
    n, losses, step = crops.shape[0], [], 0
    t_end = time.perf_counter() + minutes * 60
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        idx = torch.randint(0, n, (batch,))
        x0 = crops[idx] * 2 - 1
        flip = torch.rand(batch) < 0.5
        x0[flip] = x0[flip].flip(-1)
        x0 = x0 * (1 + 0.1 * (torch.rand(batch, 1, 1, 1) - 0.5)) + 0.1 * (torch.rand(batch, 1, 1, 1) - 0.5)
        t = torch.randint(0, 1000, (batch,))
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.mul_(decay).add_(p.detach(), alpha=1 - decay)
        losses.append(loss.item())
        if step % 200 == 0:
            print(f"  pre-training step {step}: loss {sum(losses[-200:]) / 200:.4f} "
                  f"({(time.perf_counter() - t0) / step:.2f} s/step)", flush=True)
    score.unet = ema
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "final_loss": round(sum(losses[-100:]) / min(100, len(losses)), 4)}


def _psnr(a, b) -> float:
    import math

    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def cmd_experiment(args) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from facepriv.core.align import landmarks_tensor
    from facepriv.core.io import load_image
    from facepriv.models import create_model
    from facepriv.models.recognition import embed_faces, similarity
    from facepriv.protect import ProtectConfig, run_protect
    from facepriv.protect.map import align_for_score_model, ddim_reconstruct

    _skip_without_shared()
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    detector = create_model("mtcnn")
    held_out = {"obama.jpg", "biden.jpg", "img2.jpg", "img22.jpg", "img40.jpg"}
    photos_dir = out / "photos"
    photos_dir.mkdir(exist_ok=True)
    srcs = []
    for name in sorted(held_out):
        p = PORTRAITS / name if (PORTRAITS / name).exists() else PAIRS / name
        if p.exists():
            dst = photos_dir / name.replace(".jpg", ".png")
            Image.open(p).convert("RGB").save(dst)
            srcs.append(dst)
    model_dir = out / "pretrained-ddpm-64"
    if not (model_dir / "unet" / "config.json").exists() or args.retrain:
        score = _score_model(EXPERIMENT_UNET)
        t = time.perf_counter()
        crops = _collect_training_faces(score, detector, held_out, jitter=args.jitter)
        print(f"training faces: {crops.shape[0]} crops ({time.perf_counter() - t:.0f} s); pre-training "
              f"{sum(p.numel() for p in score.unet.parameters()) / 1e6:.1f} M-parameter UNet for {args.minutes} min")
        info = _train_ddpm(score, crops, args.minutes, args.train_batch, args.train_lr)
        score.save_pretrained(model_dir)
        (model_dir / "training.json").write_text(json.dumps({**info, "crops": int(crops.shape[0])}))
    info = json.loads((model_dir / "training.json").read_text())
    print(f"pre-trained DDPM: {info}")

    # 1. untuned DDIM inversion + regeneration of the held-out faces
    from facepriv.models.diffusion import load_score_model

    score = load_score_model(model_dir)
    test_crops = _aligned_faces(score, srcs, detector)
    with torch.no_grad():
        rec = (ddim_reconstruct(score, test_crops * 2 - 1, score.scheduler, args.t0, args.n_inv, args.n_gen) + 1) / 2
    rec_psnr = _psnr(rec.clamp(0, 1), test_crops)
    print(f"untuned DDIM inversion+generation (t0 {args.t0}, n_inv {args.n_inv}, n_gen {args.n_gen}) of "
          f"{len(srcs)} held-out faces: PSNR {rec_psnr:.1f} dB")

    # 2. MAP through the real pipeline
    protected = out / "protected"
    cfg = ProtectConfig(score_model=str(model_dir), save_model=str(out / "map-model"),
                        map={"steps": args.steps, "lr": args.lr, "t0": args.t0, "n_inv": args.n_inv,
                             "n_gen": args.n_gen, "batch_size": args.batch, "expression": args.expression,
                             "w_exp": args.w_exp, "w_smooth": args.w_smooth, "w_sm": args.w_sm,
                             "projection": args.projection})
    t = time.perf_counter()
    summary = run_protect([photos_dir], protected, cfg, progress=True)
    tune_s = time.perf_counter() - t
    group = summary.details["groups"][0]
    print(f"MAP: {group['faces']} faces, {group['steps']} steps in {tune_s:.0f} s; first {group['first']} "
          f"-> last {group['last']}; conflicts {group['conflicts']}")

    # 3. evaluate on the written photos (what an attacker would see)
    models = {n: create_model(n) for n in ("dlib-resnet", "facenet-casia", "sface")}
    expr = create_model("expr-fer7")
    rows = []
    grid = []
    for src in srcs:
        a, b = load_image(src), load_image(protected / src.name)
        faces = detector.detect(a.rgb)
        face = max(faces, key=lambda f: f.width * f.height)
        lm = landmarks_tensor([face])
        xa, xb = a.to_tensor(), b.to_tensor()
        row = {"photo": src.name}
        with torch.no_grad():
            for n, m in models.items():
                row[f"sim_{n}"] = round(float(similarity(embed_faces(m, xa, lm), embed_faces(m, xb, lm), m.spec.metric)), 4)
            ca = align_for_score_model(score, xa, lm).crops
            cb = align_for_score_model(score, xb, lm).crops
            from facepriv.protect.map.losses import expression_inputs

            pa = expr.probs(expression_inputs(expr, align_faces_256(xa, lm), "celebahq-256"))[0]
            pb = expr.probs(expression_inputs(expr, align_faces_256(xb, lm), "celebahq-256"))[0]
        row["expr_before"] = {lbl: round(float(v), 3) for lbl, v in zip(expr.labels, pa)}
        row["expr_after"] = {lbl: round(float(v), 3) for lbl, v in zip(expr.labels, pb)}
        row["face_psnr_db"] = round(_psnr(cb, ca), 2)
        row["photo_psnr_db"] = round(_psnr(xb, xa), 2)
        rows.append(row)
        grid.append((align_faces_256(xa, lm)[0], align_faces_256(xb, lm)[0]))
        print(f"  {src.name}: similarity to the original " +
              ", ".join(f"{n} {row[f'sim_{n}']:.3f}" for n in models) +
              f"; P({args.expression}) {row['expr_before'].get(args.expression, 0):.2f} -> "
              f"{row['expr_after'].get(args.expression, 0):.2f}; face PSNR {row['face_psnr_db']:.1f} dB")
    # image grid: original | protected | |difference| x 4, aligned at 256 px for viewing
    tiles = []
    for ca, cb in grid:
        diff = ((cb - ca).abs() * 4).clamp(0, 1)
        tiles.append(torch.cat([ca, cb, diff], 2))
    img = torch.cat(tiles, 1).permute(1, 2, 0).numpy()
    Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(out / "grid.png")
    thresholds = {"dlib-resnet": -0.6, "sface": 0.363}
    _print_experiment_summary(args, info, rec_psnr, group, rows, thresholds, models)
    result = {
        "command": " ".join(sys.argv), "pretraining": info, "untuned_reconstruction_psnr_db": round(rec_psnr, 2),
        "map": {k: group[k] for k in ("faces", "steps", "first", "last", "conflicts", "seconds_per_step")},
        "map_settings": summary.details["map"], "map_wall_s": round(tune_s, 1), "photos": rows,
        "still_verified": {n: sum(r[f"sim_{n}"] >= t for r in rows) for n, t in thresholds.items()},
        "outputs": str(out),
    }
    res_file = HERE / "protect_map_experiment.json"
    runs = json.loads(res_file.read_text()).get("runs", {}) if res_file.is_file() else {}
    runs[" ".join(sys.argv[1:])] = result  # one entry per setting tried
    res_file.write_text(json.dumps({"runs": runs}, indent=2))
    print(f"still verified as the same person (of {len(rows)}): {result['still_verified']} "
          f"(dlib distance 0.6, SFace cosine 0.363)")
    print(f"wrote {HERE / 'protect_map_experiment.json'}, {out / 'grid.png'}, protected photos in {protected}")


def _print_experiment_summary(args, pretraining: dict, rec_psnr: float, group: dict, rows: list[dict],
                              thresholds: dict, models) -> None:
    """Everything the experiment table of docs/benchmarks.md shows, as text and a markdown row."""
    def mean(key):
        vals = [r[key] for r in rows]
        return sum(vals) / len(vals) if vals else float("nan")

    def arrow(key):
        a, b = (group.get("first") or {}).get(key), (group.get("last") or {}).get(key)
        return "-" if a is None or b is None else f"{a:.3f} → {b:.3f}"

    conf = group.get("conflicts") or {}
    steps = group.get("steps", 0)
    conflicts = (f"{conf.get('conflict_steps', 0)}/{conf.get('steps', 0)} steps, mean cos "
                 f"{conf.get('mean_cosine', float('nan')):.2f}, removed {conf.get('mean_removed_fraction', 0):.0%}"
                 if steps else "-")
    sps = f"{group['seconds_per_step']:.1f}" if steps and group.get("seconds_per_step") is not None else "-"

    def sim(n):
        s = f"{mean(f'sim_{n}'):.3f}"
        if n in thresholds:
            kept = sum(r[f"sim_{n}"] >= thresholds[n] for r in rows)
            s += f" ({kept}/{len(rows)})"
        return s

    print("\n== summary (what docs/benchmarks.md records) ==")
    print(f"pre-training: {pretraining.get('crops')} crops, {pretraining.get('steps')} steps in "
          f"{pretraining.get('seconds')} s, final denoising loss {pretraining.get('final_loss')}")
    print(f"untuned DDIM inversion + regeneration: {rec_psnr:.1f} dB (t0 {args.t0}, n_inv {args.n_inv}, "
          f"n_gen {args.n_gen})")
    print(f"MAP: {group.get('faces')} faces, {steps} steps, lr {args.lr}, w_smooth {args.w_smooth}, "
          f"w_exp {args.w_exp}, w_sm {args.w_sm}, projection {args.projection}, {args.batch} faces/step, "
          f"{args.threads} thread(s)")
    print(f"P({args.expression}) before -> after: " + ", ".join(
        f"{r['photo']} {r['expr_before'].get(args.expression, 0):.2f} -> {r['expr_after'].get(args.expression, 0):.2f}"
        for r in rows))
    print("| run | L_id first → last | L_exp first → last | grad. conflicts | s / step | "
          + " | ".join(f"{n} sim." + (f" (verified, thr {thresholds[n]})" if n in thresholds else "") for n in models)
          + " | face PSNR | photo PSNR |")
    print(f"| steps {steps}, lr {args.lr}, w_smooth {args.w_smooth} | {arrow('L_id')} | {arrow('L_exp')} | "
          f"{conflicts} | {sps} | " + " | ".join(sim(n) for n in models)
          + f" | {mean('face_psnr_db'):.1f} dB | {mean('photo_psnr_db'):.1f} dB |", flush=True)


def align_faces_256(x, lm):
    from facepriv.core.align import align_faces

    return align_faces(x, lm, "celebahq-256").crops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    t = sub.add_parser("timing")
    t.add_argument("--configs", default="tiny-64,ddpm-256")
    t.add_argument("--steps", type=int, default=3)
    t.add_argument("--n-inv", type=int, default=20)
    t.add_argument("--n-gen", type=int, default=6)
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("experiment")
    e.add_argument("--minutes", type=float, default=20.0)
    e.add_argument("--retrain", action="store_true")
    e.add_argument("--jitter", type=int, default=12)
    e.add_argument("--train-batch", type=int, default=8)
    e.add_argument("--train-lr", type=float, default=5e-4)
    e.add_argument("--steps", type=int, default=30)
    e.add_argument("--lr", type=float, default=1e-4)
    e.add_argument("--t0", type=int, default=300)
    e.add_argument("--n-inv", type=int, default=30)
    e.add_argument("--n-gen", type=int, default=4)
    e.add_argument("--batch", type=int, default=6)
    e.add_argument("--expression", default="happy")
    e.add_argument("--w-exp", type=float, default=0.5)
    e.add_argument("--w-smooth", type=float, default=10.0)
    e.add_argument("--w-sm", type=float, default=1.0)
    e.add_argument("--projection", default="global")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--out", default="/tmp/facepriv-map-experiment")
    args = ap.parse_args()
    if args.cmd == "experiment":
        cmd_experiment(args)
    else:
        if args.cmd is None:
            args = ap.parse_args(["timing"])
        cmd_timing(args)


if __name__ == "__main__":
    main()
