"""The compiled AWC iteration (``csrc/cluster_kernels.cpp``): loading, build flags, and the kernel choice.

The kernel bit-packs the {0,1} block (64 neurons per ``uint64`` word), computes the active-only
distance ``|a| - <a, c> = popcount(a AND NOT c)`` word by word (one ``popcnt`` instruction per 64
neurons, exact int32), and runs the balanced assignment, the leftovers, the objective, the member
counts (byte counters on the packed words) and the centroid update in one call.  Its results are
bit-identical to the torch path (same labels, objective and centroids; the update calls the same ATen
ops).  It covers one CPU process (no torch.distributed); other cases use the torch path.

Build flags: ``-march`` as every C++ kernel of the project (:func:`awq.kernel_build.march_flag`:
native, or with ``AWQ_HW_FLAGS="avx2 fma"`` a real AVX2-only ``-march=haswell`` build on any x86 CPU,
under its own build key).

Which iteration AWC runs (:func:`awc_kernel`): ``kernel=`` / ``$AWQ_KERNEL_AWC`` (``popcount`` or
``gemm``); ``int8`` / ``fp32`` name the torch path with that distance GEMM; otherwise, when the
extension builds, a short one-time measurement of both on a small block, cached and logged by
:func:`awq.hw.choose` (key ``awc``).
"""
from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Callable, Optional

import torch

from awq import hw
from awq.kernel_build import load_cpp_extension, march_flag

log = logging.getLogger(__name__)

AWC_KERNELS = ("popcount", "gemm")  # compiled popcount iteration / torch iteration with the overlap GEMM
GEMM_NAMES = ("int8", "fp32")  # explicit distance GEMMs of the torch path
_state: dict[tuple, Optional[ModuleType]] = {}  # build flags -> module (None: cannot be built)
_by_env: dict[Optional[str], Optional[ModuleType]] = {}  # $AWQ_HW_FLAGS -> module


def build_flags() -> list[str]:
    """Compiler flags for this process's view of the CPU (``-march`` by :func:`awq.kernel_build.march_flag`);
    no FMA contraction: the update's float arithmetic must round like torch's."""
    return ["-O3", "-fopenmp", "-ffp-contract=off", march_flag()]


def kernel() -> Optional[ModuleType]:
    """The compiled module for the current flags, or None if it cannot be built (logged once)."""
    env = os.environ.get("AWQ_HW_FLAGS")  # the only input of build_flags that can change in a process
    if env in _by_env:
        return _by_env[env]
    cflags = build_flags()
    key = tuple(cflags)
    if key not in _state:
        mod = load_cpp_extension("awq_cluster", "cluster_kernels.cpp", cflags, ["-fopenmp"], what="AWC iteration")
        if mod is not None:
            log.info("AWC iteration C++ kernel: %s build (%s)", mod.simd(), " ".join(cflags))
        _state[key] = mod
    _by_env[env] = _state[key]
    return _state[key]


def awc_kernel(kernel_arg: Optional[str] = None) -> str:
    """``"popcount"`` (compiled iteration) or ``"gemm"`` (torch iteration); see the module docstring."""
    if kernel_arg in GEMM_NAMES:
        return "gemm"
    forced = kernel_arg if kernel_arg not in (None, "", "auto") else os.environ.get("AWQ_KERNEL_AWC")
    forced = None if forced in (None, "", "auto") else forced
    if forced == "popcount" and kernel() is None:
        raise ValueError("kernel 'popcount' needs the compiled AWC kernel, which could not be built here (see log)")
    if forced is None and kernel() is None:
        return "gemm"
    return hw.choose("awc", AWC_KERNELS, _awc_probes, forced)


def awc_block(X: torch.Tensor, C: torch.Tensor, cap: int, greedy: bool, nearest: bool, t: int, p: float,
              chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor, float, int, int]:
    """One AWC block on the compiled kernel: ``(C', labels, objective, unassigned, empty clusters)``."""
    mod = kernel()
    if mod is None:
        raise RuntimeError("the compiled AWC kernel is not available")
    Xc = X if X.dtype in (torch.float32, torch.uint8) else X.to(torch.uint8)
    return mod.awc_block(Xc.contiguous(), C.to(torch.float32).contiguous(), int(cap), bool(greedy), bool(nearest),
                         int(t), float(p), int(chunk))


def _awc_probes() -> dict[str, Callable[[], object]]:
    """A short measurement: one AWC block of typical shape on each path (float32 rows, as sources hand them)."""
    from clustering.activation_aware_clustering import torch_block

    g = torch.Generator().manual_seed(0)
    X = (torch.rand(4096, 768, generator=g) < 0.5).float()
    C = (torch.rand(64, 768, generator=g) < 0.6).float()
    cap = X.shape[0] // C.shape[0]
    return {"popcount": lambda: awc_block(X, C, cap, False, True, 1, 0.4),
            "gemm": lambda: torch_block(X, C, cap, False, True, 1, 0.4, None)}
