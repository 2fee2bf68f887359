"""``facepriv protect``: protect face photos against face recognition.

    >>> from facepriv.protect import ProtectConfig, run_protect
    >>> run_protect(["photos/"], "protected/", ProtectConfig(method="map", map={"expression": "happy"}))

MAP (the default method) lives in :mod:`facepriv.protect.map`; the L-inf noise baselines
(``pgd``, ``mifgsm``, ``tipim``) in :mod:`facepriv.protect.baselines`.
"""

from .map import MAPConfig, MAPEditor, MAPTuner
from .pipeline import METHODS, ProtectConfig, ProtectSummary, run_protect

__all__ = ["METHODS", "MAPConfig", "MAPEditor", "MAPTuner", "ProtectConfig", "ProtectSummary", "run_protect"]
