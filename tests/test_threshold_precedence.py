"""A user's own calibration beats the thresholds facepriv ships (LFW), but not published
protocol thresholds; the audit and the attacks agree on the order."""

from __future__ import annotations

import pytest

from facepriv.attacks import AttackConfig, SurrogateEnsemble
from facepriv.attacks import surrogate_thresholds as attack_thresholds
from facepriv.models.thresholds import resolve_thresholds, store_calibration
from facepriv.models import get_spec


class _Stub:
    def __init__(self, name):
        self.spec = get_spec(name)


def _attack(name):
    ens = SurrogateEnsemble.__new__(SurrogateEnsemble)
    ens.names, ens.members = [name], [_Stub(name)]
    return attack_thresholds(ens, AttackConfig(), required=False)[name]


def test_shipped_lfw_thresholds_are_used_without_a_calibration(isolated_home):
    spec = get_spec("sface")
    assert spec.threshold_kind == "shipped"
    t = resolve_thresholds("sface")
    assert t.values["1e-2"] == pytest.approx(spec.thresholds["1e-2"]) and "LFW" in t.source
    assert _attack("sface") == pytest.approx(spec.thresholds["1e-2"])


@pytest.mark.parametrize("model", ["sface", "dlib-resnet", "facenet-casia"])
def test_a_stored_calibration_beats_the_shipped_thresholds(isolated_home, model):
    mine = {"1e-1": 0.11, "1e-2": 0.22, "1e-3": 0.33}
    store_calibration(model, {"thresholds": mine, "source": "my pairs"})
    t = resolve_thresholds(model)
    assert t.kind == "calibrated" and t.values == mine
    assert _attack(model) == pytest.approx(0.22)


def test_published_protocol_thresholds_still_beat_a_stored_calibration(isolated_home):
    spec = get_spec("facenet-vggface2")
    assert spec.threshold_kind == "protocol"
    store_calibration("facenet-vggface2", {"thresholds": {"1e-1": 0.1, "1e-2": 0.2, "1e-3": 0.3}})
    t = resolve_thresholds("facenet-vggface2")
    assert t.kind == "protocol" and t.values["1e-2"] == pytest.approx(spec.thresholds["1e-2"])
    assert "not used" in (t.note or "")
