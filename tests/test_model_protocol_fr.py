"""Protocol FR models (ir152 / irse50 / mobileface) and the ArcFace ONNX wrapper.

No real research checkpoints exist on test machines, so each model is built, given a seeded
random state (BatchNorm statistics included), saved in the research layout and loaded back
through the registry; the loaded model must reproduce the in-memory module exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from facepriv.core.errors import FaceprivError
from facepriv.models import NotAvailableError, create_model, get_spec, import_model
from facepriv.models import protocol_fr as pfr
from facepriv.models.recognition import FaceRecognizer, OnnxFaceRecognizer

BUILDERS = {"ir152": pfr.build_ir152, "irse50": pfr.build_irse50, "mobileface": pfr.build_mobileface}
# IR-152 is heavy on CPU: one image is enough to prove parity and gradient flow.
BATCH = {"ir152": 1, "irse50": 2, "mobileface": 2}
# Per-layer weight gain that keeps activations bounded and inputs distinguishable at each depth.
GAIN = {"ir152": 0.6, "irse50": 0.8, "mobileface": 1.0}


def _randomize(module: nn.Module, seed: int, gain: float = 1.0) -> None:
    """Seeded weights and BN statistics of a sane scale (so every tensor affects the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if key.endswith("running_var") or (t.dim() == 1 and key.endswith(".weight")):
                t.copy_(torch.rand(t.shape, generator=g) * 0.4 + 0.8)  # BN scales/vars, PReLU
            else:
                std = gain / (t[0].numel() ** 0.5) if t.dim() > 1 else 0.1  # conv / linear / bias
                t.copy_(torch.randn(t.shape, generator=g) * std)


@dataclass
class Checkpoint:
    name: str
    module: nn.Module
    raw: Path  # plain state dict, exactly as the research repos ship it
    wrapped: Path | None  # {"state_dict": {"module.<k>": v}} (DataParallel training layout)
    x: torch.Tensor  # RGB [0, 1] faces
    expected: torch.Tensor  # the in-memory module on the protocol's [-1, 1] input


@pytest.fixture(scope="module", params=list(BUILDERS))
def ckpt(request, tmp_path_factory) -> Checkpoint:
    name = request.param
    module = BUILDERS[name]().eval()
    _randomize(module, seed=len(name), gain=GAIN[name])
    folder = tmp_path_factory.mktemp(name)
    raw, wrapped = folder / f"{name}.pth", None
    state = module.state_dict()
    torch.save(state, raw)
    if name != "ir152":  # spare writing IR-152's 283 MB twice; the unwrapping is model-agnostic
        wrapped = folder / f"{name}_wrapped.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    x = torch.rand(BATCH[name], 3, 112, 112, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = module((x - 0.5) / 0.5)
    return Checkpoint(name, module, raw, wrapped, x, expected)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FACEPRIV_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _assert_same_state(model: FaceRecognizer, reference: nn.Module) -> None:
    got, want = model.backbone.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_weights_path_matches_module_and_gradients_flow(ckpt: Checkpoint, home: Path):
    fr = create_model(ckpt.name, weights=ckpt.raw)
    assert isinstance(fr, FaceRecognizer) and not fr.training
    assert fr.input_size == (112, 112) and fr.template == "arcface-112" and fr.metric == "cosine"
    # IR-152's backward pass costs ~10 s on 2 cores; its units are the IR-SE-50 ones minus SE,
    # whose gradient flow is checked here, so it only runs forward.
    grad = ckpt.name != "ir152"
    x = ckpt.x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        emb = fr(x)
    assert emb.shape == (len(x), 512)
    torch.testing.assert_close(emb.detach(), ckpt.expected, rtol=0, atol=0)
    norms = torch.linalg.vector_norm(emb.detach(), dim=1)
    if ckpt.name == "ir152":  # face.evoLVe returns the raw BN1d output
        assert not torch.allclose(norms, torch.ones_like(norms))
    else:  # InsightFace_Pytorch L2-normalises
        torch.testing.assert_close(norms, torch.ones_like(norms))
    assert all(not p.requires_grad for p in fr.parameters())
    if grad:  # the protocol's attack loss 1 - cos(adv, target) reaches the input pixels
        target = torch.randn(1, 512, generator=torch.Generator().manual_seed(9))
        (1 - fr.score(emb, target).mean()).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_wrapped_checkpoint_through_import(ckpt: Checkpoint, home: Path):
    dst = import_model(ckpt.name, ckpt.wrapped or ckpt.raw)
    assert dst.is_file() and home in dst.parents
    fr = create_model(ckpt.name)  # found through the imports table, nothing passed
    _assert_same_state(fr, ckpt.module)
    # the plain research file imported under the research name alias works as well
    if ckpt.name == "mobileface":
        import_model("mobile_face", ckpt.raw)
        _assert_same_state(create_model("mobileface"), ckpt.module)
        torch.testing.assert_close(create_model("mobile_face")(ckpt.x), ckpt.expected, rtol=0, atol=0)


# (checkpoint, model it is wrongly given to, a key the error must name as missing / unexpected)
WRONG = {
    "irse50": ("ir152", "missing keys (body.", "unexpected keys (body.0.res_layer.5.fc1.weight"),
    "ir152": ("irse50", "missing keys (body.0.res_layer.5.fc1.weight", "unexpected keys (body."),
    "mobileface": ("ir152", "missing keys (input_layer.0.weight", "unexpected keys (conv1.conv.weight"),
}


def test_wrong_checkpoint_names_missing_and_unexpected_keys(ckpt: Checkpoint, home: Path):
    model, missing, unexpected = WRONG[ckpt.name]
    with pytest.raises(FaceprivError) as err:
        create_model(model, weights=ckpt.raw)
    msg = str(err.value)
    assert f"does not hold {model} weights" in msg and missing in msg and unexpected in msg


def test_shape_mismatch_and_non_state_dict_files(tmp_path: Path, home: Path):
    state = pfr.build_mobileface().state_dict()
    state["linear.weight"] = torch.zeros(128, 512)
    torch.save(state, bad := tmp_path / "bad.pth")
    with pytest.raises(FaceprivError, match=r"shape mismatch for linear.weight \(128, 512\)"):
        create_model("mobileface", weights=bad)
    # a whole pickled module is refused by the weights-only loader, with a fix-it hint
    torch.save(nn.Linear(2, 2), whole := tmp_path / "whole.pth")
    with pytest.raises(FaceprivError, match=r"pickled Python objects \(torch.nn.modules.linear"):
        create_model("mobileface", weights=whole)
    (junk := tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FaceprivError, match="not a readable PyTorch checkpoint"):
        create_model("mobileface", weights=junk)
    torch.save({"weights": [torch.zeros(1)]}, odd := tmp_path / "odd.pth")
    with pytest.raises(FaceprivError, match="does not hold a state dict"):
        create_model("mobileface", weights=odd)


def test_checkpoint_without_num_batches_tracked_loads(tmp_path: Path, home: Path):
    """Checkpoints saved by torch < 0.4.1 have no BN counters; they must still load."""
    module = pfr.build_mobileface().eval()
    _randomize(module, seed=3)
    state = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path := tmp_path / "old.pth")
    fr = create_model("mobileface", weights=path)
    x = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fr(x), module((x - 0.5) / 0.5), rtol=0, atol=0)


def test_missing_weights_tell_the_user_how_to_supply_them(home: Path):
    with pytest.raises(NotAvailableError) as err:
        create_model("ir152")
    msg = str(err.value)
    assert "facepriv models import ir152 PATH" in msg and "ir152.pth" in msg and "AMT-GAN" in msg


def test_specs_carry_the_protocol_metadata():
    expected = {
        "ir152": {"1e-1": 0.094632, "1e-2": 0.166788, "1e-3": 0.227922},
        "irse50": {"1e-1": 0.144840, "1e-2": 0.241045, "1e-3": 0.312703},
        "mobileface": {"1e-1": 0.183635, "1e-2": 0.301611, "1e-3": 0.380878},
    }
    for name, thresholds in expected.items():
        spec = get_spec(name)
        assert dict(spec.thresholds) == thresholds
        assert spec.threshold_source == "TIP-IM/AMT-GAN/DiffAM protocol"
        assert (spec.task, spec.metric, spec.template, spec.input_size, spec.embedding_size) == (
            "recognition", "cosine", "arcface-112", (112, 112), 512)
        assert spec.differentiable and spec.runtime == "torch"
        assert [s.kind for s in spec.sources] == ["user"]
    arc = get_spec("arcface-r100")
    assert not arc.differentiable and arc.runtime == "onnxruntime" and not arc.thresholds
    assert (arc.metric, arc.template, arc.input_size) == ("cosine", "arcface-112", (112, 112))


# --------------------------------------------------------------------------- ArcFace ONNX
def _tiny_arcface(path: Path, *, nhwc: bool = False, sub_mul: bool = False) -> dict[str, np.ndarray]:
    """Conv3x3 -> GlobalAveragePool -> Flatten -> Gemm, batch dimension dynamic."""
    rng = np.random.default_rng(0)
    w = {"conv_w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
         "conv_b": rng.normal(size=4).astype(np.float32),
         "fc_w": rng.normal(size=(8, 4)).astype(np.float32),
         "fc_b": rng.normal(size=8).astype(np.float32)}
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    nodes, x = [], "input.1"
    if nhwc:
        nodes.append(helper.make_node("Transpose", [x], ["nchw"], name="Transpose_0", perm=[0, 3, 1, 2]))
        x = "nchw"
    if sub_mul:  # MXNet-style exports normalise inside the graph and take raw pixels
        inits += [numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
                  numpy_helper.from_array(np.array(0.0078125, np.float32), "scale")]
        nodes += [helper.make_node("Sub", [x, "mean"], ["centred"], name="Sub_1"),
                  helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="Mul_2")]
        x = "scaled"
    nodes += [
        helper.make_node("Conv", [x, "conv_w", "conv_b"], ["c"], name="Conv_3", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"], name="GAP_4"),
        helper.make_node("Flatten", ["g"], ["f"], name="Flatten_5", axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["683"], name="Gemm_6", transB=1),
    ]
    shape = ["N", 112, 112, 3] if nhwc else ["N", 3, 112, 112]
    graph = helper.make_graph(
        nodes, "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w


def _numpy_tiny(blob: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """The tiny graph on an NCHW blob, in float64 numpy."""
    padded = np.pad(blob.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # N,C,H,W,3,3
    conv = np.einsum("nchwij,ocij->nohw", win, w["conv_w"]) + w["conv_b"][None, :, None, None]
    pooled = conv.mean(axis=(2, 3))
    return pooled @ w["fc_w"].T + w["fc_b"]


@pytest.mark.parametrize("nhwc,sub_mul", [(False, False), (True, False), (False, True)])
def test_arcface_onnx_matches_numpy(tmp_path: Path, home: Path, nhwc: bool, sub_mul: bool):
    w = _tiny_arcface(path := tmp_path / "glintr100.onnx", nhwc=nhwc, sub_mul=sub_mul)
    fr = create_model("arcface-r100", weights=path)
    assert isinstance(fr, OnnxFaceRecognizer) and fr.differentiable is False
    assert fr.input_name == "input.1" and fr.nhwc is nhwc
    assert (fr.input_mean, fr.input_std) == ((0.0, 1.0) if sub_mul else (127.5, 127.5))
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    emb = fr(x)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    pixels = x.double().numpy() * 255
    # facepriv feeds (p - 127.5) / 127.5; a Sub+Mul graph gets raw pixels and scales by 1/128
    want = _numpy_tiny((pixels - 127.5) * (0.0078125 if sub_mul else 1 / 127.5), w)
    np.testing.assert_allclose(emb.numpy(), want, rtol=1e-4, atol=1e-4)
    # batched == one at a time; scores use cosine
    one = torch.cat([fr(x[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(one.numpy(), emb.numpy(), rtol=1e-5, atol=1e-5)
    assert fr.score(emb, emb).sub(1).abs().max() < 1e-5


def test_arcface_onnx_import_and_bad_file(tmp_path: Path, home: Path):
    w = _tiny_arcface(path := tmp_path / "ms1mv3_arcface_r100.onnx")
    import_model("arcface-r100", path)
    fr = create_model("arcface-r100")
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(5))
    np.testing.assert_allclose(fr(x).numpy(), _numpy_tiny((x.double().numpy() - 0.5) / 0.5, w),
                               rtol=1e-4, atol=1e-4)
    (junk := tmp_path / "junk.onnx").write_bytes(b"\x00not onnx")
    with pytest.raises(FaceprivError):
        create_model("arcface-r100", weights=junk)


# --------------------------------------------------------------------------- the published layouts
# Key names and shapes of the research checkpoints, written out here from the upstream module
# definitions - face.evoLVe backbone/model_irse.py (``IR_152``) and TreB1eN InsightFace_Pytorch
# model.py (``Backbone(50, 0.6, 'ir_se')``, ``MobileFaceNet(512)``): ``bottleneck_IR(_SE)``,
# ``get_blocks``, ``Conv_block`` / ``Linear_block`` / ``Depth_Wise`` / ``Residual`` - not from
# facepriv's modules, so a drift of facepriv's module tree from the published files shows up.
def _bn(out: list, key: str, c: int) -> None:
    out += [(f"{key}.weight", (c,)), (f"{key}.bias", (c,)), (f"{key}.running_mean", (c,)),
            (f"{key}.running_var", (c,)), (f"{key}.num_batches_tracked", ())]


def _published_ir(num_units: tuple[int, int, int, int], se: bool) -> list[tuple[str, tuple]]:
    out: list[tuple[str, tuple]] = [("input_layer.0.weight", (64, 3, 3, 3))]
    _bn(out, "input_layer.1", 64)
    out.append(("input_layer.2.weight", (64,)))  # PReLU(64)
    _bn(out, "output_layer.0", 512)  # .1 Dropout and .2 Flatten hold nothing
    out += [("output_layer.3.weight", (512, 512 * 7 * 7)), ("output_layer.3.bias", (512,))]
    _bn(out, "output_layer.4", 512)
    idx = 0
    for in_c, depth, n in zip((64, 64, 128, 256), (64, 128, 256, 512), num_units):
        for i in range(n):
            cin, p = (in_c if i == 0 else depth), f"body.{idx}"
            if cin != depth:  # else MaxPool2d(1, stride): no tensors
                out.append((f"{p}.shortcut_layer.0.weight", (depth, cin, 1, 1)))
                _bn(out, f"{p}.shortcut_layer.1", depth)
            _bn(out, f"{p}.res_layer.0", cin)
            out += [(f"{p}.res_layer.1.weight", (depth, cin, 3, 3)), (f"{p}.res_layer.2.weight", (depth,)),
                    (f"{p}.res_layer.3.weight", (depth, depth, 3, 3))]
            _bn(out, f"{p}.res_layer.4", depth)
            if se:  # SEModule(depth, 16): two bias-free 1x1 convs
                out += [(f"{p}.res_layer.5.fc1.weight", (depth // 16, depth, 1, 1)),
                        (f"{p}.res_layer.5.fc2.weight", (depth, depth // 16, 1, 1))]
            idx += 1
    return out


def _published_mobileface() -> list[tuple[str, tuple]]:
    out: list[tuple[str, tuple]] = []

    def conv_block(key, cin, cout, k, groups=1, prelu=True):
        out.append((f"{key}.conv.weight", (cout, cin // groups, k, k)))
        _bn(out, f"{key}.bn", cout)
        if prelu:
            out.append((f"{key}.prelu.weight", (cout,)))

    def depth_wise(key, cin, cout, groups):
        conv_block(f"{key}.conv", cin, groups, 1)
        conv_block(f"{key}.conv_dw", groups, groups, 3, groups=groups)
        conv_block(f"{key}.project", groups, cout, 1, prelu=False)  # Linear_block

    conv_block("conv1", 3, 64, 3)
    conv_block("conv2_dw", 64, 64, 3, groups=64)
    depth_wise("conv_23", 64, 64, 128)
    for i in range(4):
        depth_wise(f"conv_3.model.{i}", 64, 64, 128)
    depth_wise("conv_34", 64, 128, 256)
    for i in range(6):
        depth_wise(f"conv_4.model.{i}", 128, 128, 256)
    depth_wise("conv_45", 128, 128, 512)
    for i in range(2):
        depth_wise(f"conv_5.model.{i}", 128, 128, 256)
    conv_block("conv_6_sep", 128, 512, 1)
    conv_block("conv_6_dw", 512, 512, 7, groups=512, prelu=False)  # Linear_block
    out.append(("linear.weight", (512, 512)))  # Linear(512, 512, bias=False)
    _bn(out, "bn", 512)
    return out


PUBLISHED = {
    "ir152": lambda: _published_ir((3, 8, 36, 3), se=False),
    "irse50": lambda: _published_ir((3, 4, 14, 3), se=True),
    "mobileface": _published_mobileface,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_modules_have_the_published_checkpoint_layout(name: str):
    want = PUBLISHED[name]()
    got = [(k, tuple(v.shape)) for k, v in BUILDERS[name]().state_dict().items()]
    assert got == want  # same names, same shapes, same order


@pytest.mark.parametrize("name", ["irse50", "mobileface"])
def test_a_file_in_the_published_layout_loads(name: str, tmp_path: Path, home: Path):
    """A checkpoint written from the published layout alone (old-style, without BN counters)
    loads strictly, every tensor in its place."""
    g = torch.Generator().manual_seed(11)
    state = {}
    for k, shape in PUBLISHED[name]():
        if shape == ():
            continue  # no num_batches_tracked, as in checkpoints saved by torch < 0.4.1
        if len(shape) == 1 and k.endswith(("running_var", "weight")):  # BN scales and variances, PReLU
            state[k] = torch.rand(shape, generator=g) * 0.4 + 0.8
        elif len(shape) == 1:
            state[k] = torch.randn(shape, generator=g) * 0.1
        else:  # keeps activations bounded through the depth
            state[k] = torch.randn(shape, generator=g) * (0.7 / (torch.Size(shape)[1:].numel() ** 0.5))
    torch.save(state, path := tmp_path / f"{name}.pth")
    fr = create_model(name, weights=path)
    loaded = fr.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with torch.no_grad():
        emb = fr(torch.rand(2, 3, 112, 112, generator=g))
    assert emb.shape == (2, 512) and torch.isfinite(emb).all()
