"""``facepriv protect``: protect photos against face recognition (MAP or a noise baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.device import resolve_device
from . import common
from .common import handle_errors, state

HELP = """Protect photos against face recognition.

--method auto (default) picks MAP on a CUDA machine that has the score network, else transfer, and says which and why.

transfer adds subtle noise made to fool face-recognition models the tool never saw: it is optimised against several recognisers (the "surrogates") through random re-detections, resizes, blurs and JPEG re-encodings, within a face-region quality floor (--min-psnr), and each face is then checked against a recogniser held out of the optimisation (--verify-with); the summary says whether it still matches. MAP fine-tunes a face diffusion model so that it regenerates each face with a changed expression and an identity the recognisers no longer match (or match to --target). pgd / mifgsm / tidim / tipim are the classic noise attacks (they fool the surrogates, much less other models).

Examples:
  facepriv protect photos/ --out protected/
  facepriv protect photos/ --out protected/ --person more-photos-of-me/ --min-psnr 34
  facepriv protect photos/ --out protected/ --expression happy --save-model my-map/
  facepriv protect more-photos/ --out protected2/ --model my-map/
  facepriv protect photos/ --out protected/ --target someone.jpg --expression surprise
  facepriv protect photos/ --out noisy/ --method mifgsm --epsilon 8/255
  facepriv protect photos/ --out noisy/ --method pgd --diversity-prob 0.5 --random-start --format png
  accelerate launch -m facepriv protect photos/ --out protected/   (one shard per process)
"""

_MAP = "MAP"
_BASE = "Baselines (pgd, mifgsm, tidim, tipim)"
_TR = "Transfer (the default without a GPU)"


def _base(*flags: str, **kw):
    """An option of the baselines' help panel."""
    return typer.Option(*flags, rich_help_panel=_BASE, **kw)


@handle_errors
@common.batch_options()
def protect(
    inputs: common.Inputs,
    out: common.OutDir = Path("protect-out"),
    method: Annotated[str, typer.Option("--method", "-m", help="auto | transfer | map | pgd | mifgsm | tidim | "
                                                              "tipim (auto: map on a GPU with the score network, "
                                                              "else transfer).")] = "auto",
    target: Annotated[Path | None, typer.Option(
        "--target", help="Photo (or folder of photos) of the identity to impersonate; default: dodging.")] = None,
    surrogates: Annotated[str, typer.Option(
        "--surrogates", help="Surrogates: the face-recognition models the protection is optimised against "
                             "(comma list). Default: transfer uses every offline recogniser not judging "
                             "(dlib-resnet, facenet-casia, sface); map and the baselines dlib-resnet,facenet-casia.",
        show_default=False)] = None,
    # ---- MAP
    expression: Annotated[str | None, typer.Option(
        "--expression", help="Target expression: angry, disgust, fear, happy, sad, surprise, neutral, none "
                             "(default: happy).", rich_help_panel=_MAP)] = None,
    expression_ref: Annotated[Path | None, typer.Option(
        "--expression-ref", help="Photo whose facial expression the faces should take (instead of a label).",
        rich_help_panel=_MAP)] = None,
    expression_model: Annotated[str, typer.Option(
        "--expression-model", help="Expression classifier from the model registry.", rich_help_panel=_MAP)]
    = "expr-fer7",
    score_model: Annotated[str | None, typer.Option(
        "--score-model", help="Diffusion score network: registry name, hub id or diffusers folder "
                              "(default: ddpm-celebahq-256; with --model: the one it was tuned from).",
        rich_help_panel=_MAP)] = None,
    model: Annotated[Path | None, typer.Option(
        "--model", help="Reuse a network saved with --save-model: protect without fine-tuning.",
        rich_help_panel=_MAP)] = None,
    save_model: Annotated[Path | None, typer.Option(
        "--save-model", help="Save the fine-tuned network here (diffusers layout, safetensors).",
        rich_help_panel=_MAP)] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=0, help="Fine-tuning steps (default: 30).",
                                              rich_help_panel=_MAP)] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate (default: 4e-6).", rich_help_panel=_MAP)] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help="adam | adamw | sgd (default: adam).",
                                                  rich_help_panel=_MAP)] = None,
    t0: Annotated[int | None, typer.Option("--t0", help="Inversion depth in timesteps of 1000; larger = "
                                                        "bigger edits (default: 300).", rich_help_panel=_MAP)] = None,
    n_inv: Annotated[int | None, typer.Option("--n-inv", min=1, help="DDIM inversion steps (default: 40).",
                                              rich_help_panel=_MAP)] = None,
    n_gen: Annotated[int | None, typer.Option("--n-gen", min=1, help="DDIM generation steps (default: 6).",
                                              rich_help_panel=_MAP)] = None,
    w_id: Annotated[float | None, typer.Option("--w-id", help="Weight of the identity loss (default: 1).",
                                               rich_help_panel=_MAP)] = None,
    w_exp: Annotated[float | None, typer.Option("--w-exp", help="Weight of the expression loss (default: 0.5).",
                                                rich_help_panel=_MAP)] = None,
    w_smooth: Annotated[float | None, typer.Option(
        "--w-smooth", help="Weight of the Laplacian smoothness of the edit (default: 10).", rich_help_panel=_MAP)] = None,
    w_sm: Annotated[float | None, typer.Option("--w-sm", help="Weight of the score-matching loss (default: 1).",
                                               rich_help_panel=_MAP)] = None,
    projection: Annotated[str | None, typer.Option(
        "--projection", help="Gradient projection between identity and expression: global | layerwise | none "
                             "(default: global).", rich_help_panel=_MAP)] = None,
    ema: Annotated[float | None, typer.Option(
        "--ema", help="EMA factor of the gradients before projection, 0 = off (default: 0).", rich_help_panel=_MAP)] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Faces per fine-tuning step "
                                                                               "(default: 4).", rich_help_panel=_MAP)] = None,
    batch_faces: Annotated[int | None, typer.Option(
        "--batch-faces", min=1, help="Fine-tune once per this many faces (default: once for all photos).",
        rich_help_panel=_MAP)] = None,
    train_layers: Annotated[str | None, typer.Option(
        "--train-layers", help="UNet parameters to fine-tune: all, or comma-separated patterns such as "
                               "'up_blocks.*,conv_out.*' (default: all).", rich_help_panel=_MAP)] = None,
    mixed_precision: Annotated[bool, typer.Option(
        "--mixed-precision/--full-precision", help="bf16 autocast on CUDA.", rich_help_panel=_MAP)] = True,
    feather: Annotated[float | None, typer.Option(
        "--feather", min=0.0, help="Soft edge (fraction of the face): of the pasted faces for MAP (default: 0.12), "
                                   "of the perturbed region for the baselines (default: 0.1).",
        rich_help_panel=_MAP)] = None,
    # ---- baselines
    epsilon: Annotated[str | None, common.epsilon_option(
        help="L-inf budget, the most any pixel may change: 8/255 (= 8 of 255 levels), 8 or 0.03 (default: 8/255 "
             "for the baselines; for transfer a cap of 16/255, inside --min-psnr).", rich_help_panel=_BASE)] = None,
    attack_steps: Annotated[int, typer.Option("--attack-steps", min=0, help="Attack iterations.",
                                              rich_help_panel=_BASE)] = 50,
    step_size: Annotated[float | None, typer.Option("--step-size", help="Per-step change (default: from the "
                                                                        "budget and steps).", rich_help_panel=_BASE)] = None,
    region: Annotated[str | None, _base(
        "--region", help="Pixels the noise may change: face (ellipse) | head (larger ellipse) | box (default: face).")] = None,
    random_start: Annotated[bool | None, _base(
        "--random-start/--no-random-start", help="Start from uniform noise in the budget (default: off).",
        show_default=False)] = None,
    momentum: Annotated[float | None, _base(
        "--momentum", min=0.0, help="Decay of the accumulated gradient, 0 = plain PGD (default: 0 for pgd, "
                                    "1 for mifgsm/tidim/tipim).")] = None,
    diversity_prob: Annotated[float | None, _base(
        "--diversity-prob", min=0.0, max=1.0, help="Input diversity: probability per step of a random resize and "
                                                    "affine of the input (default: 0 for pgd/mifgsm, 0.5 for tidim/tipim).")] = None,
    diversity_scale: Annotated[float | None, _base(
        "--diversity-scale", min=0.0, help="Input diversity: largest random rescale (fraction) (default: 0.1).")] = None,
    diversity_shift: Annotated[float | None, _base(
        "--diversity-shift", min=0.0, help="Input diversity: largest random shift (fraction of the face) "
                                           "(default: 0.04).")] = None,
    diversity_rotate: Annotated[float | None, _base(
        "--diversity-rotate", min=0.0, help="Input diversity: largest random rotation in degrees (default: 6).")] = None,
    ti_kernel: Annotated[int | None, _base(
        "--ti-kernel", min=0, help="Translation-invariant gradient smoothing: Gaussian kernel length in pixels of a "
                                   "100 px face, 0 = off (default: 9 for tidim, else 0).")] = None,
    early_stop: Annotated[bool | None, _base(
        "--early-stop/--no-early-stop", help="Stop a face once every surrogate is past its verification threshold "
                                             "(default: off).", show_default=False)] = None,
    early_stop_margin: Annotated[float | None, _base(
        "--early-stop-margin", help="How far past the threshold, in each model's similarity units (default: 0.05).")] = None,
    early_stop_far: Annotated[str | None, _base(
        "--early-stop-far", help="False-accept rate of the thresholds early stopping uses (default: 1e-2).")] = None,
    thresholds: Annotated[str | None, _base(
        "--thresholds", help="Verification thresholds for early stopping, e.g. 'dlib-resnet=-0.6,facenet-casia=0.45' "
                             "(default: the model's calibration).")] = None,
    push_weight: Annotated[float | None, _base(
        "--push-weight", min=0.0, help="With --target: weight of moving away from the source (default: 1 for tipim, "
                                       "else 0).")] = None,
    naturalness: Annotated[str | None, _base(
        "--naturalness", help="Naturalness penalty on the noise: hf (high-frequency energy) | mmd (default: hf).")] = None,
    naturalness_weight: Annotated[float | None, _base(
        "--naturalness-weight", min=0.0, help="Weight of the naturalness penalty (default: 0.5 for tipim, else 0).")] = None,
    # ---- transfer
    min_psnr: Annotated[float, typer.Option(
        "--min-psnr", min=20.0, max=60.0, help="Quality floor: PSNR of each protected face region against the "
                                               "original, in dB (higher = subtler, weaker).", rich_help_panel=_TR)] = 32.0,
    start_psnr: Annotated[float | None, typer.Option(
        "--start-psnr", min=20.0, max=60.0, help="Budget to start at; it is raised 2 dB at a time down to --min-psnr "
                                                 "only while a held-out model still matches the face (default: "
                                                 "36, or --min-psnr if higher).", rich_help_panel=_TR)] = None,
    verify_with: Annotated[str, typer.Option(
        "--verify-with", help="Who checks each protected face: loo (each photo holds one offline recogniser out of "
                              "the optimisation, in turn, as its judge), none (all are surrogates; no held-out "
                              "verdict), or model names (e.g. an imported arcface-r100) that judge and never "
                              "optimise.", rich_help_panel=_TR)] = "loo",
    person: Annotated[Path | None, typer.Option(
        "--person", help="Folder of other photos of the person being protected: the noise pushes the face away "
                         "from all of them, and the verdict compares with them.", rich_help_panel=_TR)] = None,
    identity_folders: Annotated[bool, typer.Option(
        "--identity-folders", help="Each input folder holds one person's photos (like --person per folder).",
        rich_help_panel=_TR)] = False,
    copies: Annotated[int | None, typer.Option(
        "--copies", min=1, help="Random views (re-detection, resize, blur, JPEG) averaged per step (default: 2).",
        rich_help_panel=_TR)] = None,
    eot: Annotated[bool, typer.Option(
        "--eot/--no-eot", help="Optimise through random re-detections, resizes, blurs and JPEG re-encodings.",
        rich_help_panel=_TR)] = True,
    transfer_steps: Annotated[int | None, typer.Option(
        "--transfer-steps", min=1, help="Steps at the first budget level (default: 16; 8 more per escalation).",
        rich_help_panel=_TR)] = None,
    # ---- shared: --detector ... --max-pixels (common.batch_options)
    *,
    batch: common.BatchOptions,
):
    from ..protect import ProtectConfig, run_protect
    from ..protect.pipeline import BASELINE_METHODS

    given = {"steps": steps, "lr": lr, "optimizer": optimizer, "t0": t0, "n_inv": n_inv, "n_gen": n_gen,
             "w_id": w_id, "w_exp": w_exp, "w_smooth": w_smooth, "w_sm": w_sm, "projection": projection,
             "ema": ema, "batch_size": batch_size, "expression": expression, "train_layers": train_layers,
             "seed": state.seed}
    map_options = {k: v for k, v in given.items() if v is not None}
    if not mixed_precision:
        map_options["mixed_precision"] = False
    # the AttackConfig options given (the baselines' own knobs: an error with another method)
    attack = {"region": region, "random_start": random_start, "momentum": momentum,
              "diversity_prob": diversity_prob, "diversity_scale": diversity_scale,
              "diversity_shift": diversity_shift, "diversity_rotate": diversity_rotate, "ti_kernel": ti_kernel,
              "early_stop": early_stop, "early_stop_margin": early_stop_margin, "far": early_stop_far,
              "thresholds": _parse_thresholds(thresholds) if thresholds else None,
              "push_weight": push_weight, "naturalness": naturalness, "naturalness_weight": naturalness_weight}
    m = method.strip().lower()
    if m in BASELINE_METHODS:  # the options shared with MAP / transfer count only for a baseline
        attack.update({"epsilon": epsilon, "steps": attack_steps, "step_size": step_size, "feather": feather})
    attack = {k: v for k, v in attack.items() if v is not None}
    transfer = _transfer_options(m, min_psnr, start_psnr, verify_with, person, identity_folders, copies, eot,
                                 transfer_steps, epsilon, feather, state.seed)
    cfg = ProtectConfig(
        method=method, surrogates=common.split_list(surrogates) if surrogates else None,
        target=str(target) if target else None, transfer=transfer,
        detector=batch.detector, map=map_options, score_model=score_model, model=str(model) if model else None,
        save_model=str(save_model) if save_model else None, expression_model=expression_model,
        expression_ref=str(expression_ref) if expression_ref else None, batch_faces=batch_faces,
        feather=0.12 if feather is None else feather, attack=attack,
    )
    if m in BASELINE_METHODS and batch.suffix not in (".png", ".tiff", ".bmp") \
            and not state.quiet:
        common.err_console.print(
            "[yellow]note:[/yellow] lossy outputs (JPEG/WebP) re-quantise the perturbation: the saved image may "
            "differ from the input by more than --epsilon and protection weakens; `--format png` keeps it exact.")
    if not (state.quiet or state.json):
        from ..protect.pipeline import resolve_method

        _, why = resolve_method(cfg, resolve_device(state.device))
        common.out_console.print(f"method: {why}", markup=False)
    summary = run_protect(inputs, out, cfg, **batch.run_kwargs())
    common.print_batch_summary(summary, f"protect ({cfg.method})")
    if not state.json and not state.quiet:
        _print_map_details(summary.details)
    raise typer.Exit(summary.exit_code)


def _transfer_options(method, min_psnr, start_psnr, verify_with, person, identity_folders, copies, eot,
                      steps, epsilon, feather, seed) -> dict:
    """The transfer method's options, only where they apply (auto / transfer)."""
    from ..core.errors import ConfigError

    if method not in ("auto", "transfer"):
        if person or identity_folders or verify_with != "loo":
            raise ConfigError("--person, --identity-folders and --verify-with apply to --method transfer")
        return {}
    attack: dict = {"min_psnr": min_psnr, "start_psnr": max(min_psnr, 36.0 if start_psnr is None else start_psnr)}
    if start_psnr is not None and start_psnr < min_psnr:
        raise ConfigError(f"--start-psnr {start_psnr} is below --min-psnr {min_psnr}")
    for key, value in (("copies", copies), ("steps", steps), ("feather", feather), ("seed", seed)):
        if value is not None:
            attack[key] = value
    if epsilon is not None:
        attack["linf_cap"] = float(epsilon)
    if not eot:
        attack["eot"] = None
    return {"verify_with": verify_with, "person": str(person) if person else None,
            "identity_folders": identity_folders, "attack": attack}


def _parse_thresholds(text: str) -> dict[str, float]:
    """``"dlib-resnet=-0.6,facenet-casia=0.45"`` -> {name: value}."""
    from ..core.errors import ConfigError

    out: dict[str, float] = {}
    for part in common.split_list(text):
        name, sep, value = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--thresholds {text!r}: use model=value pairs, e.g. dlib-resnet=-0.6") from None
    return out


def _print_map_details(details: dict) -> None:
    for g in details.get("groups", []):
        first, last, conf = g.get("first", {}), g.get("last", {}), g.get("conflicts", {})
        exp = ""
        if first.get("L_exp") is not None:
            exp = f", L_exp {first['L_exp']:.3f} -> {last['L_exp']:.3f}"
        common.out_console.print(
            f"MAP group {g['chunk']}: {g['faces']} face(s), {g['steps']} steps in {g['tune_s']:.1f} s; "
            f"L_id {first.get('L_id', float('nan')):.3f} -> {last.get('L_id', float('nan')):.3f}{exp}; "
            f"gradients conflicted in {conf.get('conflict_steps', 0)}/{conf.get('steps', 0)} steps"
            + (f"; saved to {g['saved']}" if g.get("saved") else ""), markup=False)
    if details.get("log"):
        common.out_console.print(f"fine-tuning log: {details['log']}", markup=False)
