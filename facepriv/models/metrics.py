"""Perceptual-metric backbones: LPIPS (lpips package) and the FID Inception (pytorch-fid).

Both libraries download their backbone weights themselves on first use. facepriv instead
resolves the same official files through the registry (pinned URL + sha256 prefix, cache,
offline switch, ``models import`` for air-gapped machines) and hands them to the libraries,
so the metrics behave exactly as upstream once the weights are present:

* ``lpips-alex|vgg|squeeze``: torchvision's ImageNet backbone (download.pytorch.org) + the
  LPIPS v0.1 linear calibration layers that ship inside the ``lpips`` wheel.
* ``fid-inception``: pytorch-fid's port of the TF FID Inception (``pt_inception-2015-12-05``).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from .registry import LoadContext, ModelSpec, register
from .sources import URLFile

_TV = "https://download.pytorch.org/models/"
LPIPS_BACKBONES = {
    "alex": URLFile(_TV + "alexnet-owt-7be5be79.pth", "7be5be79", "alexnet-owt-7be5be79.pth", 244_408_911),
    "vgg": URLFile(_TV + "vgg16-397923af.pth", "397923af", "vgg16-397923af.pth", 553_433_881),
    "squeeze": URLFile(_TV + "squeezenet1_1-b8a52dc0.pth", "b8a52dc0", "squeezenet1_1-b8a52dc0.pth", 4_966_400),
}
FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


class LPIPSMetric(nn.Module):
    """LPIPS distance between image batches in [0, 1] (lower = more similar)."""

    def __init__(self, net: str, backbone_state: dict[str, torch.Tensor]):
        super().__init__()
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation chatter
            # pnet_rand: build the backbone without downloading; lpips loads its own linear layers
            self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        # lpips keeps torchvision's feature indices inside slices: sliceK.<idx>.w -> features.<idx>.w
        mapped = {}
        for key in self.model.net.state_dict():
            m = re.match(r"slice\d+\.(\d+)\.(.+)", key)
            if m is None:
                continue
            src = f"features.{m.group(1)}.{m.group(2)}"
            if src not in backbone_state:
                raise ValueError(f"LPIPS-{net}: the backbone weights have no {src}")
            mapped[key] = backbone_state[src]
        missing = set(self.model.net.state_dict()) - set(mapped)
        if missing:
            raise ValueError(f"LPIPS-{net}: backbone tensors not found: {sorted(missing)[:5]}")
        self.model.net.load_state_dict(mapped)
        self.net_name = net

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.model(a, b, normalize=True).flatten()


class FIDInception(nn.Module):
    """pytorch-fid's Inception: images in [0, 1] (any size) -> 2048-D pool3 features."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        from pytorch_fid import inception

        with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: state):
            self.model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
                                               resize_input=True, normalize_input=True, use_fid_inception=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0].flatten(1)


def _lpips_loader(net: str):
    def load(ctx: LoadContext) -> LPIPSMetric:
        return LPIPSMetric(net, _load_state(ctx.path))

    return load


for _net, _src in LPIPS_BACKBONES.items():
    register(ModelSpec(
        name=f"lpips-{_net}",
        task="metric",
        architecture=f"lpips-v0.1-{_net}",
        description=f"LPIPS v0.1 perceptual distance with the torchvision ImageNet {_net} backbone "
                    "(linear layers from the lpips package).",
        license="BSD-2-Clause (lpips); BSD-3-Clause (torchvision weights)",
        sources=(_src,),
        loader=_lpips_loader(_net),
        reference="Zhang et al., The Unreasonable Effectiveness of Deep Features as a Perceptual Metric, CVPR 2018",
    ))

register(ModelSpec(
    name="fid-inception",
    task="metric",
    architecture="inception-v3-fid",
    description="The FID Inception network (TF 2015-12-05 weights ported by pytorch-fid), 2048-D pool3 features.",
    license="Apache-2.0 (pytorch-fid)",
    sources=(URLFile(FID_URL, "6726825d", "pt_inception-2015-12-05-6726825d.pth", 95_628_359),),
    loader=lambda ctx: FIDInception(_load_state(ctx.path)),
    reference="Heusel et al., GANs Trained by a Two Time-Scale Update Rule, NeurIPS 2017",
))
