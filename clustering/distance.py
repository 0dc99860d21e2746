"""The active-only distance of AWC for a whole block, on the kernel this machine runs fastest.

``D[n, K] = |a| - <a, c>`` for {0,1} rows ``a`` of ``X`` and centroids ``c`` of ``C``, exact float32,
equal element for element to :func:`awq.store.centroids.active_only_distance`.  One GEMM gives both terms:
the centroids are extended by a row of ones, so column ``K`` of ``X [C; 1]^T`` is the row sum
``|a|`` (no separate pass over ``X``).  On the CPU the GEMM is int8 (``torch._int_mm``, int32
accumulation) or fp32 (0/1 products, exact while sums stay below 2**24: guarded), as
:func:`awq.kernels.hw.overlap_kernel` picks by capability or a cached one-time measurement (``kernel=`` /
``$AWQ_KERNEL_OVERLAP`` override), or with ``kernel="popcount"`` the compiled kernel's
``popcount(a AND NOT c)`` on bit-packed rows (:mod:`clustering.cluster_kernel`).  Elsewhere the fp32 GEMM.
"""
from __future__ import annotations

from typing import Optional

import torch

from awq.kernels.cluster import kernel as compiled
from awq.kernels.hw import check_fp32_exact, overlap_kernel


def augmented_centroids(C: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[C; 1]`` as ``dtype`` ``[K + 1, F]`` (contiguous)."""
    out = torch.ones(C.shape[0] + 1, C.shape[1], dtype=dtype, device=C.device)
    out[:-1].copy_(C)
    return out


def block_distance(X: torch.Tensor, C: torch.Tensor, kernel: Optional[str] = None) -> torch.Tensor:
    """``|a| - <a, c>`` for every row of {0,1} ``X [n, F]`` and ``C [K, F]``: float32 ``[n, K]``, exact."""
    n, F = X.shape
    k = C.shape[0]
    C = C.to(X.device)
    if n == 0 or k == 0:
        return torch.zeros(n, k, dtype=torch.float32, device=X.device)
    if kernel == "popcount" and X.device.type == "cpu":  # the compiled kernel's distance (bit-packed rows)

        mod = compiled()
        if mod is None:
            raise ValueError("kernel 'popcount' needs the compiled AWC kernel, which could not be built here")
        return mod.distance(mod.pack_rows(X.contiguous()), mod.pack_rows(C.contiguous())).to(torch.float32)
    use = overlap_kernel(None if kernel == "popcount" else kernel, F) if X.device.type == "cpu" else "fp32"
    if use == "int8":
        Xi = X if X.dtype == torch.int8 else X.to(torch.int8)
        G = torch._int_mm(Xi, augmented_centroids(C, torch.int8).T)  # int32 [n, K+1], exact
    else:
        check_fp32_exact(F)
        Xf = X if X.dtype == torch.float32 else X.float()
        G = Xf @ augmented_centroids(C, torch.float32).T  # fp32 [n, K+1], exact below 2**24
    D = torch.sub(G[:, k:], G[:, :k])
    return D if D.dtype == torch.float32 else D.to(torch.float32)
