"""``facepriv protect``: protect face photos against face recognition.

    >>> from facepriv.protect import ProtectConfig, run_protect
    >>> run_protect(["photos/"], "protected/", ProtectConfig(method="map", map={"expression": "happy"}))

MAP (the default method) lives in :mod:`facepriv.protect.map`; the L-inf noise baselines
(``pgd``, ``mifgsm``, ``tidim``, ``tipim``) in :mod:`facepriv.protect.baselines`; the table of
methods (name -> builder + traits) in :mod:`facepriv.protect.registry`.
"""

from .map import MAPConfig, MAPEditor, MAPTuner
from .pipeline import METHODS, ProtectConfig, ProtectSummary, run_protect
from .registry import PROTECT_METHODS, ProtectJob, ProtectMethod, ProtectRun, photo_job, register_protect_method

__all__ = ["METHODS", "MAPConfig", "MAPEditor", "MAPTuner", "PROTECT_METHODS", "ProtectConfig", "ProtectJob",
           "ProtectMethod", "ProtectRun", "ProtectSummary", "photo_job", "register_protect_method", "run_protect"]
