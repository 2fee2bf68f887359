"""``facepriv deid``: de-identify every face in photos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.device import resolve_device
from ..core.faces import FacePolicy
from ..core.pipeline import SaveOptions
from . import common
from .common import handle_errors, state

HELP = """De-identify every face in photos: blur, pixelate or mask each detected face.

Example: facepriv deid photos/ --method pixelate --out anonymised/
"""


@handle_errors
def deid(
    inputs: common.Inputs,
    out: common.OutDir = Path("deid-out"),
    method: Annotated[str, typer.Option("--method", "-m", help="blur | pixelate | mask; a comma list applies several in sequence.")] = "blur",
    strength: Annotated[float, typer.Option("--strength", help="Scales the method's strength (1.0 = default, defeats recognition).")] = 1.0,
    region: Annotated[str, typer.Option("--region", help="face (ellipse) | head (larger ellipse) | box.")] = "face",
    feather: Annotated[float | None, typer.Option("--feather", help="Soft edge width as a fraction of the region (default per method).")] = None,
    color: Annotated[str, typer.Option("--color", help="Mask colour as R,G,B in 0-255.")] = "0,0,0",
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
    from ..deid import DeidConfig, run_deid

    methods = common.split_list(method)
    rgb = common.parse_floats(color, 3, "--color")
    cfg = DeidConfig(methods=methods, strength=strength, region=region, feather=feather, detector=detector,
                     options={"mask": {"color": tuple(c / 255.0 for c in rgb)}})
    summary = run_deid(
        inputs, out, cfg,
        policy=FacePolicy(on_no_face=on_no_face, max_faces=max_faces, min_face_size=min_face_size),
        save=SaveOptions(quality=quality, keep_metadata=keep_metadata, max_pixels=max_pixels),
        device=resolve_device(state.device), glob=glob, resume=resume, output_suffix=common.suffix_of(fmt),
        progress=not (state.quiet or state.json), verbose=state.verbose,
    )
    common.print_batch_summary(summary, f"deid ({'+'.join(methods)})")
    raise typer.Exit(summary.exit_code)
