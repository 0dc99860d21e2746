"""torch.distributed helpers (no-ops with one process).

Under ``torchrun`` (``WORLD_SIZE > 1``) every block's rows are split into ``world_size``
contiguous slices; rank ``r`` reads and processes slice ``r``.  Estimators all-reduce per-centroid
sums (exact: integer counts in fp32) and all-gather what the (replicated, deterministic)
assignment needs, so the result does not depend on the number of processes.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> tuple[int, int]:
    """Initialise the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist_info()


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place."""
    if dist_info()[1] > 1:
        dist.all_reduce(t)
    return t


def gather_slices(t: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Concatenate every rank's slice (rank order) along dim 0; ``sizes`` = rows of each slice."""
    rank, world = dist_info()
    if world == 1:
        return t
    mx = max(sizes)
    pad = t.new_zeros((mx,) + tuple(t.shape[1:]))
    pad[: t.shape[0]] = t
    out = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(out, pad)
    return torch.cat([o[:s] for o, s in zip(out, sizes)], 0)


def slice_bounds(n: int, rank: int, world: int) -> list[tuple[int, int]]:
    """The contiguous ``[lo, hi)`` slice of ``n`` rows of every rank."""
    return [(n * r // world, n * (r + 1) // world) for r in range(world)]
