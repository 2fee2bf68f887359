"""The table of ``facepriv protect`` methods: name -> builder of the per-photo work + traits.

The shape follows :mod:`facepriv.deid.base` (``@register_method``): a method registers a
*builder* under its name with :func:`register_protect_method`; :func:`facepriv.protect.run_protect`
resolves ``--method`` (``auto`` stays a choice made by
:func:`facepriv.protect.pipeline.resolve_method`, not an entry here), builds the method's
:class:`ProtectJob` once and runs it over the photos::

    @register_protect_method("mine", help="my edit")
    def _build_mine(run: ProtectRun) -> ProtectJob:
        edit = ...  # edit(x, faces, loaded) -> x'
        return photo_job(run, edit, detector, description="protect mine")

``map``, ``transfer`` and the L-inf baselines (pgd, mifgsm, tidim, tipim; built by
:mod:`facepriv.protect.baselines`) are registered in :mod:`facepriv.protect.pipeline`, in the
order the CLI lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError

#: the option groups of ``ProtectConfig`` a method may read (``ProtectMethod.options``)
OPTION_GROUPS = ("map", "transfer", "baseline")


@dataclass
class ProtectRun:
    """What a builder gets: the resolved config and the batch's settings. ``details`` is the
    summary's ``details`` dict; a builder (or its job's ``finish``) adds what it did."""

    cfg: Any  # ProtectConfig, with ``method`` resolved (never "auto")
    device: Any  # torch.device
    policy: Any  # FacePolicy
    save: Any  # SaveOptions
    items: list
    out: Path
    config: dict
    resume: bool
    output_suffix: str | None
    progress: bool
    rank: int
    world: int
    details: dict = field(default_factory=dict)


@dataclass
class ProtectJob:
    """The per-photo work of one method: ``process(item, dst) -> ItemResult`` for the batch
    runner, the progress ``description``, and ``finish()`` run after the batch (may add to
    ``run.details``)."""

    process: Callable
    description: str
    finish: Callable[[], None] | None = None


@dataclass(frozen=True)
class ProtectMethod:
    """One protect method: its builder and the traits the pipeline and CLI read.

    options: the ``ProtectConfig`` option group it reads ("map": --model/--save-model and the
    MAP settings; "transfer": ``transfer``; "baseline": ``attack``; None: none);
    needs_gpu: only practical on a CUDA device; accepts_target: ``--target`` changes what it does;
    needs_target: it refuses to run without one; validate: checks a config before any work.
    """

    name: str
    build: Callable[[ProtectRun], ProtectJob]
    options: str | None = None
    needs_gpu: bool = False
    accepts_target: bool = False
    needs_target: bool = False
    help: str = ""
    validate: Callable[[Any], None] | None = field(default=None, compare=False)


#: registered methods, in registration (CLI) order
PROTECT_METHODS: dict[str, ProtectMethod] = {}


def register_protect_method(name: str, *, options: str | None = None, needs_gpu: bool = False,
                            accepts_target: bool = False, needs_target: bool = False, help: str = "",
                            validate: Callable[[Any], None] | None = None):
    """Decorator adding a builder to :data:`PROTECT_METHODS` under ``name`` (replacing one there)."""
    if options is not None and options not in OPTION_GROUPS:
        raise ValueError(f"options must be one of {', '.join(OPTION_GROUPS)} or None, not {options!r}")

    def deco(build: Callable[[ProtectRun], ProtectJob]):
        PROTECT_METHODS[name] = ProtectMethod(name, build, options=options, needs_gpu=needs_gpu,
                                              accepts_target=accepts_target, needs_target=needs_target,
                                              help=help, validate=validate)
        return build

    return deco


def unregister_protect_method(name: str) -> None:
    PROTECT_METHODS.pop(name, None)


def protect_method_names() -> tuple[str, ...]:
    """The registered names (without ``auto``), in order."""
    return tuple(PROTECT_METHODS)


def get_protect_method(name: str) -> ProtectMethod:
    if name not in PROTECT_METHODS:
        raise ConfigError(f"unknown method {name!r}; use one of {', '.join(('auto', *PROTECT_METHODS))}")
    return PROTECT_METHODS[name]


def photo_job(run: ProtectRun, edit, detector, *, description: str,
              report: Callable[[Any, Any], None] | None = None) -> ProtectJob:
    """The usual job: ``process_photo`` with ``edit`` on each photo; ``report(res, edit)`` then
    adds the method's record to the result (``edit.last_result`` is reset before each photo
    where the edit has one)."""
    from ..core.photo import process_photo

    def process(item, dst):
        if hasattr(edit, "last_result"):
            edit.last_result = None
        res = process_photo(item, dst, detector=detector, policy=run.policy, edit=edit, save=run.save,
                            device=run.device)
        if report is not None:
            report(res, edit)
        return res

    return ProtectJob(process, description)
