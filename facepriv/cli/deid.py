"""``facepriv deid``: de-identify every face in photos and videos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.errors import ConfigError
from . import common
from .common import handle_errors, state

HELP = """De-identify every face in photos and videos.

Methods: blur, pixelate, mask, eyebar, noise (classical); k-same-average,
k-same-select, k-same-pixelate (each face becomes the average of k other
people's faces, from --k-pool or the input photos); inpaint (a face
diffusion model repaints the inner face, guarded so the result no longer
matches); adversarial (invisible noise, each pixel changed by at most 8 of 255
levels, optimised against face-recognition models so that the face no longer
matches the person's other photos - "dodging" - or, with --target, matches
someone else). --ensemble a,b applies several in sequence. Videos (.mp4 .mov
.mkv .avi .webm .m4v) are processed frame by frame, upright, with face tracking.
Files in the input folders that are neither (GIF, text, ...) are skipped with a
warning.

Examples:
  facepriv deid photos/ --method pixelate --out anonymised/
  facepriv deid party.jpg --method k-same-select --k 5 --k-pool faces/ --out out/
  facepriv deid clip.mp4 --method blur --keep-audio --out out/
"""

_GEN = "Generative (inpaint)"
_KS = "k-Same"
_CL = "Classical"
_ADV = "Adversarial"
_VID = "Video"


@handle_errors
@common.batch_options(detector_default="yunet", detector_help=(
    "Face detector from the model registry: yunet (default here: the best recall and speed in "
    "docs/benchmarks.md), mtcnn, centerface."))
def deid(
    inputs: common.Inputs,
    out: common.OutDir = Path("deid-out"),
    method: Annotated[str | None, typer.Option(
        "--method", "-m", help="blur | pixelate | mask | eyebar | noise | k-same-average | k-same-select | "
        "k-same-pixelate | inpaint | adversarial; a comma list applies several in sequence. \\[default: blur]",
        show_default=False)] = None,
    ensemble: Annotated[str | None, typer.Option(
        "--ensemble", help="Methods applied in sequence, e.g. pixelate,noise (same as a comma list in --method).")] = None,
    strength: Annotated[float, typer.Option("--strength", callback=common.positive, help="Scales each method's main parameter (1.0 = default, defeats recognition; > 0); mask, k-same-average and k-same-select have none.")] = 1.0,
    region: Annotated[str, typer.Option("--region", help="face (ellipse) | head (larger ellipse) | box. "
                                        "Not applied by eyebar (its own shape).")] = "face",
    feather: Annotated[float | None, typer.Option("--feather", min=0.0, help="Soft edge width as a fraction of the region (0 = hard edge). \\[default: 0.1 for most methods]", show_default=False)] = None,
    color: Annotated[str, typer.Option("--color", help="Mask / eye-bar colour as R,G,B in 0-255.", rich_help_panel=_CL)] = "0,0,0",
    noise_sigma: Annotated[float, typer.Option("--noise-sigma", callback=common.positive, help="noise: standard deviation (image in [0, 1]; > 0).", rich_help_panel=_CL)] = 0.35,
    noise_grain: Annotated[float, typer.Option("--noise-grain", min=0.0, help="noise: grain size as a fraction of the face size (0 = per pixel).", rich_help_panel=_CL)] = 0.04,
    eyebar_length: Annotated[float, typer.Option("--eyebar-length", callback=common.positive, help="eyebar: length in eye distances.", rich_help_panel=_CL)] = 2.6,
    eyebar_height: Annotated[float, typer.Option("--eyebar-height", callback=common.positive, help="eyebar: height in eye distances (x --strength).", rich_help_panel=_CL)] = 2.2,
    k: Annotated[int, typer.Option("--k", min=2, help="k-same: faces (of distinct people) averaged per output face.", rich_help_panel=_KS)] = 5,
    k_pool: Annotated[Path | None, typer.Option("--k-pool", help="k-same: folder of face photos to average (identity sub-folders, or one person per face), or a pool saved with FacePool.save; default: the inputs.", rich_help_panel=_KS)] = None,
    k_model: Annotated[str, typer.Option("--k-model", help="k-same: recognition model (identity distance for k-same-select; excludes the person's own faces and groups pool faces into people); 'none': no model (k-same-average/-pixelate only; each pool face without an identity folder counts as its own person).", rich_help_panel=_KS)] = "dlib-resnet",
    k_threshold: Annotated[float | None, typer.Option("--k-threshold", help="k-same: similarity at which --k-model calls two faces the same person. \\[default: the model's own threshold]", show_default=False, rich_help_panel=_KS)] = None,
    no_color_match: Annotated[bool, typer.Option("--no-color-match", help="k-same: do not shift the average to the face's mean colour.", rich_help_panel=_KS)] = False,
    score_model: Annotated[str, typer.Option("--score-model", help="inpaint: face diffusion model (registry name, diffusers folder or hub id).", rich_help_panel=_GEN)] = "ddpm-celebahq-256",
    inpaint_steps: Annotated[int, typer.Option("--inpaint-steps", min=1, help="inpaint: diffusion steps.", rich_help_panel=_GEN)] = 100,
    jump_length: Annotated[int, typer.Option("--jump-length", min=1, help="inpaint: RePaint jump length.", rich_help_panel=_GEN)] = 10,
    jump_samples: Annotated[int, typer.Option("--jump-samples", min=1, help="inpaint: RePaint resampling count per jump.", rich_help_panel=_GEN)] = 3,
    guard_model: Annotated[str, typer.Option("--guard-model", help="inpaint: recognition model of the identity guard ('none' to disable).", rich_help_panel=_GEN)] = "dlib-resnet",
    guard_tries: Annotated[int, typer.Option("--guard-tries", min=1, help="inpaint: generations per face until the guards pass.", rich_help_panel=_GEN)] = 3,
    guard_threshold: Annotated[float | None, typer.Option("--guard-threshold", help="inpaint: similarity the new face must stay below. \\[default: the model's threshold]", show_default=False, rich_help_panel=_GEN)] = None,
    expression_guard: Annotated[bool, typer.Option("--expression-guard/--no-expression-guard", help="inpaint: keep the expression label (expr-fer7).", rich_help_panel=_GEN)] = True,
    guard_fallback: Annotated[str, typer.Option("--guard-fallback", help="inpaint: what a face gets when no generation passes the identity guard: blur | pixelate | mask (a classical method at 2x strength, masked if it still matches) | error (the file fails).", rich_help_panel=_GEN)] = "blur",
    inpaint_prompt: Annotated[str | None, typer.Option("--inpaint-prompt", help="inpaint: text prompt for Stable-Diffusion-style inpainting pipelines (ignored by RePaint). \\[default: a photo of a face]", show_default=False, rich_help_panel=_GEN)] = None,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", min=0.0, help="inpaint: how closely inpainting pipelines follow the prompt (classifier-free guidance; ignored by RePaint).", rich_help_panel=_GEN)] = 7.5,
    target: Annotated[Path | None, typer.Option("--target", help="adversarial: photo of someone else; the faces are made to match that person (impersonation). Without it the noise is for dodging: the faces stop matching the person's other photos.", rich_help_panel=_ADV)] = None,
    surrogates: Annotated[str | None, typer.Option("--surrogates", help="adversarial: surrogates, the face-recognition models the noise is optimised against (comma list). \\[default: dlib-resnet,facenet-casia]", show_default=False, rich_help_panel=_ADV)] = None,
    epsilon: Annotated[str | None, common.epsilon_option(help="adversarial: the most any pixel may change, x --strength: 8/255 = each pixel changes by at most 8 of 255 levels (invisible on most photos). Write 8/255, 8 (whole levels) or 0.03; at most 64/255. \\[default: 8/255]", rich_help_panel=_ADV)] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="adversarial: optimisation steps (more = stronger, slower). \\[default: 20]", show_default=False, rich_help_panel=_ADV)] = None,
    attack: Annotated[str | None, typer.Option("--attack", help="adversarial: pgd (plain gradient steps) | mifgsm (with momentum) | tidim (smoothed, randomly resized gradients: carries over better to models it never saw) | tipim (impersonation with a naturalness term; needs --target). \\[default: pgd]", show_default=False, rich_help_panel=_ADV)] = None,
    detect_every: Annotated[int, typer.Option("--detect-every", min=1, help="video: run the detector every N frames (tracking fills in).", rich_help_panel=_VID)] = 1,
    track_hold: Annotated[int, typer.Option("--track-hold", min=0, help="video: frames a face stays protected after (and before) its detections.", rich_help_panel=_VID)] = 10,
    keep_audio: Annotated[bool, typer.Option("--keep-audio", help="video: copy the audio track (dropped by default: voices identify too).", rich_help_panel=_VID)] = False,
    crf: Annotated[int, typer.Option("--crf", min=0, max=63, help="video: encoder quality (lower = better).", rich_help_panel=_VID)] = 18,
    *,
    batch: common.BatchOptions,
):
    from ..attacks.config import EPSILON_MAX, EPSILON_RANGE_TEXT
    from ..core.batch import unsupported_in_folders
    from ..core.batch import warn as batch_warn
    from ..core.io import IMAGE_SUFFIXES, VIDEO_SUFFIXES
    from ..deid import DeidConfig, VideoOptions, run_deid
    from ..deid.base import canonical_name
    from ..deid.pipeline import config_warnings

    if method and ensemble:
        raise ConfigError("give --method or --ensemble, not both (they mean the same)")
    methods = common.split_list(ensemble or method or "blur")
    names = {canonical_name(m) for m in methods}
    colour = common.parse_floats(color, 3, "--color")
    if not all(0 <= c <= 255 for c in colour):
        raise ConfigError(f"--color {color}: each of R,G,B must be in 0-255")
    rgb = tuple(c / 255.0 for c in colour)
    if "adversarial" in names:  # epsilon (a float from the option, or the default) x strength
        eps = 8 / 255 if epsilon is None else float(epsilon)
        if eps * strength > EPSILON_MAX * (1 + 1e-9):
            raise ConfigError(f"--epsilon {eps * 255:.3g}/255 x --strength {strength:g} = {eps * strength * 255:.3g}/255: "
                              f"{EPSILON_RANGE_TEXT}; lower one of them")
    seed = state.seed if state.seed is not None else 0
    ksame = {"k": k, "model": None if k_model.strip().lower() == "none" else k_model, "threshold": k_threshold,
             "match_color": not no_color_match}
    per_method = {
        "mask": {"color": rgb},
        "eyebar": {"color": rgb, "length": eyebar_length, "height": eyebar_height},
        "noise": {"sigma": noise_sigma, "grain": noise_grain, "seed": seed},
        "k-same-average": ksame, "k-same-select": ksame, "k-same-pixelate": ksame,
        "inpaint": {"score_model": score_model, "steps": inpaint_steps, "jump_length": jump_length,
                    "jump_n_sample": jump_samples, "guard_model": guard_model, "guard_tries": guard_tries,
                    "guard_threshold": guard_threshold, "expression_guard": expression_guard, "seed": seed,
                    "guard_fallback": guard_fallback, "guidance_scale": guidance_scale,
                    **({"prompt": inpaint_prompt} if inpaint_prompt is not None else {})},
        "adversarial": {key: val for key, val in {
            "epsilon": epsilon, "steps": steps, "attack": attack,
            "surrogates": common.split_list(surrogates) if surrogates else None,
            "target": str(target) if target else None}.items() if val is not None},
    }
    cfg = DeidConfig(methods=methods, strength=strength, region=region, feather=feather, detector=batch.detector,
                     options={n: per_method[n] for n in names if per_method.get(n)},
                     k_pool=str(k_pool) if k_pool else None,
                     video=VideoOptions(detect_every=detect_every, track_hold=track_hold, keep_audio=keep_audio, crf=crf))
    for warning in config_warnings(cfg):  # also recorded on every manifest line
        common.warn(warning)
    # deid keeps photos and videos of the input folders: say what else they hold
    for skipped in unsupported_in_folders(inputs, supported=IMAGE_SUFFIXES + VIDEO_SUFFIXES, glob=batch.glob,
                                          exclude=[out]):
        batch_warn(skipped.message())  # like every command's folder warnings (not with --quiet / --json)
    summary = run_deid(inputs, out, cfg, **batch.run_kwargs())
    common.finish_batch(summary, f"deid ({'+'.join(methods)})")
    raise typer.Exit(summary.exit_code)
