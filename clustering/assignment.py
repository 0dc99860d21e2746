"""Balanced assignments of AWC (see :mod:`clustering.activation_aware_clustering` for the rules):
the artifact's centroid-order ``greedy`` and the order-independent ``global`` proposal rounds.

Both take a distance matrix ``D [n, k]`` and a cap per centroid and return int64 labels (-1 = left
over); both are exact re-implementations checked against plainly written references in
``tests/test_clustering.py`` and ``tests/test_hw_clustering.py``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def greedy_balanced_assign(D: torch.Tensor, cap: int, lookahead: int = 4, chunk: int = 256) -> torch.Tensor:
    """Artifact's centroid-order greedy with a stable tie rule. ``D`` [n, k] -> labels (-1 = left over).

    Centroid ``i`` (in index order) takes the ``cap`` still-unassigned rows with the smallest
    ``D[:, i]`` (ties -> lower row).  Exact, computed as: one batched top-k gives every centroid
    its ``lookahead * cap`` best free rows (keys ``d * n + row`` are unique, so order = stable
    sort), ``chunk`` centroids at a time; a sequential pass over centroids (inherently
    sequential -- small numpy ops on the candidate lists only) takes the first ``cap`` candidates
    that are still free.  When a list runs dry, the lists of the next ``chunk`` centroids are
    recomputed over the remaining free rows with twice the lookahead.
    """
    n, k = D.shape
    dev = D.device
    if cap <= 0:
        return torch.full((n,), -1, dtype=torch.int64, device=dev)
    labels = np.full(n, -1, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    left, i = n, 0
    cand: np.ndarray = np.empty((0, 0), dtype=np.int64)
    base, complete, L0 = 0, False, lookahead * cap + 8
    L = L0
    while i < k and left > 0:
        m = min(cap, left)
        free = None
        if i - base < cand.shape[0]:
            c = cand[i - base]
            free = c[~taken[c]]
        if free is None or (free.shape[0] < m and not complete):
            # (re)build the lists of the next `chunk` centroids over the free rows; a list that ran
            # dry doubles the lookahead for the rebuilt window
            L = L0 if free is None else 2 * L
            free_rows = torch.from_numpy(np.nonzero(~taken)[0]).to(dev)
            Lr = min(L, free_rows.numel())
            complete = Lr == free_rows.numel()
            c1 = min(i + chunk, k)
            sub = D[:, i:c1] if free_rows.numel() == n else D[free_rows, i:c1]
            keys = sub.T.contiguous().to(torch.int64).mul_(n).add_(free_rows)
            idx = torch.topk(keys, Lr, dim=1, largest=False, sorted=True).indices
            cand, base = free_rows[idx].cpu().numpy(), i
            c = cand[0]
            free = c[~taken[c]]
        pick = free[:m]
        labels[pick] = i
        taken[pick] = True
        left -= m
        i += 1
    return torch.from_numpy(labels).to(dev)


def global_balanced_assign(D: torch.Tensor, cap: int) -> torch.Tensor:
    """Order-independent balanced assignment by proposal rounds (see module doc). -1 = left over.

    ``D`` holds finite integer-valued distances (as the active-only distance does).  Round 1 proposes
    every row's first minimum over all of ``D``.  Later rounds work on a private copy of the pending
    rows' distances, compacted as rows get accepted, in which the columns of full centroids are set
    to +inf; when fewer than half of its columns still have capacity, those columns are compacted away
    (ascending, so a first minimum is still the lowest available index).  A row's proposal is thus
    always the first minimum over the centroids with capacity.  On the CPU this runs in numpy (its
    row-wise ``argmin`` is several times faster than ``torch.min(dim=1)``, and its small ops cost
    less per call), elsewhere in torch; both give the same labels.
    """
    n, k = D.shape
    if D.device.type == "cpu":
        Dn = D.detach().numpy() if D.dtype in (torch.float32, torch.float64) else D.detach().float().numpy()
        return torch.from_numpy(_global_assign_numpy(Dn, cap))
    return _global_assign_torch(D, cap)


def _global_assign_numpy(D: np.ndarray, cap: int) -> np.ndarray:
    n, k = D.shape
    labels = np.full(n, -1, dtype=np.int64)
    if cap <= 0 or n == 0 or k == 0:
        return labels
    remaining = np.full(k, cap, dtype=np.int64)
    rows = np.arange(n)
    prop = D.argmin(1)  # first minimal index = lowest centroid on ties
    d = np.take_along_axis(D, prop[:, None], 1)[:, 0]
    Dm: Optional[np.ndarray] = None
    colmap = np.arange(k)
    dead = np.zeros(k, dtype=bool)
    while True:
        di = d.astype(np.int64)
        key = prop * (int(di.max()) + 1) + di
        order = np.argsort(key, kind="stable")  # rows increasing: (centroid, distance, row) order
        ps = prop[order]
        cnt = np.bincount(ps, minlength=k)
        start = np.cumsum(cnt) - cnt
        acc = (np.arange(order.size) - start[ps]) < remaining[ps]
        labels[rows[order[acc]]] = ps[acc]
        remaining -= np.bincount(ps[acc], minlength=k)
        rejected = np.zeros(rows.size, dtype=bool)
        rejected[order[~acc]] = True
        rows = rows[rejected]
        if rows.size == 0:
            break
        avail = remaining[colmap] > 0
        n_avail = int(avail.sum())
        if n_avail == 0:
            break
        Dm = D[rows] if Dm is None else Dm[rejected]  # contiguous row copies
        if 2 * n_avail < colmap.size:
            keep = np.flatnonzero(avail)
            Dm = np.take(Dm, keep, axis=1)
            colmap, dead, avail = colmap[keep], dead[keep], avail[keep]
        newly = ~avail & ~dead
        if newly.any():
            np.add(Dm, np.where(newly, np.inf, 0.0).astype(Dm.dtype), out=Dm)  # one broadcast pass: full -> +inf
            dead |= newly
        j = Dm.argmin(1)
        d = np.take_along_axis(Dm, j[:, None], 1)[:, 0]
        prop = colmap[j]
    return labels


def _global_assign_torch(D: torch.Tensor, cap: int) -> torch.Tensor:
    n, k = D.shape
    dev = D.device
    labels = torch.full((n,), -1, dtype=torch.int64, device=dev)
    if cap <= 0 or n == 0 or k == 0:
        return labels
    remaining = torch.full((k,), cap, dtype=torch.int64, device=dev)
    rows = torch.arange(n, device=dev)
    d, prop = D.min(1)  # round 1: every centroid has capacity; min -> first minimal index (lowest centroid)
    Dm: Optional[torch.Tensor] = None  # distances of the pending rows to the centroids in `colmap`
    colmap = torch.arange(k, device=dev)
    dead = torch.zeros(k, dtype=torch.bool, device=dev)  # columns of Dm already set to +inf
    while True:
        # accept: each centroid takes its proposals in (distance, row) order up to its remaining capacity;
        # rows are increasing, so a stable sort by (centroid, distance) gives that order
        di = d.to(torch.int64)
        key = prop * (int(di.max()) + 1) + di
        order = torch.sort(key, stable=True).indices
        ps = prop[order]
        cnt = torch.bincount(ps, minlength=k)
        start = torch.cumsum(cnt, 0) - cnt
        acc = (torch.arange(order.numel(), device=dev) - start[ps]) < remaining[ps]
        labels[rows[order[acc]]] = ps[acc]
        remaining -= torch.bincount(ps[acc], minlength=k)
        rejected = torch.zeros(rows.numel(), dtype=torch.bool, device=dev)
        rejected[order[~acc]] = True
        rows = rows[rejected]  # keeps increasing row order
        if rows.numel() == 0:
            break
        avail = remaining[colmap] > 0
        n_avail = int(avail.sum())
        if n_avail == 0:
            break
        # propose: first minimum over the centroids that still have capacity
        Dm = D.index_select(0, rows) if Dm is None else Dm[rejected]
        if 2 * n_avail < colmap.numel():
            keep = torch.nonzero(avail).flatten()
            Dm = Dm.index_select(1, keep)
            colmap, dead, avail = colmap[keep], dead[keep], avail[keep]
        newly = ~avail & ~dead
        if bool(newly.any()):
            Dm.index_fill_(1, torch.nonzero(newly).flatten(), float("inf"))
            dead |= newly
        d, j = Dm.min(1)
        prop = colmap[j]
    return labels
