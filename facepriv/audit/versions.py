"""Versions of everything that produced an audit's numbers (report.json ``versions``)."""

from __future__ import annotations

import torch

from .config import EXPRESSION_MODEL


def registry_weights(name: str | None) -> dict:
    """What the registry knows of a model's weights: where they are read from (``weights``), the
    pinned ``sha256`` and the package ``version`` of their source (None where it has none, e.g.
    imported files or unregistered models)."""
    out: dict = {"weights": None, "sha256": None, "version": None}
    if not name:
        return out
    try:
        from ..models import availability

        a = availability(name)
    except Exception:  # noqa: BLE001 - injected / unregistered models
        return out
    out["weights"] = a.where
    src = a.source
    if src is not None:
        out["sha256"] = getattr(src, "sha256", None) or getattr(src, "digest", None)
        out["version"] = getattr(src, "version", None)
    return out


def _model_entry(m, injected: bool = False) -> dict:
    spec = getattr(m, "spec", None)
    entry = {"architecture": getattr(spec, "architecture", type(m).__name__),
             "template": getattr(spec, "template", None), "input_size": getattr(spec, "input_size", None),
             "metric": getattr(spec, "metric", None), "runtime": getattr(spec, "runtime", None),
             **registry_weights(getattr(spec, "name", None))}
    if injected:
        entry["injected"] = "model object supplied by the caller; weights as the registry knows the name"
    return entry


def model_versions(models: dict, detector_name: str | None, *, detector_role: str | None = None,
                   detector_injected: bool = False, expression=None, expression_amp: str | None = None,
                   expression_injected: bool = False, quality_meter=None, quality_injected: bool = False,
                   injected: bool = False) -> dict:
    """Versions of everything that produced the numbers: facepriv, torch, python; each
    recognition model (architecture, template, weights with sha256 / version); the detector
    (``detector``: its name; ``detector_model``: its weights and what it was used for); the
    expression model (with ``--utility``, with its mixed-precision decision) and the LPIPS / FID
    networks the quality metrics actually used (``quality``)."""
    import platform

    from .. import __version__

    info: dict = {"facepriv": __version__, "torch": torch.__version__, "python": platform.python_version(),
                  "detector": detector_name, "models": {}}
    for name, m in models.items():
        info["models"][name] = _model_entry(m, injected)
    if detector_name:
        det = {"name": detector_name, "role": detector_role, **registry_weights(detector_name)}
        if detector_injected:
            det["injected"] = "detector object supplied by the caller; weights as the registry knows the name"
        info["detector_model"] = det
    if expression is not None:
        info["expression_model"] = {"name": EXPRESSION_MODEL, **_model_entry(expression, expression_injected),
                                    "amp": expression_amp}
    if quality_meter is not None:
        q: dict = {}
        if getattr(quality_meter, "lpips", None) is not None:
            q["lpips"] = {"name": getattr(quality_meter, "lpips_name", None),
                          **registry_weights(getattr(quality_meter, "lpips_name", None))}
        if getattr(quality_meter, "fid_model", None) is not None:
            q["fid"] = {"name": "fid-inception", **registry_weights("fid-inception")}
        if quality_injected:
            for v in q.values():
                v["injected"] = "quality meter supplied by the caller; weights as the registry knows the name"
        info["quality"] = q
    return info
