"""``facepriv patch train|apply``: a conditional adversarial patch generator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.device import resolve_device
from . import common
from .common import emit_json, handle_errors, out_console, state

app = typer.Typer(
    help=(
        "Adversarial patches made in one pass by a trained generator.\n\n"
        "Train once against surrogates (face-recognition models the patch is optimised against), then "
        "patch any number of photos without per-image optimisation: evasion (also called dodging: the face "
        "is no longer recognised as its owner), or impersonation (it is recognised as the --target person)."
    ),
    no_args_is_help=True,
)

TRAIN_HELP = """Train a patch generator on the faces in --data photos.

With --targets the generator learns impersonation (pull towards a target, push away from the
source) and, for a share of samples, evasion; without it, evasion only. A checkpoint
(safetensors) is written after every epoch (and every --checkpoint-every steps); --resume
continues an interrupted run, mid-epoch included.

Example: facepriv patch train --data faces/ --targets celebs/ --surrogates dlib-resnet,facenet-casia --epochs 20 --out gen/
"""

APPLY_HELP = """Paste a generated patch on every face in photos (one forward pass per batch of faces).

Photos are read --photo-batch at a time and the faces of all of them go through the generator
together (--batch-size faces per forward pass); each photo is still written, and fails, on its own.

Without --target the patch is for evasion (not being recognised as yourself); with --target
IMG it makes the faces look like the person in IMG to face recognition.

Example: facepriv patch apply photos/ --generator gen/ --out protected/
"""


@app.command("train", help=TRAIN_HELP, no_args_is_help=True)
@handle_errors
def train(
    data: Annotated[list[Path], typer.Option("--data", help="Photos (files, folders or @lists) whose faces to train on; repeatable.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Generator folder (config, weights, checkpoints, cache).")] = Path("patch-generator"),
    targets: Annotated[list[Path] | None, typer.Option("--targets", help="Target identity photos (one face each); omit for evasion only.")] = None,
    surrogates: Annotated[str, typer.Option("--surrogates", help="Surrogates: the face-recognition models the patch is optimised against (comma list; they must be differentiable).")] = "dlib-resnet,facenet-casia",
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the training faces.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Faces per training step.")] = 8,
    lr: Annotated[float, typer.Option("--lr", callback=common.positive, help="Learning rate of the optimiser (Adam; > 0).")] = 1e-3,
    region: Annotated[str, typer.Option("--region", help="forehead | eyeglass | cheek | path of a mask image (aligned ArcFace-112 frame, white = patch).")] = "forehead",
    patch_size: Annotated[int, typer.Option("--patch-size", min=8, help="Patch side in pixels (a power of two, 8 or more).")] = 64,
    base_channels: Annotated[int, typer.Option("--channels", min=4, help="Width of the generator (channels of its first layer).")] = 16,
    fusion: Annotated[str, typer.Option("--fusion", help="concat | attention: how source and target features are fused.")] = "concat",
    pull: Annotated[float, typer.Option("--pull", min=0.0, help="Weight of the pull towards the target (impersonation).")] = 1.0,
    push: Annotated[float, typer.Option("--push", min=0.0, help="Weight of the push away from the face's own identity (evasion).")] = 1.0,
    tv: Annotated[float, typer.Option("--tv", min=0.0, help="Weight of the total-variation (smoothness) term: higher = a smoother patch.")] = 0.05,
    nps: Annotated[float, typer.Option("--nps", min=0.0, help="Weight of the non-printability term: keeps colours a printer can make (0 = off).")] = 0.0,
    palette: Annotated[Path | None, typer.Option("--palette", help="Printable colours: R,G,B lines (0-255) or a swatch image.")] = None,
    evasion_prob: Annotated[float, typer.Option("--evasion-share", min=0.0, max=1.0, help="With --targets: share of samples trained for evasion (0-1).")] = 0.25,
    natural: Annotated[bool, typer.Option("--natural", help="Decode patches through a pretrained latent autoencoder.")] = False,
    autoencoder: Annotated[str, typer.Option("--autoencoder", help="Natural mode: registry name, hub id or diffusers folder.")] = "taesd",
    prior_unet: Annotated[str | None, typer.Option("--prior-unet", help="Natural mode: diffusers UNet2DModel or UNet2DConditionModel (run with a null conditioning) folder/hub id trained on the autoencoder's latents (score-distillation prior).")] = None,
    prior: Annotated[float, typer.Option("--prior", min=0.0, help="Weight of the latent prior (0 = off).")] = 0.0,
    eot: Annotated[bool, typer.Option("--eot/--no-eot", help="Random placement / colour jitter while training.")] = True,
    max_steps_per_epoch: Annotated[int | None, typer.Option("--max-steps-per-epoch", min=1, help="Cap the steps of each epoch (default: one pass over the faces).")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=0, help="Also checkpoint every N steps inside an epoch (0 = after each epoch only).")] = 0,
    detector: common.Detector = "mtcnn",
    min_face_size: common.MinFaceSize = 40.0,
    glob: common.Glob = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --out.")] = False,
):
    from ..patch import GeneratorConfig, PatchLossWeights, PatchTrainConfig, train_patch_generator
    from ..patch.placement import PlacementEOT

    cfg = PatchTrainConfig(
        data=[str(p) for p in data], out=str(out), targets=[str(p) for p in targets] if targets else None,
        surrogates=common.split_list(surrogates), epochs=epochs, batch_size=batch_size, lr=lr,
        weights=PatchLossWeights(pull=pull, push=push, tv=tv, nps=nps, prior=prior), evasion_prob=evasion_prob,
        palette=str(palette) if palette else None, prior_unet=prior_unet, eot=PlacementEOT(enabled=eot),
        generator=GeneratorConfig(patch_size=patch_size, base_channels=base_channels, fusion=fusion, region=region,
                                  natural=natural, autoencoder=autoencoder if natural else None),
        detector=detector, min_face_size=min_face_size, glob=glob, seed=state.seed if state.seed is not None else 0,
        max_steps_per_epoch=max_steps_per_epoch, checkpoint_every=checkpoint_every,
    )
    device = resolve_device(state.device)
    res = train_patch_generator(cfg, device=device, resume=resume, progress=not (state.quiet or state.json))
    if state.json:
        emit_json(res.to_json())
        return
    if state.quiet:
        return
    last = res.history[-1] if res.history else {}
    out_console.print(f"trained {res.epochs} epochs ({res.steps} steps) on {res.faces} faces"
                      f"{f' with {res.targets} targets' if res.targets else ' (evasion only)'} in {res.elapsed:.1f} s")
    if last:
        out_console.print("last epoch: " + ", ".join(f"{k} {v}" for k, v in last.items() if k not in ("epoch", "step")))
    for line in res.summary_lines():
        out_console.print(line, markup=False, highlight=False)
    out_console.print(f"generator: {res.out}  (facepriv patch apply PHOTOS --generator {res.out} --out DIR)", markup=False)


@app.command("apply", help=APPLY_HELP, no_args_is_help=True)
@handle_errors
@common.batch_options()
def apply(
    inputs: common.Inputs,
    generator: Annotated[Path, typer.Option("--generator", "-g", help="Folder written by `facepriv patch train`.")],
    out: common.OutDir = Path("patch-out"),
    target: Annotated[Path | None, typer.Option("--target", help="Photo of the identity to impersonate; omit for evasion.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Faces per generator forward pass.")] = 32,
    photo_batch: Annotated[int, typer.Option("--photo-batch", min=1, help="Photos read ahead and patched together (memory: one decoded photo each).")] = 8,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check every patched face against the generator's surrogates and print whether each still matches (one extra forward pass per model per photo).")] = True,
    *,
    batch: common.BatchOptions,
):
    from ..patch import PatchApplyConfig, run_patch_apply

    cfg = PatchApplyConfig(generator=str(generator), target=str(target) if target else None, detector=batch.detector,
                           batch_size=batch_size, photo_batch=photo_batch, verify=verify)
    if target is None:
        common.info("no --target: evasion patches (the faces stop matching their owners)")
    summary = run_patch_apply(inputs, out, cfg, **batch.run_kwargs(), warn=not state.quiet)
    common.finish_batch(summary, f"patch apply ({'impersonation' if target else 'evasion'})")
    raise typer.Exit(summary.exit_code)
