"""dlib's face-recognition ResNet: the .dat parser, the torch port, parity with dlib itself."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fixture_path
from facepriv.models import create_model, get_spec
from facepriv.models.convert import dlib_dat
from facepriv.models.convert.dlib_dat import DlibFormatError, DlibReader, parse_network
from facepriv.models.dlib_resnet import DlibResNet, dlib_add, preprocess
from facepriv.models.registry import resolve_weights



# --------------------------------------------------------------------------- helpers
def _enc_int(v: int) -> bytes:
    """dlib's integer encoding (control byte: 0x80 sign, low nibble byte count)."""
    mag = abs(v)
    raw = mag.to_bytes(max(1, (mag.bit_length() + 7) // 8), "little")
    return bytes([len(raw) | (0x80 if v < 0 else 0)]) + raw


def _to_unit(chips: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(chips)).permute(0, 3, 1, 2).float() / 255.0


def _random_chips(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (n, 150, 150, 3), dtype=np.uint8)
    # plus a smooth synthetic "image": gradients and a bright ellipse
    yy, xx = np.mgrid[0:150, 0:150]
    blob = ((xx - 75) ** 2 / 45**2 + (yy - 70) ** 2 / 60**2 < 1) * 120
    smooth = np.stack([xx * 1.2, yy * 1.5, 200 - xx], -1) + blob[..., None]
    return np.concatenate([noise, np.clip(smooth, 0, 255).astype(np.uint8)[None]])


# --------------------------------------------------------------------------- no weights needed
def test_reader_primitives():
    data = b"".join([
        _enc_int(0), _enc_int(1), _enc_int(-5), _enc_int(300), _enc_int(2**40),
        _enc_int(10066330), _enc_int(-24),  # float 0.6 as dlib writes it
        _enc_int(0), _enc_int(32000),  # +inf
        _enc_int(5), b"relu_", b"1", b"0",
    ])
    r = DlibReader(data)
    assert [r.int() for _ in range(5)] == [0, 1, -5, 300, 2**40]
    assert r.float() == pytest.approx(0.6, abs=1e-7)
    assert r.float() == math.inf
    assert r.string() == "relu_"
    assert (r.bool(), r.bool()) == (True, False)
    assert r.remaining == 0
    with pytest.raises(DlibFormatError, match="truncated"):
        r.int()


@pytest.mark.parametrize("data", [
    b"", b"\x01", b"\x89PNG\r\n\x1a\n" + bytes(64), bytes(100), b"\xff" * 50,
    np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    _enc_int(1) + _enc_int(13) + b"loss_metric_2",  # stops right after the loss name
    _enc_int(1) + _enc_int(5) + b"relu_",  # not a loss layer
])
def test_foreign_or_truncated_bytes_raise_value_error(data):
    with pytest.raises(ValueError, match="dlib"):
        parse_network(data)


def test_dlib_add_zero_pads_channels_and_space():
    a = torch.arange(1 * 2 * 3 * 3, dtype=torch.float32).view(1, 2, 3, 3)
    b = torch.ones(1, 1, 4, 4)
    out = dlib_add(a, b)
    assert out.shape == (1, 2, 4, 4)
    expected = torch.zeros(1, 2, 4, 4)
    expected[:, :, :3, :3] += a
    expected[:, :1] += b
    assert torch.equal(out, expected)


def test_architecture_geometry_and_gradients_random_init():
    torch.manual_seed(0)
    net = DlibResNet().eval()
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 29
    x = torch.rand(2, 3, 150, 150, requires_grad=True)
    h = net.stem(preprocess(x))
    sizes = [h.shape[-1]]
    for block in net.blocks:
        h = block(h)
        sizes.append(h.shape[-1])
    # dlib's padding rules: 150 -> 72 -> 35, then 17, 8, 4 (3x3 conv + 4x4 pool), 2
    assert sizes == [35, 35, 35, 35, 17, 17, 17, 17, 8, 8, 8, 4, 4, 4, 2]
    emb = net(preprocess(x))
    assert emb.shape == (2, 128)
    emb[0].sum().backward()
    assert x.grad is not None and x.grad[0].abs().sum() > 0
    assert x.grad[1].abs().sum() == 0  # samples stay independent


# --------------------------------------------------------------------------- real weights
@pytest.fixture(scope="module")
def model():
    return create_model("dlib-resnet")


@pytest.fixture(scope="module")
def weights_path() -> Path:
    path, _ = resolve_weights(get_spec("dlib-resnet"))
    return path


@pytest.fixture(scope="module")
def dlib_ref(weights_path):
    dlib = pytest.importorskip("dlib")
    return dlib.face_recognition_model_v1(str(weights_path))


def _dlib_descriptors(ref, chips: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(ref.compute_face_descriptor(np.ascontiguousarray(c))) for c in chips])


@pytest.mark.realmodels
def test_spec_and_module(model):
    spec = model.spec
    assert (spec.name, spec.metric, spec.input_size, spec.embedding_size) == (
        "dlib-resnet", "euclidean", (150, 150), 128)
    assert spec.thresholds["default"] == -0.6
    # FAR thresholds calibrated on LFW, as negative distances: stricter FAR = closer pairs only
    assert spec.thresholds["1e-1"] < spec.thresholds["1e-2"] < spec.thresholds["1e-3"] < 0
    assert model.template == "dlib-150"
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 29


@pytest.mark.realmodels
def test_parse_whole_file(weights_path):
    net = dlib_dat.read_network(weights_path)
    assert net.loss.values["distance_threshold"] == pytest.approx(0.6)
    assert net.input.values["mean"] == pytest.approx(dlib_dat.DLIB_RGB_MEAN, abs=1e-4)
    assert [layer.kind for layer in net.layers].count("con") == 29
    state = dlib_dat.resnet_state_dict_from_network(net)
    assert sum(v.numel() for v in state.values()) == 5_614_592


@pytest.mark.realmodels
def test_parity_with_dlib_synthetic_chips(model, dlib_ref):
    chips = _random_chips(3, seed=0)
    want = _dlib_descriptors(dlib_ref, chips)
    with torch.no_grad():
        got = model(_to_unit(chips)).numpy()
    err = np.abs(got - want).max()
    print(f"dlib parity (synthetic chips): max abs diff {err:.2e}")
    assert err < 1e-4
    # not L2-normalised
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


def _face_chips(names: list[str]) -> np.ndarray:
    """Real faces: dlib's HOG detector box, 1.3x margin, resized to a 150x150 chip."""
    dlib = pytest.importorskip("dlib")
    from PIL import Image

    detector = dlib.get_frontal_face_detector()
    chips = []
    for name in names:
        im = Image.open(fixture_path(name)).convert("RGB")
        im.thumbnail((640, 640))
        box = max(detector(np.asarray(im), 1), key=lambda r: r.area())
        cx, cy = (box.left() + box.right()) / 2, (box.top() + box.bottom()) / 2
        s = 1.3 * max(box.width(), box.height())
        crop = im.crop((int(cx - s / 2), int(cy - s / 2), int(cx + s / 2), int(cy + s / 2)))
        chips.append(np.asarray(crop.resize((150, 150), Image.BICUBIC)))
    return np.stack(chips)


@pytest.mark.realmodels
def test_parity_with_dlib_real_faces(model, dlib_ref):
    chips = _face_chips(["obama.jpg", "obama2.jpg", "biden.jpg"])  # tests/fixtures
    want = _dlib_descriptors(dlib_ref, chips)
    with torch.no_grad():
        got = model(_to_unit(chips))
    err = np.abs(got.numpy() - want).max()
    print(f"dlib parity (real faces): max abs diff {err:.2e}")
    assert err < 1e-4
    dist = torch.cdist(got, got)
    assert dist[0, 1] < 0.6 < min(dist[2, :2])  # dlib's threshold separates Obama from Biden


@pytest.mark.realmodels
def test_batched_equals_single_and_gradients_are_correct(model):
    x = _to_unit(_random_chips(1, seed=1))  # (2, 3, 150, 150)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(batched, single, atol=1e-5)

    # gradients reach the input and match a float64 finite difference along a random direction
    m64 = copy.deepcopy(model).double()
    x64 = x[:1].double().requires_grad_(True)
    target = batched[1:2].double()

    def loss_fn(inp: torch.Tensor) -> torch.Tensor:
        return (m64(inp) - target).norm()

    loss = loss_fn(x64)
    (grad,) = torch.autograd.grad(loss, x64)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    direction = torch.randn(x64.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    direction /= direction.norm()
    eps = 1e-6
    with torch.no_grad():
        numeric = (loss_fn(x64 + eps * direction) - loss_fn(x64 - eps * direction)) / (2 * eps)
    assert float((grad * direction).sum()) == pytest.approx(float(numeric), rel=1e-3, abs=1e-7)


@pytest.mark.realmodels
def test_second_load_reads_safetensors_cache(weights_path, tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRIV_HOME", str(tmp_path))
    t0 = time.perf_counter()
    first = create_model("dlib-resnet", weights=weights_path)
    t_first = time.perf_counter() - t0
    cached = list((tmp_path / "converted" / "dlib-resnet").glob("*.safetensors"))
    assert len(cached) == 1

    def no_parse(path):
        raise AssertionError("the .dat file was parsed again instead of using the cache")

    monkeypatch.setattr(dlib_dat, "dlib_resnet_state_dict", no_parse)
    t0 = time.perf_counter()
    second = create_model("dlib-resnet", weights=weights_path)
    t_second = time.perf_counter() - t0
    print(f"dlib-resnet load: first (parse + convert) {t_first:.3f} s, second (safetensors) {t_second:.3f} s")
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = _to_unit(_random_chips(0, seed=2))
    with torch.no_grad():  # same weights; memory alignment may change the last float bit
        assert torch.allclose(first(x), second(x), atol=1e-6)


@pytest.mark.realmodels
def test_corrupt_weights_raise_clear_error(weights_path, tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRIV_HOME", str(tmp_path / "home"))
    data = weights_path.read_bytes()
    n = len(data)
    for cut in (2, 30, 300, 400, 20_000, n // 2, n - 1000, n - 30, n - 1):
        with pytest.raises(DlibFormatError, match="truncated"):
            parse_network(data[:cut])
    with pytest.raises(DlibFormatError, match="trailing"):
        parse_network(data + b"\x00")
    renamed = data.replace(b"\x05relu_", b"\x05relu?", 1)
    with pytest.raises(DlibFormatError, match="unsupported dlib layer 'relu\\?'"):
        parse_network(renamed)

    bad = tmp_path / "broken.dat"
    bad.write_bytes(data[: n // 3])
    with pytest.raises(ValueError, match="truncated"):
        create_model("dlib-resnet", weights=bad)
    assert not list((tmp_path / "home").rglob("*.safetensors"))


@pytest.mark.realmodels
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(model):
    x = _to_unit(_random_chips(1, seed=4))
    with torch.no_grad():
        cpu = model(x)
        gpu = copy.deepcopy(model).to("cuda")(x.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4)
