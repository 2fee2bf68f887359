"""Local experiment: natural-mode patches decoded by the real tiny autoencoder in ../shared/models.

    python benchmarks/patch_natural_taef2.py [--steps 30] [--out /tmp/facepriv-taef2]

``../shared/models/taef2_{encoder,decoder}.pth`` are plain ``nn.Sequential`` state dicts in the
taesd repository layout (FLUX.2 latent space: 32 channels, 8x; the deepest blocks have an
extra 1x1-conv/GroupNorm "pool" branch), which diffusers' ``AutoencoderTiny`` cannot hold.
This script builds the matching Sequential itself (its own code), loads the weights
(``weights_only``), checks the reconstruction PSNR on a face, wraps the decoder in
:class:`facepriv.patch.LatentDecoder` and trains a natural-mode generator for a few steps
(evasion, dlib-resnet + facenet-casia, fixture faces). It writes PNGs of the patches and a
patched face to --out (outside the repository) and prints the numbers. The project itself
loads latent autoencoders only through the registry (hub id / diffusers folder); this is an
experiment on a real latent space where no hub can be reached. Exit 0 when the files are absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "models"


def build(latent_channels: int = 32):
    import torch
    from torch import nn

    def conv(cin, cout, **kw):
        return nn.Conv2d(cin, cout, 3, padding=1, **kw)

    class Clamp(nn.Module):
        def forward(self, x):
            return torch.tanh(x / 3) * 3

    class Block(nn.Module):
        def __init__(self, c, pool=False):
            super().__init__()
            self.conv = nn.Sequential(conv(c, c), nn.ReLU(), conv(c, c), nn.ReLU(), conv(c, c))
            self.skip = nn.Identity()
            self.fuse = nn.ReLU()
            self.pool = nn.Sequential(nn.Conv2d(c, 4 * c, 1, bias=False), nn.GroupNorm(4, 4 * c), nn.ReLU(),
                                      nn.Conv2d(4 * c, c, 1, bias=False)) if pool else None

        def forward(self, x):
            if self.pool is not None:
                x = x + self.pool(x)
            return self.fuse(self.conv(x) + self.skip(x))

    c = 64
    enc = nn.Sequential(conv(3, c), Block(c),
                        conv(c, c, stride=2, bias=False), Block(c), Block(c), Block(c),
                        conv(c, c, stride=2, bias=False), Block(c), Block(c), Block(c),
                        conv(c, c, stride=2, bias=False), Block(c, True), Block(c, True), Block(c, True),
                        conv(c, latent_channels))
    up = nn.Upsample(scale_factor=2)
    dec = nn.Sequential(Clamp(), conv(latent_channels, c), nn.ReLU(),
                        Block(c, True), Block(c, True), Block(c, True), up, conv(c, c, bias=False),
                        Block(c), Block(c), Block(c), nn.Upsample(scale_factor=2), conv(c, c, bias=False),
                        Block(c), Block(c), Block(c), nn.Upsample(scale_factor=2), conv(c, c, bias=False),
                        Block(c), conv(c, 3))
    return enc, dec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="/tmp/facepriv-taef2")
    args = ap.parse_args()
    enc_f, dec_f = MODELS / "taef2_encoder.pth", MODELS / "taef2_decoder.pth"
    if not (enc_f.is_file() and dec_f.is_file()):
        print(f"skipped: {MODELS}/taef2_*.pth not found")
        return 0
    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(2)
    torch.manual_seed(0)
    from facepriv.attacks.identity import SurrogateEnsemble
    from facepriv.core.align import align_faces, invert_affine, landmarks_tensor
    from facepriv.models import create_model
    from facepriv.patch import GeneratorConfig, LatentDecoder, PatchGenerator, PatchLossWeights
    from facepriv.patch.losses import patch_objective
    from facepriv.patch.placement import compose, photo_to_reference, place_on_canvas
    from facepriv.patch.train import context_template

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    enc, dec = build()
    enc.load_state_dict(torch.load(enc_f, map_location="cpu", weights_only=True))
    dec.load_state_dict(torch.load(dec_f, map_location="cpu", weights_only=True))
    enc.eval(), dec.eval()

    det = create_model("mtcnn")
    names = ["obama.jpg", "obama2.jpg", "biden.jpg"]
    rgbs = [np.asarray(Image.open(ROOT / "tests" / "fixtures" / n).convert("RGB")) for n in names]
    lms = [landmarks_tensor(det.detect(r)[:1]) for r in rgbs]
    xs = [torch.from_numpy(r.copy()).permute(2, 0, 1).float() / 255 for r in rgbs]
    face256 = align_faces(xs[0], lms[0], "celebahq-256").crops
    with torch.no_grad():
        rec = dec(enc(face256)).clamp(0, 1)
    mse = float(((rec - face256) ** 2).mean())
    print(f"taef2 reconstruction of an aligned 256x256 face: PSNR {10 * np.log10(1 / mse):.2f} dB "
          f"(latent {tuple(enc(face256).shape)})")

    latent = LatentDecoder(dec, latent_channels=32, factor=8, output_range="01", encoder=enc)
    gen = PatchGenerator(GeneratorConfig(natural=True, patch_size=64, region="forehead"), autoencoder=latent)
    print(f"natural-mode generator: {gen.num_parameters()} trainable parameters, latent "
          f"{gen.config.latent_channels}x{gen.config.output_resolution}x{gen.config.output_resolution}")
    sur = SurrogateEnsemble(["dlib-resnet", "facenet-casia"])
    tpl = context_template(1.5, 16)
    canv = torch.cat([align_faces(x, lm, tpl).crops for x, lm in zip(xs, lms)])
    al = torch.cat([align_faces(x, lm, "arcface-112").crops for x, lm in zip(xs, lms)])
    n = canv.shape[0]
    ctx_lms = tpl.tensor().expand(n, 5, 2)
    ref = sur.reference(canv, ctx_lms, image_index=torch.arange(n))
    region = gen.region
    mats = compose(invert_affine(photo_to_reference(ctx_lms)), region.patch_to_reference(64).expand(n, 2, 3))
    params = [p for k, p in gen.named_parameters() if not k.startswith("latent.")]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=2e-3, betas=(0.5, 0.999))
    w = PatchLossWeights(tv=0.02)
    t0 = time.perf_counter()
    hist = []
    for step in range(args.steps + 1):
        patch, z = gen(al, return_latent=True)
        patched, _ = place_on_canvas(canv, patch, region, mats)
        emb = sur.embed(patched, ctx_lms, image_index=torch.arange(n))
        terms = patch_objective(emb, ref, None, None, patch, w, mask=gen.patch_mask())
        cos = float(torch.stack([torch.nn.functional.cosine_similarity(emb[k], ref[k]) for k in emb]).mean().detach())
        hist.append(cos)
        if step == args.steps:
            break
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s: mean cosine to own identity "
          f"{hist[0]:.3f} -> {hist[-1]:.3f} (surrogates)")
    grid = torch.cat(list(patch.detach()), 2)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(out / "patches.png")
    Image.fromarray((torch.cat(list(patched.detach()), 2).permute(1, 2, 0).numpy() * 255).round()
                    .astype(np.uint8)).save(out / "patched_canvases.png")
    print(f"wrote {out / 'patches.png'} and {out / 'patched_canvases.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
