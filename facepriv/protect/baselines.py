"""Noise baselines of ``facepriv protect``: L-inf attacks on the photo (PGD, MI-FGSM, TI-DIM, TIP-IM).

    >>> from facepriv.protect import ProtectConfig, run_protect
    >>> run_protect(["photos/"], "out/", ProtectConfig(method="tidim", attack={"steps": 20, "epsilon": "8/255"}))

The attack is configured by one :class:`facepriv.attacks.AttackConfig` (:func:`attack_config`
builds it from ``ProtectConfig.attack``) and run photo by photo by
:class:`facepriv.attacks.AttackEditor`, as ``deid -m adversarial`` runs it. Without a target the
faces are protected by dodging (pushed away from their own identity); with ``--target`` (an
image, or a folder of images) by impersonation of that identity.
"""

from __future__ import annotations

from ..attacks import AttackConfig, AttackEditor
from ..attacks.config import METHOD_NAMES
from ..core.errors import ConfigError
from .registry import ProtectJob, ProtectRun, photo_job

BASELINE_METHODS = METHOD_NAMES  # pgd, mifgsm, tidim, tipim
#: protect's own defaults where they differ from AttackConfig's (more steps than deid's 20)
PROTECT_ATTACK_DEFAULTS = {"steps": 50}
__all__ = ["BASELINE_METHODS", "PROTECT_ATTACK_DEFAULTS", "attack_config", "build_baseline", "face_report"]


def attack_config(cfg) -> AttackConfig:
    """The resolved :class:`AttackConfig` of a ``ProtectConfig`` whose method is a baseline.

    ``cfg.attack`` is an AttackConfig (used as given) or a dict of the options given (the rest
    take protect's defaults; the seed is protect's ``--seed``); an unknown option or a method that
    differs from ``cfg.method`` is a :class:`ConfigError`.
    """
    if isinstance(cfg.attack, AttackConfig):
        attack = cfg.attack
    else:
        seed = cfg.map.get("seed") if isinstance(cfg.map, dict) else cfg.map.seed
        given = {**PROTECT_ATTACK_DEFAULTS, **({"seed": seed} if seed is not None else {}), **cfg.attack}
        attack = AttackConfig.from_dict({"method": cfg.method, **given})
    if attack.method != cfg.method:
        raise ConfigError(f"the attack options are for {attack.method}, not for --method {cfg.method}")
    return attack.resolved()


def face_report(row: dict) -> dict:
    """The manifest's short per-face record of a baseline attack."""
    keep = ("face", "status", "mode", "steps", "early_stopped", "reason", "target_index")
    out = {k: row[k] for k in keep if k in row}
    sim = row.get("similarity") or {}
    if sim:
        # None = no threshold known for that model: unknown, never "not protected"
        out["passed"] = {m: v.get("passed") for m, v in sim.items() if isinstance(v, dict)}
    return out


def build_baseline(run: ProtectRun) -> ProtectJob:
    """The protect job of pgd, mifgsm, tidim and tipim: an :class:`AttackEditor` on every photo."""
    from ..models import create_model

    attack = attack_config(run.cfg)
    detector = create_model(run.cfg.detector, device=run.device)
    edit = AttackEditor(attack, run.cfg.surrogate_names(), target=run.cfg.target, detector=detector,
                        label=f"protect {run.cfg.method}").setup(run.device)
    settings = attack.to_json()
    settings.pop("quantize", None)  # 255 or 65535, per photo
    run.details["attack"] = settings  # the resolved attack settings every photo ran with

    def report(res, edit):
        if edit.last_result is not None:
            res.extra["attack"] = [face_report(r) for r in edit.last_result.per_face]
            res.extra["linf"] = round(float(edit.last_result.linf), 6)

    return photo_job(run, edit, detector, description=f"protect {run.cfg.method}", report=report)
