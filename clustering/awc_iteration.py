"""One AWC iteration on a block, on torch ops: distances, balanced assignment, objective and centroid update.

The reference the compiled iteration (:mod:`awq.kernels.cluster`, ``csrc/cluster_kernels.cpp``) is bit-identical
to, and the path AWC takes under torch.distributed or where the compiled one is slower (see
:mod:`clustering.activation_aware_clustering` for the rules).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from clustering.assignment import global_balanced_assign, greedy_balanced_assign
from clustering.distance import block_distance
from clustering.distributed import all_reduce_, dist_info, gather_slices, slice_bounds


def member_sums(X: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``S[i] = sum of the rows labelled i`` (rows labelled -1 are skipped), float32 ``[k, F]``."""
    S = torch.zeros(k, X.shape[1], dtype=torch.float32, device=X.device)
    ok = labels >= 0
    if bool(ok.all()):
        return S.index_add_(0, labels, X.float())
    keep = torch.nonzero(ok).flatten()
    return S.index_add_(0, labels[keep], X.index_select(0, keep).float())


def row_quantile(s: torch.Tensor, p: float) -> torch.Tensor:
    """Per-row quantile with linear interpolation, bit-identical to ``torch.quantile(s, p, dim=1)``
    (which refuses inputs above 16M elements).  Only the two order statistics at the interpolation
    ranks are needed: on the CPU they come from ``numpy.partition`` (linear time, the same values as
    a full sort), elsewhere from a sort."""
    q = torch.tensor(p, dtype=s.dtype, device=s.device)
    ranks = q * (s.shape[1] - 1)  # in s.dtype, as torch.quantile computes them
    below = ranks.long()
    above = ranks.ceil().long()
    w = ranks - below
    if s.device.type == "cpu" and s.numel() and s.dtype in (torch.float32, torch.float64):
        b, a = int(below), int(above)
        part = np.partition(s.detach().numpy(), [b, a] if a != b else [b], axis=1)
        vb = torch.from_numpy(np.ascontiguousarray(part[:, b]))
        va = torch.from_numpy(np.ascontiguousarray(part[:, a]))
    else:
        srt = s.sort(dim=1).values
        vb = srt[:, below]
        va = srt[:, above]
    return vb.lerp(va, w)


def awc_update(
    C: torch.Tensor, S: torch.Tensor, counts: torch.Tensor, t: int, cap: int, p: float, chunk: int = 2048
) -> torch.Tensor:
    """``C_i <- [s > quantile_p(s)]`` with ``s = (t*cap*C_i + cap*mean_i) / (t*cap + cap)`` for clusters
    with members (``S`` = member sums, ``counts`` = member counts); others keep ``C_i``."""
    out = C.clone()
    idx = torch.nonzero(counts > 0).flatten()
    w_hist, w_cur = t * cap, cap
    for s0 in range(0, idx.numel(), chunk):  # bounds the [chunk, F] sort buffer
        j = idx[s0 : s0 + chunk]
        mu = S[j] / counts[j].to(S.dtype)[:, None]
        s = (w_hist * C[j] + w_cur * mu) / (w_hist + w_cur)
        q = row_quantile(s, p)
        out[j] = (s > q[:, None]).to(C.dtype)
    return out


def torch_block(Xs: torch.Tensor, C: torch.Tensor, cap: int, greedy: bool, nearest: bool, t: int, p: float,
                kernel: Optional[str] = None, rows: Optional[tuple[int, int, int]] = None):
    """One AWC block on torch ops: ``(C', labels, objective, unassigned, empty clusters)``.  ``Xs`` is this
    rank's slice ``rows = (lo, hi, n)`` of the block (default: the whole block, one process); the distances
    are gathered and the member sums all-reduced across ranks."""
    lo, hi, n = rows if rows is not None else (0, Xs.shape[0], Xs.shape[0])
    rank, world = dist_info()
    k = C.shape[0]
    Ds = block_distance(Xs, C, kernel)  # this rank's rows [hi-lo, k]
    D = gather_slices(Ds, [e - s for s, e in slice_bounds(n, rank, world)])  # full block, identical on every rank
    lab = (greedy_balanced_assign if greedy else global_balanced_assign)(D, cap)
    miss = lab < 0
    if nearest and bool(miss.any()):
        lab[miss] = D[miss].argmin(1)
    ok = lab >= 0
    objective = float(D.gather(1, lab.clamp_min(0)[:, None])[ok].double().sum().item())  # exact
    # member sums over this rank's rows, all-reduced (exact integer counts in fp32)
    S = member_sums(Xs, lab[lo:hi], k)
    all_reduce_(S)
    counts = torch.bincount(lab[ok], minlength=k)
    C = awc_update(C, S, counts, t, cap, p)
    return C, lab, objective, int((~ok).sum().item()), int((counts == 0).sum().item())
