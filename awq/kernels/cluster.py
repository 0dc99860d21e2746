"""The compiled AWC iteration (``csrc/cluster_kernels.cpp``): build flags, loading and the call.

The kernel bit-packs the {0,1} block (64 neurons per ``uint64`` word), computes the active-only
distance ``|a| - <a, c> = popcount(a AND NOT c)`` word by word (one ``popcnt`` instruction per 64
neurons, exact int32), and runs the balanced assignment, the leftovers, the objective, the member
counts (byte counters on the packed words) and the centroid update in one call.  Its results are
bit-identical to the torch reference (:func:`clustering.awc_iteration.torch_block`: same labels, objective and
centroids; the update calls the same ATen ops).  It covers one CPU process (no torch.distributed).

Build flags: ``-march`` as every C++ kernel of the project (:func:`awq.kernels.build.march_flag`:
native, or with ``AWQ_HW_FLAGS="avx2 fma"`` a real AVX2-only ``-march=haswell`` build on any x86 CPU,
under its own build key).
"""
from __future__ import annotations

import logging
from types import ModuleType
from typing import Optional

import torch

from awq.kernels.build import load_cpp_extension, march_flag
from awq.util import env

log = logging.getLogger(__name__)

_state: dict[tuple, Optional[ModuleType]] = {}  # build flags -> module (None: cannot be built)
_by_env: dict[Optional[str], Optional[ModuleType]] = {}  # $AWQ_HW_FLAGS -> module


def build_flags() -> list[str]:
    """Compiler flags for this process's view of the CPU (``-march`` by :func:`awq.kernels.build.march_flag`);
    no FMA contraction: the update's float arithmetic must round like torch's."""
    return ["-O3", "-fopenmp", "-ffp-contract=off", march_flag()]


def kernel() -> Optional[ModuleType]:
    """The compiled module for the current flags, or None if it cannot be built (logged once)."""
    flags = env.get_str("AWQ_HW_FLAGS")  # the only input of build_flags that can change in a process
    if flags in _by_env:
        return _by_env[flags]
    cflags = build_flags()
    key = tuple(cflags)
    if key not in _state:
        mod = load_cpp_extension("awq_cluster", "cluster_kernels.cpp", cflags, ["-fopenmp"], what="AWC iteration")
        if mod is not None:
            log.info("AWC iteration C++ kernel: %s build (%s)", mod.simd(), " ".join(cflags))
        _state[key] = mod
    _by_env[flags] = _state[key]
    return _state[key]


def awc_block(X: torch.Tensor, C: torch.Tensor, cap: int, greedy: bool, nearest: bool, t: int, p: float,
              chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor, float, int, int]:
    """One AWC block on the compiled kernel: ``(C', labels, objective, unassigned, empty clusters)``."""
    mod = kernel()
    if mod is None:
        raise RuntimeError("the compiled AWC kernel is not available")
    Xc = X if X.dtype in (torch.float32, torch.uint8) else X.to(torch.uint8)
    return mod.awc_block(Xc.contiguous(), C.to(torch.float32).contiguous(), int(cap), bool(greedy), bool(nearest),
                         int(t), float(p), int(chunk))
