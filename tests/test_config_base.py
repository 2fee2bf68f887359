"""core.config.ConfigBase: the one settings base (strict from_dict, to_json, atomic JSON save/load)."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from facepriv.core.config import ConfigBase, read_json
from facepriv.core.errors import ConfigError


@dataclass
class _Settings(ConfigBase):
    config_name = "test setting"
    steps: int = 10
    folder: Path | None = None
    names: list[str] = field(default_factory=list)


def test_from_dict_rejects_a_typo_and_names_the_known_keys():
    with pytest.raises(ConfigError, match=r"unknown test setting\(s\) stpes; known: folder, names, steps"):
        _Settings.from_dict({"stpes": 3})


def test_to_json_round_trips_through_from_dict_with_paths_as_text():
    s = _Settings(steps=3, folder=Path("a/b"), names=["x"])
    d = s.to_json()
    assert d == {"steps": 3, "folder": "a/b", "names": ["x"]}
    assert _Settings.from_dict(d).steps == 3


def test_replace_checks_the_names():
    assert _Settings().replace(steps=4).steps == 4
    with pytest.raises(ConfigError, match="stepz"):
        _Settings().replace(stepz=4)


def test_save_json_writes_the_fields_under_a_key_beside_extra_and_load_reads_them(tmp_path):
    p = _Settings(steps=7).save_json(tmp_path / "sub" / "config.json", key="config", extra={"format": "x"})
    assert read_json(p) == {"format": "x", "config": {"steps": 7, "folder": None, "names": []}}
    assert _Settings.load_json(p, key="config").steps == 7
    assert not [f for f in p.parent.iterdir() if f.name != "config.json"]  # no temporary left


def test_load_json_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        _Settings.load_json(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: cannot read"):
        _Settings.load_json(bad)
    bad.write_text("[1]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        _Settings.load_json(bad)


def _settings_classes():
    from facepriv.attacks.eot import EOTConfig
    from facepriv.attacks.transfer import TransferConfig
    from facepriv.patch.generator import GeneratorConfig
    from facepriv.patch.train import PatchTrainConfig
    from facepriv.protect.map import MAPConfig
    from facepriv.protect.transfer import TransferOptions

    return [(MAPConfig, "MAP setting"), (GeneratorConfig, "patch generator setting"),
            (TransferConfig, "transfer option"), (TransferOptions, "transfer option"), (EOTConfig, "EOT setting"),
            (PatchTrainConfig, "patch training setting")]


def test_every_settings_class_uses_the_base_and_names_itself_in_errors():
    for cls, words in _settings_classes():
        assert issubclass(cls, ConfigBase)
        with pytest.raises(ConfigError, match=rf"unknown {words}\(s\) typo_key; known: "):
            cls.from_dict({"typo_key": 1})


def test_settings_round_trip_through_to_json_and_from_dict():
    from facepriv.attacks.transfer import TransferConfig
    from facepriv.patch.train import PatchTrainConfig
    from facepriv.protect.map import MAPConfig
    from facepriv.protect.transfer import TransferOptions

    t = TransferConfig(steps=3)
    assert TransferConfig.from_dict(t.to_json()) == t  # the nested EOT settings too (JPEG range a tuple again)
    opts = TransferOptions.from_dict({"attack": {"steps": 5}})
    assert isinstance(opts.attack, TransferConfig) and opts.to_json()["attack"]["steps"] == 5
    with pytest.raises(ConfigError, match=r"unknown transfer option\(s\) stpes"):
        TransferOptions(attack={"stpes": 5})
    assert MAPConfig.from_dict(MAPConfig(t0=123).to_json()).t0 == 123
    p = PatchTrainConfig(data=["x"])
    assert p.to_json()["generator"]["patch_size"] == p.generator.patch_size
