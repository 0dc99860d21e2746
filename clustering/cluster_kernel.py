"""Which AWC iteration runs: the compiled popcount kernel (:mod:`awq.kernels.cluster`) or the torch reference
(:func:`clustering.awc_iteration.torch_block`, with the distance GEMM of :mod:`clustering.distance`).

:func:`awc_kernel`: ``kernel=`` / ``$AWQ_KERNEL_AWC`` (``popcount`` or ``gemm``); ``int8`` / ``fp32`` name the
torch path with that distance GEMM; otherwise, when the extension builds, a short one-time measurement of both
on a small block, cached and logged by :func:`awq.kernels.hw.choose` (key ``awc``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from awq.kernels import hw
from awq.kernels.cluster import awc_block, kernel
from awq.util import env
from clustering.awc_iteration import torch_block

AWC_KERNELS = ("popcount", "gemm")  # compiled popcount iteration / torch iteration with the overlap GEMM
GEMM_NAMES = ("int8", "fp32")  # explicit distance GEMMs of the torch path


def awc_kernel(kernel_arg: Optional[str] = None) -> str:
    """``"popcount"`` (compiled iteration) or ``"gemm"`` (torch iteration); see the module docstring."""
    if kernel_arg in GEMM_NAMES:
        return "gemm"
    forced = kernel_arg if kernel_arg not in (None, "", "auto") else env.get_str("AWQ_KERNEL_AWC")
    forced = None if forced in (None, "", "auto") else forced
    if forced == "popcount" and kernel() is None:
        raise ValueError("kernel 'popcount' needs the compiled AWC kernel, which could not be built here (see log)")
    if forced is None and kernel() is None:
        return "gemm"
    return hw.choose("awc", AWC_KERNELS, _awc_probes, forced)


def _awc_probes() -> dict[str, Callable[[], object]]:
    """A short measurement: one AWC block of typical shape on each path (float32 rows, as sources hand them)."""
    g = torch.Generator().manual_seed(0)
    X = (torch.rand(4096, 768, generator=g) < 0.5).float()
    C = (torch.rand(64, 768, generator=g) < 0.6).float()
    cap = X.shape[0] // C.shape[0]
    return {"popcount": lambda: awc_block(X, C, cap, False, True, 1, 0.4),
            "gemm": lambda: torch_block(X, C, cap, False, True, 1, 0.4, None)}
