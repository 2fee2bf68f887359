"""Online FR API providers come from a registry (``@register_provider``), not from if/elif over names.

The three built-in adapters are registered with what they need (key variables, config keys, optional
package); an unknown ``--api`` name is refused with the registered names listed; a fake provider class
registered by a test is built by ``create_api`` / ``build_apis`` and used by a whole audit run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from facepriv.audit.apis import ALIASES, PROVIDERS, create_api, register_provider, unregister_provider
from facepriv.audit.apis.azure import AzureFace
from facepriv.audit.apis.base import CompareResult, FaceAPI
from facepriv.audit.apis.facepp import FacePlusPlus
from facepriv.audit.apis.rekognition import Rekognition
from facepriv.core.errors import ConfigError


def test_builtin_providers_are_registered_with_their_requirements():
    assert list(PROVIDERS) == ["facepp", "rekognition", "azure"]
    fpp, rek, az = PROVIDERS["facepp"], PROVIDERS["rekognition"], PROVIDERS["azure"]
    assert (fpp.cls, rek.cls, az.cls) == (FacePlusPlus, Rekognition, AzureFace)
    assert {"FACEPP_API_KEY", "FACEPP_API_SECRET"} <= set(fpp.env)
    assert {"api_key", "api_secret"} <= set(fpp.config_keys) and fpp.extra is None
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(rek.env)
    assert {"aws_access_key_id", "aws_secret_access_key", "region"} <= set(rek.config_keys)
    assert rek.extra == "boto3"
    assert {"AZURE_FACE_ENDPOINT", "AZURE_FACE_KEY"} <= set(az.env)
    assert {"endpoint", "key"} <= set(az.config_keys) and az.extra is None
    assert ALIASES == {"face++": "facepp", "faceplusplus": "facepp", "aws": "rekognition", "azure-face": "azure"}
    for spec in PROVIDERS.values():
        assert spec.cls.name == spec.name and issubclass(spec.cls, FaceAPI)


def test_unknown_provider_lists_the_registered_ones(tmp_path):
    from facepriv.audit import AuditConfig
    from facepriv.audit.api_run import build_apis

    with pytest.raises(ConfigError, match=r"^unknown API 'bing'; use one of facepp, rekognition, azure$"):
        create_api("bing", cache=False)
    cfg = AuditConfig(protected="p", original="o", apis=["bing"])
    with pytest.raises(ConfigError, match=r"unknown API 'bing'; use one of facepp, rekognition, azure"):
        build_apis(cfg)
    with pytest.raises(ConfigError, match=r"unknown API 'bing'; use one of facepp, rekognition, azure"):
        AuditConfig(protected="p", original="o", apis=["facepp"], api_endpoint=["bing=http://b"])


def test_register_provider_refuses_what_is_not_an_adapter():
    with pytest.raises(TypeError, match="not a FaceAPI subclass"):
        register_provider("nope")(object)
    assert "nope" not in PROVIDERS


# ------------------------------------------------------------------------------ a fake provider
class FixedScore(FaceAPI):
    """Answers every comparison with the same score, without any network."""

    name = "fixed"
    score_range = "always 0.95; threshold 0.5"
    sent: list = []

    def _compare(self, img_a: bytes, img_b: bytes) -> CompareResult:
        FixedScore.sent.append((len(img_a), len(img_b)))
        return CompareResult(score=0.95, thresholds={"default": 0.5}, raw={"fixed": True})


@pytest.fixture
def fixed_provider():
    FixedScore.sent = []
    register_provider("fixed", env=("FIXED_KEY",), config_keys=("key",), aliases=("always",))(FixedScore)
    try:
        yield FixedScore
    finally:
        unregister_provider("fixed")
    assert "fixed" not in PROVIDERS and "always" not in ALIASES


def test_a_registered_provider_is_built_and_listed(fixed_provider, monkeypatch, tmp_path):
    from facepriv.audit import AuditConfig
    from facepriv.audit.api_run import build_apis

    monkeypatch.delenv("FACEPRIV_API_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert PROVIDERS["fixed"].cls is FixedScore and PROVIDERS["fixed"].env == ("FIXED_KEY",)
    with pytest.raises(ConfigError, match=r"use one of facepp, rekognition, azure, fixed$"):
        create_api("bing", cache=False)
    api = create_api("always", endpoint="http://fixed.invalid", cache=False, rate=None)
    assert isinstance(api, FixedScore) and api.endpoint == "http://fixed.invalid"
    adapters = build_apis(AuditConfig(protected="p", original="o", apis=["fixed", "always"],
                                      api_cache=tmp_path / "cache", api_rate=None))
    assert list(adapters) == ["fixed"] and isinstance(adapters["fixed"], FixedScore)  # named twice: used once


class _MeanColour(torch.nn.Module):
    """Fake recogniser (mean colour of the crop's centre) so that the audit runs in milliseconds."""

    def __init__(self):
        super().__init__()
        self.spec = type("S", (), {"template": "arcface-112", "input_size": (112, 112), "metric": "cosine",
                                   "name": "mean-colour", "thresholds": {"default": 0.5}, "threshold_source": None})()

    def forward(self, x):
        return x[:, :, 28:84, 28:84].mean((2, 3))


def test_audit_runs_a_registered_fake_provider_end_to_end(fixed_provider, tmp_path, monkeypatch):
    from facepriv.audit import AuditConfig, run_audit

    orig, prot = tmp_path / "orig", tmp_path / "prot"
    orig.mkdir()
    prot.mkdir()
    for person, colour in (("ann", (200, 60, 40)), ("ben", (40, 60, 200))):
        for folder, shift in ((orig, 0), (prot, 9)):
            Image.fromarray(np.full((112, 112, 3), colour, dtype=np.uint8) + shift).save(folder / f"{person}.png")
    monkeypatch.delenv("FACEPRIV_API_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("FACEPRIV_THRESHOLDS_DIR", str(tmp_path / "thresholds"))
    cfg = AuditConfig(protected=prot, original=orig, models=["mean-colour"], aligned=True, quality=False,
                      progress=False, device="cpu", out=tmp_path / "rep", apis=["fixed"], api_rate=None,
                      api_cache=tmp_path / "cache")
    rep = run_audit(cfg, recognizers={"mean-colour": _MeanColour()})
    a = rep["apis"]["fixed"]
    assert len(FixedScore.sent) == 2  # one self-verification pair per protected photo
    assert a["status"] == "ok" and a["pairs"] == 2 and a["failed_pairs"] == 0
    assert a["provider"]["name"] == "fixed" and a["provider"]["score_range"] == "always 0.95; threshold 0.5"
    # 0.95 >= 0.5: every pair still verifies -> nothing protected
    assert a["dodging"]["psr"] == {"default": 0.0} and a["dodging"]["mean_score"] == pytest.approx(0.95)
    for row in rep["images"]:
        assert [c["score"] for c in row["apis"]["fixed"]] == [0.95]
    assert (tmp_path / "rep" / "report.json").is_file()


# ----------------------------------------------------------------------------- config files
def test_a_toml_config_is_read_and_its_keys_are_redacted(tmp_path):
    from facepriv.audit.apis.base import read_config
    from facepriv.core.secrets import redact_text

    cfg = tmp_path / "apis.toml"
    cfg.write_text('[facepp]\napi_key = "k-123456789"\napi_secret = "s-987654321"\n')
    data = read_config(cfg)
    assert data["facepp"]["api_key"] == "k-123456789"
    assert "k-123456789" not in redact_text("key k-123456789 leaked")


def test_a_toml_config_without_a_toml_reader_says_what_to_do(tmp_path, monkeypatch):
    import sys

    from facepriv.audit.apis.base import read_config

    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10 without tomli
    monkeypatch.setitem(sys.modules, "tomli", None)
    cfg = tmp_path / "apis.toml"
    cfg.write_text('[facepp]\napi_key = "k-123456789"\n')
    with pytest.raises(ConfigError, match="Python >= 3.11 or `pip install tomli`") as err:
        read_config(cfg)
    assert "k-123456789" not in str(err.value)
