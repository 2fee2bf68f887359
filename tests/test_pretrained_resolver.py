"""facepriv.models.resolve_pretrained: one rule for "local folder, registry name or hub id",
shared by protect's MAP score network, deid's inpaint generator and the patch autoencoder.
No network: tmp_path folders, a fake hub cache and monkeypatch only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facepriv.core.errors import ConfigError
from facepriv.models import OfflineError, ResolvedRef, is_hub_id, resolve_pretrained
from facepriv.models.sources import HubRepo

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """An empty hub cache, the offline switch off, a private FACEPRIV_HOME, and a hub that
    fails the test if anything tries to download; returns the hub lookups made."""
    monkeypatch.setenv("FACEPRIV_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    for var in ("FACEPRIV_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    real = HubRepo._snapshot

    def snapshot(self, local_only, progress=True, patterns=None):
        calls.append((self.repo_id, local_only))
        if not local_only:
            raise AssertionError(f"tried to download {self.repo_id}")
        return real(self, local_only, progress, patterns)  # the local hub cache only

    monkeypatch.setattr(HubRepo, "_snapshot", snapshot)
    monkeypatch.chdir(tmp_path)
    return calls


def _fake_hub_snapshot(cache: Path, repo_id: str) -> Path:
    """A hub-cache snapshot of ``repo_id`` holding one config (what snapshot_download finds offline)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snap


def test_a_local_folder_wins_over_a_registry_name_and_a_hub_id(tmp_path, no_network, monkeypatch):
    (tmp_path / "ddpm-celebahq-256").mkdir()  # a folder named like a registry entry
    (tmp_path / "google" / "ddpm-celebahq-256").mkdir(parents=True)  # and one named like its hub id
    for ref in ("ddpm-celebahq-256", "google/ddpm-celebahq-256", tmp_path / "ddpm-celebahq-256"):
        r = resolve_pretrained(ref, task="score")
        assert r.kind == "local" and r.spec is None and r.hub_id is None
        assert r.path.resolve() == (tmp_path / str(ref)).resolve()
        assert r.local_path() == r.path
    assert resolve_pretrained("ddpm-celebahq-256").record == str((tmp_path / "ddpm-celebahq-256").resolve())
    # ~ is expanded; a local *file* counts too; the task is not checked against a folder
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "w.safetensors").write_bytes(b"x")
    assert resolve_pretrained("~/w.safetensors", task="autoencoder").path == tmp_path / "w.safetensors"
    assert no_network == []


def test_a_registry_name_or_a_registered_hub_id_resolves_through_the_registry(no_network):
    r = resolve_pretrained("ddpm-celebahq-256", task="score")
    assert isinstance(r, ResolvedRef) and r.kind == "registry" and r.name == "ddpm-celebahq-256"
    assert r.hub_id is None and r.record == "ddpm-celebahq-256"
    # the hub id of a registered model is that entry (its pinned source, imports, offline help)
    r = resolve_pretrained("google/ddpm-celebahq-256", task="score")
    assert r.kind == "registry" and r.name == "ddpm-celebahq-256" and r.hub_id == "google/ddpm-celebahq-256"
    assert resolve_pretrained("madebyollin/taesd", task="autoencoder").name == "taesd"
    assert resolve_pretrained("taesd").spec.task == "autoencoder"  # no task: any entry
    # an entry of another task is refused, by name or by hub id
    with pytest.raises(ConfigError, match="dlib-resnet: a recognition model, not a diffusion score model"):
        resolve_pretrained("dlib-resnet", task="score", what="--score-model")
    with pytest.raises(ConfigError, match=r"madebyollin/taesd: an autoencoder model \(taesd\), not a diffusion score"):
        resolve_pretrained("madebyollin/taesd", task="score")
    with pytest.raises(ConfigError, match="not an autoencoder"):
        resolve_pretrained("ddpm-celebahq-256", task="autoencoder")
    assert no_network == []


def test_a_hub_id_stays_a_hub_id_until_its_files_are_asked_for(tmp_path, no_network):
    r = resolve_pretrained("someorg/some-unet_v1.5", task="score")
    assert r.kind == "hub" and r.hub_id == "someorg/some-unet_v1.5" and r.spec is None and r.path is None
    assert r.record == "someorg/some-unet_v1.5"
    assert no_network == []  # classifying never touches the hub
    snap = _fake_hub_snapshot(tmp_path / "hf", "someorg/cached")
    assert resolve_pretrained("someorg/cached").local_path() == snap  # found in the cache, no download
    assert no_network == [("someorg/cached", True)]
    for good in ("org/name", "Org-1/name.v2", "o/n_"):
        assert is_hub_id(good), good
    for bad in ("./nope/", "nope/", "/abs/x", "a/b/c", "org/", "/name", "org/-x", "org/x.", "a--b/c", "a/b..c",
                "org name/x", "~/x", "x"):
        assert not is_hub_id(bad), bad


def test_offline_a_hub_id_not_in_the_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRIV_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("FACEPRIV_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    r = resolve_pretrained("someorg/some-unet", task="score")  # classifying works offline
    assert r.kind == "hub"
    with pytest.raises(OfflineError, match=r"offline switch is on.*huggingface-cli download someorg/some-unet"):
        r.local_path()
    with pytest.raises(OfflineError, match="facepriv models import"):
        r.local_path(allow_patterns=("model_index.json",))
    # the three commands give that same error
    from facepriv.deid.generative import resolve_generator
    from facepriv.patch.generator import resolve_autoencoder
    from facepriv.protect.map import load_base_score_model

    for load in (load_base_score_model, resolve_generator, resolve_autoencoder):
        with pytest.raises(OfflineError, match="someorg/some-unet.*offline switch is on"):
            load("someorg/some-unet")
    # a cached snapshot still works offline
    snap = _fake_hub_snapshot(tmp_path / "hf", "someorg/some-unet")
    assert r.local_path() == snap


@pytest.mark.parametrize("ref", ["./nope/", "nope/", "~/nope", "models/unet/v1", "/definitely/not/here"])
def test_a_missing_path_is_a_clear_error_not_a_hub_lookup(ref, tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="no such file or folder"):
        resolve_pretrained(ref, task="score")
    from facepriv.deid.generative import resolve_generator
    from facepriv.patch.generator import resolve_autoencoder
    from facepriv.protect.map import load_base_score_model

    for load, what in ((load_base_score_model, "score network"), (resolve_generator, "--score-model"),
                       (resolve_autoencoder, "autoencoder")):
        with pytest.raises(ConfigError, match=f"^{what} .*no such file or folder"):
            load(ref)
    assert no_network == []  # not even the hub cache was looked at


def test_anything_else_is_a_clear_error_naming_what_is_accepted(no_network):
    with pytest.raises(ConfigError, match=r"not a folder, a registered diffusion score model or a hub id.*ddpm"):
        resolve_pretrained("not a model", task="score")
    with pytest.raises(ConfigError, match="did you mean taesd"):
        resolve_pretrained("tasd", task="autoencoder")
    with pytest.raises(ConfigError, match="empty model reference"):
        resolve_pretrained("", task="score")
    with pytest.raises(ConfigError, match="models list"):
        resolve_pretrained("zzzz")
    assert no_network == []
