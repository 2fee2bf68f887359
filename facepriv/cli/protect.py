"""``facepriv protect``: protect photos against face recognition (MAP or a noise baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.device import resolve_device
from ..core.faces import FacePolicy
from ..core.pipeline import SaveOptions
from . import common
from .common import handle_errors, state

HELP = """Protect photos against face recognition.

MAP (default) fine-tunes a face diffusion model once for all the photos so that it regenerates each face with a changed expression and an identity the recognisers no longer match (or match to --target), then pastes the faces back. pgd / mifgsm / tidim / tipim add bounded adversarial noise.

Examples:
  facepriv protect photos/ --out protected/ --expression happy --save-model my-map/
  facepriv protect more-photos/ --out protected2/ --model my-map/
  facepriv protect photos/ --out protected/ --target someone.jpg --expression surprise
  facepriv protect photos/ --out noisy/ --method mifgsm --epsilon 8/255
  accelerate launch -m facepriv protect photos/ --out protected/   (one shard per process)
"""

_MAP = "MAP"
_BASE = "Baselines (pgd, mifgsm, tidim, tipim)"


@handle_errors
def protect(
    inputs: common.Inputs,
    out: common.OutDir = Path("protect-out"),
    method: Annotated[str, typer.Option("--method", "-m", help="map | pgd | mifgsm | tidim | tipim")] = "map",
    target: Annotated[Path | None, typer.Option(
        "--target", help="Photo (or folder of photos) of the identity to impersonate; default: dodging.")] = None,
    surrogates: Annotated[str, typer.Option(
        "--surrogates", help="Comma list of differentiable face-recognition models to optimise against.")]
    = "dlib-resnet,facenet-casia",
    # ---- MAP
    expression: Annotated[str | None, typer.Option(
        "--expression", help="Target expression: angry, disgust, fear, happy, sad, surprise, neutral, none "
                             "[default: happy].", rich_help_panel=_MAP)] = None,
    expression_ref: Annotated[Path | None, typer.Option(
        "--expression-ref", help="Photo whose facial expression the faces should take (instead of a label).",
        rich_help_panel=_MAP)] = None,
    expression_model: Annotated[str, typer.Option(
        "--expression-model", help="Expression classifier from the model registry.", rich_help_panel=_MAP)]
    = "expr-fer7",
    score_model: Annotated[str | None, typer.Option(
        "--score-model", help="Diffusion score network: registry name, hub id or diffusers folder "
                              "[default: ddpm-celebahq-256; with --model: the one it was tuned from].",
        rich_help_panel=_MAP)] = None,
    model: Annotated[Path | None, typer.Option(
        "--model", help="Reuse a network saved with --save-model: protect without fine-tuning.",
        rich_help_panel=_MAP)] = None,
    save_model: Annotated[Path | None, typer.Option(
        "--save-model", help="Save the fine-tuned network here (diffusers layout, safetensors).",
        rich_help_panel=_MAP)] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=0, help="Fine-tuning steps [default: 30].",
                                              rich_help_panel=_MAP)] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate [default: 4e-6].", rich_help_panel=_MAP)] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help="adam | adamw | sgd [default: adam].",
                                                  rich_help_panel=_MAP)] = None,
    t0: Annotated[int | None, typer.Option("--t0", help="Inversion depth in timesteps of 1000; larger = "
                                                        "bigger edits [default: 300].", rich_help_panel=_MAP)] = None,
    n_inv: Annotated[int | None, typer.Option("--n-inv", min=1, help="DDIM inversion steps [default: 40].",
                                              rich_help_panel=_MAP)] = None,
    n_gen: Annotated[int | None, typer.Option("--n-gen", min=1, help="DDIM generation steps [default: 6].",
                                              rich_help_panel=_MAP)] = None,
    w_id: Annotated[float | None, typer.Option("--w-id", help="Weight of the identity loss [default: 1].",
                                               rich_help_panel=_MAP)] = None,
    w_exp: Annotated[float | None, typer.Option("--w-exp", help="Weight of the expression loss [default: 0.5].",
                                                rich_help_panel=_MAP)] = None,
    w_smooth: Annotated[float | None, typer.Option(
        "--w-smooth", help="Weight of the Laplacian smoothness of the edit [default: 10].", rich_help_panel=_MAP)] = None,
    w_sm: Annotated[float | None, typer.Option("--w-sm", help="Weight of the score-matching loss [default: 1].",
                                               rich_help_panel=_MAP)] = None,
    projection: Annotated[str | None, typer.Option(
        "--projection", help="Gradient projection between identity and expression: global | layerwise | none "
                             "[default: global].", rich_help_panel=_MAP)] = None,
    ema: Annotated[float | None, typer.Option(
        "--ema", help="EMA factor of the gradients before projection, 0 = off [default: 0].", rich_help_panel=_MAP)] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Faces per fine-tuning step "
                                                                               "[default: 4].", rich_help_panel=_MAP)] = None,
    batch_faces: Annotated[int | None, typer.Option(
        "--batch-faces", min=1, help="Fine-tune once per this many faces (default: once for all photos).",
        rich_help_panel=_MAP)] = None,
    train_layers: Annotated[str | None, typer.Option(
        "--train-layers", help="UNet parameters to fine-tune: all, or comma-separated patterns such as "
                               "'up_blocks.*,conv_out.*' [default: all].", rich_help_panel=_MAP)] = None,
    mixed_precision: Annotated[bool, typer.Option(
        "--mixed-precision/--full-precision", help="bf16 autocast on CUDA.", rich_help_panel=_MAP)] = True,
    feather: Annotated[float, typer.Option("--feather", help="Soft edge of the pasted faces (fraction).",
                                           rich_help_panel=_MAP)] = 0.12,
    # ---- baselines
    epsilon: Annotated[str, typer.Option("--epsilon", help="L-inf budget: 8/255, 8 (levels) or 0.03.",
                                         rich_help_panel=_BASE)] = "8/255",
    attack_steps: Annotated[int, typer.Option("--attack-steps", min=0, help="Attack iterations.",
                                              rich_help_panel=_BASE)] = 50,
    step_size: Annotated[float | None, typer.Option("--step-size", help="Per-step change (default: from the "
                                                                        "budget and steps).", rich_help_panel=_BASE)] = None,
    # ---- shared
    detector: common.Detector = "mtcnn",
    on_no_face: common.OnNoFace = "copy",
    max_faces: common.MaxFaces = None,
    min_face_size: common.MinFaceSize = 20.0,
    glob: common.Glob = None,
    resume: common.Resume = False,
    fmt: common.Format = None,
    quality: common.Quality = 95,
    keep_metadata: common.KeepMetadata = False,
    max_pixels: common.MaxPixels = 178_956_970,
):
    from ..attacks.config import parse_epsilon
    from ..protect import ProtectConfig, run_protect

    given = {"steps": steps, "lr": lr, "optimizer": optimizer, "t0": t0, "n_inv": n_inv, "n_gen": n_gen,
             "w_id": w_id, "w_exp": w_exp, "w_smooth": w_smooth, "w_sm": w_sm, "projection": projection,
             "ema": ema, "batch_size": batch_size, "expression": expression, "train_layers": train_layers,
             "seed": state.seed}
    map_options = {k: v for k, v in given.items() if v is not None}
    if not mixed_precision:
        map_options["mixed_precision"] = False
    cfg = ProtectConfig(
        method=method, surrogates=common.split_list(surrogates), target=str(target) if target else None,
        detector=detector, map=map_options, score_model=score_model, model=str(model) if model else None,
        save_model=str(save_model) if save_model else None, expression_model=expression_model,
        expression_ref=str(expression_ref) if expression_ref else None, batch_faces=batch_faces, feather=feather,
        epsilon=parse_epsilon(epsilon), attack_steps=attack_steps, step_size=step_size,
    )
    if method != "map" and common.suffix_of(fmt) not in (".png", ".tiff", ".bmp") and not state.quiet:
        common.err_console.print(
            "[yellow]note:[/yellow] lossy outputs (JPEG/WebP) re-quantise the perturbation: the saved image may "
            "differ from the input by more than --epsilon and protection weakens; `--format png` keeps it exact.")
    summary = run_protect(
        inputs, out, cfg,
        policy=FacePolicy(on_no_face=on_no_face, max_faces=max_faces, min_face_size=min_face_size),
        save=SaveOptions(quality=quality, keep_metadata=keep_metadata, max_pixels=max_pixels),
        device=resolve_device(state.device), glob=glob, resume=resume, output_suffix=common.suffix_of(fmt),
        progress=not (state.quiet or state.json), verbose=state.verbose,
    )
    common.print_batch_summary(summary, f"protect ({cfg.method})")
    if not state.json and not state.quiet:
        _print_map_details(summary.details)
    raise typer.Exit(summary.exit_code)


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
            + (f"; saved to {g['saved']}" if g.get("saved") else ""))
    if details.get("log"):
        common.out_console.print(f"fine-tuning log: {details['log']}")
