"""facepriv's model registry: every command loads its models through here.

    >>> from facepriv.models import create_model, list_models, resolve_pretrained
    >>> fr = create_model("dlib-resnet")          # real weights, converted once, offline
    >>> [s.name for s in list_models("recognition")]
    >>> resolve_pretrained("google/ddpm-celebahq-256", task="score").name   # folder, name or hub id
    'ddpm-celebahq-256'

See :mod:`facepriv.models.registry` for how sources, caching and the offline switch work.
"""

from .hub import ChecksumError, OfflineError, home, is_offline
from .pretrained import ResolvedRef, is_hub_id, resolve_pretrained
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
    "OfflineError", "PyPIFile", "ResolvedRef", "URLFile", "UnknownModelError", "UserFile", "availability",
    "create_model", "fetch", "get_spec", "home", "import_model", "is_hub_id", "is_offline", "list_models",
    "register", "resolve_pretrained",
]
