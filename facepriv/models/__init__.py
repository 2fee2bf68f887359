"""facepriv's model registry: every command loads its models through here.

    >>> from facepriv.models import create_model, list_models
    >>> fr = create_model("dlib-resnet")          # real weights, converted once, offline
    >>> [s.name for s in list_models("recognition")]

See :mod:`facepriv.models.registry` for how sources, caching and the offline switch work.
"""

from .hub import ChecksumError, OfflineError, home, is_offline
from .registry import (
    Availability,
    LoadContext,
    ModelSpec,
    UnknownModelError,
    availability,
    create_model,
    fetch,
    get_spec,
    import_model,
    list_models,
    register,
)
from .sources import HubRepo, NotAvailableError, PyPIFile, URLFile, UserFile

__all__ = [
    "Availability", "ChecksumError", "HubRepo", "LoadContext", "ModelSpec", "NotAvailableError",
    "OfflineError", "PyPIFile", "URLFile", "UnknownModelError", "UserFile", "availability",
    "create_model", "fetch", "get_spec", "home", "import_model", "is_offline", "list_models", "register",
]
