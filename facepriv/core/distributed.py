"""Which share of a batch this process runs: its rank and the number of processes.

One rule for every command that shards its inputs (``protect``, ``deid``, ``patch apply``):
explicit values win; otherwise a launcher's environment decides - ``accelerate launch`` /
torchrun (``WORLD_SIZE``/``RANK``) or MPI (``PMI_*``, Open MPI's ``OMPI_COMM_WORLD_*``,
MVAPICH's ``MV2_COMM_WORLD_*``).
"""

from __future__ import annotations

import os

import torch

from .errors import ConfigError

_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for n in names:
        v = os.environ.get(n, "").strip()
        if v.lstrip("-").isdigit():
            return int(v)
    return default


def _own_gpu(device: torch.device) -> torch.device:
    """A CUDA device without an index: this process's GPU (its local rank) - one GPU per process."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", max(0, _env_int(_LOCAL_RANK_VARS, 0)))
    return device


def distributed_context(rank: int | None, world_size: int | None, device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device): explicit values, else accelerate's when launched by it.

    Under ``accelerate launch`` (torchrun or MPI environment variables) accelerate's
    ``PartialState`` gives the process index and, on GPUs, this process's device. On a CPU
    run ``PartialState`` must be told so (``cpu=True``, gloo), otherwise it sees no
    distributed setup; if it still disagrees with the launcher's variables those are used.
    Launched, a CUDA device without an index that accelerate does not resolve becomes this
    process's GPU (its local rank).
    """
    if rank is not None or (world_size or 1) > 1:
        return int(rank or 0), int(world_size or 1), device
    env_world = _env_int(_WORLD_VARS, 1)
    if env_world > 1:
        from accelerate import PartialState

        st = PartialState(cpu=device.type != "cuda")
        if st.num_processes == env_world:
            dev = st.device if device.type == st.device.type else _own_gpu(device)
            return st.process_index, st.num_processes, dev
        env_rank = _env_int(_RANK_VARS, -1)
        if 0 <= env_rank < env_world:
            return env_rank, env_world, _own_gpu(device)
        raise ConfigError(f"launched as one of {env_world} processes but this process's rank is unknown "
                          f"(none of {', '.join(_RANK_VARS)} is set)")
    return 0, 1, device
