"""FaceNet: the pure-Python TF GraphDef reader, the graph -> InceptionResnetV1 conversion
(parity with OpenCV's own TF importer running the same graph), and the loader's sources."""

from __future__ import annotations

import re
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fixture_path
from facepriv.models import OfflineError, create_model, get_spec
from facepriv.models.convert.tf_graph import Graph, NodeDef, parse_graph_def, read_graph
from facepriv.models.facenet import (
    fixed_image_standardization,
    graph_to_state_dict,
    inception_resnet_v1,
    weights_format,
)
from facepriv.models.recognition import FaceRecognizer

VGG_URL = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt"


# --------------------------------------------------------------------------- a tiny protobuf writer
def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _field(num: int, wt: int, payload: bytes | int) -> bytes:
    key = _varint(num << 3 | wt)
    if wt == 0:
        return key + _varint(payload)  # type: ignore[arg-type]
    if wt == 2:
        return key + _varint(len(payload)) + payload  # type: ignore[arg-type]
    return key + payload  # type: ignore[operator]


def _shape(*dims: int) -> bytes:
    return b"".join(_field(2, 2, _field(1, 0, d)) for d in dims)


def _node(name: str, op: str, inputs=(), attrs: dict[str, bytes] | None = None) -> bytes:
    body = _field(1, 2, name.encode()) + _field(2, 2, op.encode())
    body += b"".join(_field(3, 2, i.encode()) for i in inputs)
    for k, v in (attrs or {}).items():
        body += _field(5, 2, _field(1, 2, k.encode()) + _field(2, 2, v))
    return _field(1, 2, body)


def _const(name: str, tensor: bytes) -> bytes:
    return _node(name, "Const", attrs={"value": _field(8, 2, tensor), "dtype": _field(6, 0, 1)})


def test_reader_decodes_every_tensor_encoding():
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 5.5
    graph_bytes = b"".join(
        [
            _const(
                "content",
                _field(1, 0, 1) + _field(2, 2, _shape(2, 3, 4)) + _field(4, 2, w.tobytes()),
            ),
            _const(
                "packed_f",
                _field(1, 0, 1)
                + _field(2, 2, _shape(3))
                + _field(5, 2, struct.pack("<3f", 1.5, -2.0, 3.25)),
            ),
            _const(
                "splat",
                _field(1, 0, 1)
                + _field(2, 2, _shape(2, 2))
                + _field(5, 5, struct.pack("<f", 0.17)),
            ),
            _const(
                "ints",
                _field(1, 0, 3)
                + _field(2, 2, _shape(3))
                + _field(7, 2, b"".join(_varint(v) for v in (3, -1, 7))),
            ),
            _const("scalar_i", _field(1, 0, 3) + _field(7, 0, -4)),
            _const(
                "half",
                _field(1, 0, 19)
                + _field(2, 2, _shape(2))
                + _field(
                    13,
                    2,
                    b"".join(
                        _varint(int(v)) for v in np.array([0.5, -2], np.float16).view(np.uint16)
                    ),
                ),
            ),
            _const(
                "i64",
                _field(1, 0, 9)
                + _field(2, 2, _shape(2))
                + _field(10, 0, 2**40)
                + _field(10, 0, -3),
            ),
            _const(
                "strs",
                _field(1, 0, 7)
                + _field(2, 2, _shape(2))
                + _field(8, 2, b"ab")
                + _field(8, 2, b"c"),
            ),
            _node(
                "x",
                "Placeholder",
                attrs={"shape": _field(7, 2, _shape(-1, 160, 160, 3)), "dtype": _field(6, 0, 1)},
            ),
            _node(
                "conv",
                "Conv2D",
                ["x:0", "content", "^splat"],
                attrs={
                    "strides": _field(
                        1, 2, _field(3, 2, b"".join(_varint(v) for v in (1, 2, 2, 1)))
                    ),
                    "padding": _field(2, 2, b"SAME"),
                    "use_cudnn_on_gpu": _field(5, 0, 1),
                    "epsilon": _field(4, 5, struct.pack("<f", 0.001)),
                    "shapes": _field(
                        1, 2, _field(7, 2, _shape(1, 2)) + _field(7, 2, _field(3, 0, 1))
                    ),
                },
            ),
            _field(4, 2, _field(1, 0, 27)),  # versions.producer
        ]
    )
    g = parse_graph_def(graph_bytes)
    assert len(g) == 10 and g.producer == 27 and "conv" in g
    c = g.constants()
    np.testing.assert_array_equal(c["content"], w)
    np.testing.assert_array_equal(c["packed_f"], [1.5, -2.0, 3.25])
    np.testing.assert_array_equal(
        c["splat"], np.full((2, 2), 0.17, np.float32)
    )  # last value repeats
    assert c["ints"].dtype == np.int32 and c["ints"].tolist() == [3, -1, 7]
    assert c["scalar_i"].shape == () and int(c["scalar_i"]) == -4
    assert c["half"].dtype == np.float16 and c["half"].tolist() == [0.5, -2.0]
    assert c["i64"].tolist() == [2**40, -3]
    assert c["strs"].tolist() == [b"ab", b"c"]
    conv = g.node("conv")
    assert conv.op == "Conv2D" and conv.data_inputs == ["x", "content"]
    assert conv.attr["strides"].i == (1, 2, 2, 1) and conv.attr["padding"] == b"SAME"
    assert conv.attr["use_cudnn_on_gpu"] is True
    assert conv.attr["epsilon"] == pytest.approx(0.001)
    assert conv.attr["shapes"].shape == ((1, 2), None)
    assert g.node("x").attr["shape"] == (-1, 160, 160, 3)
    assert [n.name for n in g.consumers()["content"]] == ["conv"]
    with pytest.raises(ValueError, match="not a Const"):
        conv.value()


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"PK\x03\x04" + bytes(60),  # a zip (torch.save) archive
        b"\x89PNG\r\n\x1a\n" + bytes(40),
        _node("a", "Const")[:-3],  # truncated
        _field(1, 2, _field(1, 2, b"no-op")),  # a node without an op
        _field(1, 2, _field(1, 3, b"")),  # a group wire type
    ],
)
def test_reader_rejects_foreign_or_corrupt_bytes(blob, tmp_path):
    with pytest.raises(ValueError, match="GraphDef"):
        parse_graph_def(blob)
    path = tmp_path / "x.pb"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=str(path)):
        read_graph(path)


def test_tensor_size_mismatch_is_an_error():
    bad = _const("w", _field(1, 0, 1) + _field(2, 2, _shape(2, 2)) + _field(4, 2, bytes(12)))
    with pytest.raises(ValueError, match="tensor_content"):
        parse_graph_def(bad).constants()


# --------------------------------------------------------------------------- torch .pt source (offline)
def _fake_release(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A facenet-pytorch release-style state dict (small random weights + a logits head)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, v in inception_resnet_v1(empty=True).state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.long)
        elif key.endswith(("running_var", "bn.weight")):
            state[key] = 0.5 + torch.rand(v.shape, generator=g)
        else:
            state[key] = 0.05 * torch.randn(v.shape, generator=g)
    state["logits.weight"] = torch.randn(11, 512, generator=g)
    state["logits.bias"] = torch.randn(11, generator=g)
    torch.save(state, path)
    return state


def test_url_source_layout_loads_and_drops_logits(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRIV_HOME", str(tmp_path / "home"))
    path = tmp_path / "20180402-114759-vggface2.pt"
    state = _fake_release(path)
    assert weights_format(path) == "torch"
    model = create_model("facenet-vggface2", weights=path)
    assert isinstance(model, FaceRecognizer) and model.name == "facenet-vggface2"
    assert "logits.weight" not in model.backbone.state_dict()
    ref = inception_resnet_v1(empty=True)
    ref.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("logits.")}, assign=True
    )
    x = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.eval()(fixed_image_standardization(x))
        got = model(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2))


def test_wrong_or_unsafe_torch_files_are_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRIV_HOME", str(tmp_path / "home"))
    partial = tmp_path / "partial.pt"
    torch.save({"conv2d_1a.conv.weight": torch.zeros(32, 3, 3, 3)}, partial)
    with pytest.raises(ValueError, match="does not fit InceptionResnetV1"):
        create_model("facenet-vggface2", weights=partial)

    class Payload:  # a pickle that would run code if loaded without weights_only
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, evil)
    with pytest.raises(ValueError, match="loaded safely"):
        create_model("facenet-vggface2", weights=evil)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(ValueError, match="GraphDef"):
        create_model("facenet-vggface2", weights=junk)


def test_offline_switch_names_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRIV_HOME", str(tmp_path))
    monkeypatch.setenv("FACEPRIV_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(OfflineError, match=re.escape(VGG_URL)):
        create_model("facenet-vggface2")
    assert time.perf_counter() - t0 < 5


def test_specs():
    casia, vgg = get_spec("facenet-casia"), get_spec("facenet-vggface2")
    for spec in (casia, vgg):
        assert (spec.task, spec.input_size, spec.template) == (
            "recognition",
            (160, 160),
            "facenet-160",
        )
        assert (spec.embedding_size, spec.metric, spec.architecture) == (
            512,
            "cosine",
            "inception-resnet-v1",
        )
    assert [s.kind for s in casia.sources] == ["pypi", "url"]
    # casia: FAR thresholds calibrated on LFW (no published ones, no default)
    assert set(casia.thresholds) == {"1e-1", "1e-2", "1e-3"} and "LFW" in casia.threshold_source
    assert 0 < casia.thresholds["1e-1"] < casia.thresholds["1e-2"] < casia.thresholds["1e-3"] < 1
    assert vgg.thresholds == {"1e-1": 0.256587, "1e-2": 0.409131, "1e-3": 0.591191}
    assert vgg.sources[0].url == VGG_URL


# --------------------------------------------------------------------------- real weights
@pytest.fixture(scope="module")
def casia():
    model = create_model("facenet-casia", progress=False)
    pb = get_spec("facenet-casia").sources[0].resolve(what="facenet-casia", progress=False)
    return model, pb


def _cv2_embed(pb: Path, x: torch.Tensor) -> np.ndarray:
    """OpenCV's TF importer on the same graph (the graph's reshapes are batch-1 only)."""
    import cv2

    net = cv2.dnn.readNetFromTensorflow(str(pb))
    out = []
    for i in range(len(x)):
        net.setInput(fixed_image_standardization(x[i : i + 1]).numpy())
        out.append(net.forward().reshape(-1))
    return np.stack(out)


def _synthetic() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 160), torch.linspace(0, 1, 160), indexing="ij")
    ramp = torch.stack([xx, yy, 1 - xx * yy])
    checker = (
        ((torch.arange(160)[:, None] // 20 + torch.arange(160)[None] // 20) % 2)
        .float()
        .expand(3, -1, -1)
    )
    return torch.stack(
        [torch.rand(3, 160, 160, generator=g), ramp, checker, torch.full((3, 160, 160), 0.5)]
    )


def _face_crops(names: list[str]) -> torch.Tensor:
    """Loose square face crops (dlib's HOG detector box, 1.3x) resized to 160x160."""
    dlib = pytest.importorskip("dlib")
    from PIL import Image

    det = dlib.get_frontal_face_detector()
    crops = []
    for name in names:
        img = Image.open(fixture_path(name)).convert("RGB")
        s = 640 / max(img.size)
        small = np.asarray(
            img.resize((round(img.width * s), round(img.height * s)), Image.BILINEAR)
        )
        r = max(det(small, 0), key=lambda r: r.area())
        cx, cy, half = (
            (r.left() + r.right()) / 2 / s,
            (r.top() + r.bottom()) / 2 / s,
            0.65 * r.width() / s,
        )
        crop = img.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
        arr = np.array(crop.resize((160, 160), Image.BILINEAR), dtype=np.float32) / 255
        crops.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(crops)


@pytest.mark.realmodels
def test_parity_with_opencv_synthetic(casia):
    model, pb = casia
    x = _synthetic()
    with torch.no_grad():
        got = model(x).numpy()
    want = _cv2_embed(pb, x)
    assert np.abs(got - want).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.realmodels
def test_parity_and_identity_on_real_faces(casia):
    model, pb = casia
    x = _face_crops(["obama.jpg", "obama2.jpg", "biden.jpg"])
    with torch.no_grad():
        got = model(x)
    assert np.abs(got.numpy() - _cv2_embed(pb, x)).max() < 1e-4
    sim = got @ got.T
    # the same person scores far above two different people
    assert sim[0, 1] > 0.5 and sim[0, 2] < 0.3 and sim[1, 2] < 0.3


@pytest.mark.realmodels
def test_gradient_flows_to_the_input(casia):
    model, _ = casia
    x = _synthetic()[1:2].clone().requires_grad_(True)
    emb = model(x)
    assert emb.shape == (1, 512)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(1))
    (emb[0] @ torch.linspace(-1, 1, 512)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())


@pytest.fixture(scope="module")
def casia_graph(casia):
    return read_graph(casia[1])


@pytest.mark.realmodels
def test_conversion_accounts_for_every_tensor(casia_graph):
    graph = casia_graph
    state = graph_to_state_dict(graph)
    assert set(state) == set(inception_resnet_v1(empty=True).state_dict())
    # the graph's own BatchNorm (bottleneck) keeps its statistics; folded ones become identity
    np.testing.assert_array_equal(
        state["last_bn.running_mean"].numpy(),
        graph.node("InceptionResnetV1/Bottleneck/BatchNorm/moving_mean").value(),
    )
    torch.testing.assert_close(state["conv2d_1a.bn.weight"], torch.ones(32))
    # a graph missing a weight, or holding one the torch model cannot, is reported loudly
    offset = "InceptionResnetV1/Conv2d_2a_3x3/Conv2D_bn_offset"
    with pytest.raises(ValueError, match="Conv2d_2a_3x3"):
        graph_to_state_dict(Graph([n for n in graph.nodes if n.name != offset]))
    stray = NodeDef("stray/weights", "Const", _attr={"value": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"1 graph constants unused \['stray/weights'\]"):
        graph_to_state_dict(Graph([*graph.nodes, stray]))


@pytest.mark.realmodels
def test_unfolded_batchnorm_maps_with_the_graphs_epsilon(casia_graph):
    """A conv followed by a real FusedBatchNorm (not folded) keeps its statistics."""
    g = np.random.default_rng(0)
    scale, mean = (
        g.uniform(0.5, 1.5, 32).astype(np.float32),
        g.normal(0, 0.1, 32).astype(np.float32),
    )
    var = g.uniform(0.5, 2, 32).astype(np.float32)
    bias_add = "InceptionResnetV1/Conv2d_1a_3x3/BatchNorm/cond/FusedBatchNorm_1"
    nodes = []
    for n in casia_graph.nodes:
        if n.name == bias_add:
            x, offset = n.data_inputs
            n = NodeDef(
                bias_add,
                "FusedBatchNorm",
                [x, "bn/gamma", offset, "bn/mean", "bn/var"],
                _attr={"epsilon": 0.01, "is_training": False},
            )
        nodes.append(n)
    nodes += [
        NodeDef(f"bn/{k}", "Const", _attr={"value": v})
        for k, v in (("gamma", scale), ("mean", mean), ("var", var))
    ]
    state = graph_to_state_dict(Graph(nodes))
    np.testing.assert_array_equal(state["conv2d_1a.bn.weight"].numpy(), scale)
    np.testing.assert_array_equal(state["conv2d_1a.bn.running_mean"].numpy(), mean)
    # torch uses eps=0.001: the variance absorbs the difference, so sqrt(var + 0.01) results
    np.testing.assert_allclose(
        state["conv2d_1a.bn.running_var"].numpy() + 0.001, var + 0.01, rtol=1e-6
    )


def test_weights_format_sniffing(tmp_path):
    pt = tmp_path / "a.pt"
    torch.save({"w": torch.zeros(1)}, pt)
    assert weights_format(pt) == "torch"
    pb = tmp_path / "a.pb"
    pb.write_bytes(_node("a", "Const"))
    assert weights_format(pb) == "graph"
    st = tmp_path / "a.safetensors"
    st.write_bytes(b"")
    assert weights_format(st) == "safetensors"
    z = tmp_path / "b.pb"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("x", "y")
    assert weights_format(z) == "torch"
    with pytest.raises(ValueError, match="folder"):
        weights_format(tmp_path)
