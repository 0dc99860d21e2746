"""Initial centres shared by select_centroids and the baselines: random rows and D1 (k-means++-style) seeding."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from awq.kernels.hw import overlap_kernel
from awq.store.centroids import overlap
from clustering.sources import Source


def random_rows(src: Source, k: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """``k`` distinct rows chosen uniformly (torch.randperm with ``seed``), in sampled order."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randperm(src.n_rows, generator=g)[:k].numpy()
    order = np.argsort(pos, kind="stable")
    X = src.read(pos[order], device)
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    return X[torch.from_numpy(inv).to(X.device)]


def seeding_sample(src: Source, n: Optional[int], seed: int, device: str = "cpu") -> torch.Tensor:
    """The first block (``n`` None) or ``n`` uniformly sampled rows (canonical order) as float."""
    if n is None:
        s, e = src.blocks()[0]
        return src.read_range(s, e, device)
    n = min(n, src.n_rows)
    pos = np.sort(np.random.default_rng(seed).choice(src.n_rows, size=n, replace=False))
    return src.read(pos, device)


def d1_seeding(
    X: torch.Tensor,
    k: int,
    first: torch.Tensor,
    gen: torch.Generator,
    *,
    batch: int = 1,
    sqrt: bool = False,
    floor: float = 0.0,
    qualify: Optional[torch.Tensor] = None,
    scan: int = 100,
) -> torch.Tensor:
    """k-means++-style D1 sampling on Hamming distance (``sqrt``: Euclidean) to the nearest centre.

    ``first`` = initial centre(s) ``[f, F]``.  Each round samples ``batch`` rows with probability
    proportional to the distance (entries <= 0 replaced by ``floor``; ``floor=0`` never re-picks a
    centre) and, with ``qualify`` given, moves each sample forward to the first qualifying row within
    ``scan`` rows (dropped when none).  ``batch=1`` is exact sequential D1; larger batches are the
    usual approximation (one GEMM per round).
    """
    X = X.float()
    nrm = X.sum(1)
    # overlap() operand in the dtype of the CPU kernel awq.kernels.hw picks (int8 or fp32), converted once
    Xo = X.to(torch.int8) if X.device.type == "cpu" and overlap_kernel(None, X.shape[1]) == "int8" else X
    C = [first.float().to(X.device)]
    dmin = (nrm[:, None] + C[0].sum(1)[None, :] - 2 * overlap(Xo, C[0])).min(1).values.clamp_min(0)
    have = first.shape[0]
    nxt = None
    if qualify is not None:
        # next qualifying row at or after i (n if none)
        n = X.shape[0]
        idx = torch.where(qualify.cpu(), torch.arange(n), torch.full((n,), n))
        nxt = torch.flip(torch.cummin(torch.flip(idx, [0]), 0).values, [0])
    while have < k:
        b = min(batch, k - have)
        w = dmin.sqrt() if sqrt else dmin
        w = torch.where(w > 0, w, torch.full_like(w, floor)).double().cpu()
        if float(w.sum()) <= 0:
            w = torch.ones_like(w)
        pick = torch.multinomial(w, b, replacement=True, generator=gen)
        if nxt is not None:
            j = nxt[pick]
            ok = (j < X.shape[0]) & (j <= pick + scan)
            pick = j[ok]
            if pick.numel() == 0:
                continue
        newc = X[pick.to(X.device)]
        C.append(newc)
        have += newc.shape[0]
        d = (nrm[:, None] + newc.sum(1)[None, :] - 2 * overlap(Xo, newc)).min(1).values.clamp_min(0)
        dmin = torch.minimum(dmin, d)
    return torch.cat(C, 0)[:k]
