"""Fitting the intermediate-neuron cluster method: coverage k-means on |h| masks and the linear router.

**Coverage clustering** (:func:`fit_centroids`). Each calibration token ``n`` has non-negative
weights ``w[n, j]`` over the ``F`` intermediate neurons: its |h| share ``|h_nj| / sum_j |h_nj|``
(``weighting="mag"``, magnitude-aware: covering a large activation counts more) or its binary
active set ``|h_nj| >= t`` (``weighting="binary"``, AWC-like: every active neuron counts the same).
A centroid is a set of exactly ``s`` neurons (a boolean row of ``C``, ``[K, F]``); a token is
covered by its centroid's mass ``w[n] . C[k]``. Alternating maximisation of the total covered mass:

* assign: ``k(n) = argmax_k w[n] . C[k]``;
* update: ``C[k]`` = the ``s`` neurons with the largest summed weight over the tokens assigned to ``k``
  (the exact maximiser for a fixed assignment), ties broken by neuron index.

Neither step lowers the objective, so it stops at a fixed point or after ``iters`` rounds. Initial
centroids are the top-``s`` sets of ``K`` distinct tokens drawn with ``seed``; an empty cluster is
re-seeded from the worst-covered token. ``allowed`` (bool ``[F]``) restricts centroids to a subset
(the non-hot neurons).

**Router** (:func:`train_router`): ``logits = x W^T + b`` (``W``: ``[K, H]``) for the oracle
assignment: ridge least squares to the one-hot labels (closed form), then a few cross-entropy Adam
steps (minibatches drawn from ``seed``); inputs standardised during training and the scaling folded
back into ``W, b``. Deterministic for a seed on one machine.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from awq.methods.common import MethodError


def coverage_weights(habs: torch.Tensor, weighting: str, t: float = 0.0) -> torch.Tensor:
    """``[N, F]`` non-negative token weights from ``|h|``: row-normalised |h| ("mag") or ``|h| >= t`` ("binary")."""
    if weighting == "mag":
        return habs / habs.sum(1, keepdim=True).clamp_min(1e-30)
    if weighting == "binary":
        return (habs >= t).float()
    raise MethodError(f"weighting must be 'mag' or 'binary', got {weighting!r}")


def _top_set(scores: torch.Tensor, s: int, allowed: torch.Tensor | None) -> torch.Tensor:
    """Boolean rows with the ``s`` highest scores (``scores``: ``[K, F]``), only among ``allowed`` neurons."""
    sc = scores.double()
    if allowed is not None:
        sc = sc.masked_fill(~allowed, float("-inf"))
    # stable tie-break by neuron index: sort descending, stable
    idx = torch.sort(sc, dim=1, descending=True, stable=True).indices[:, :s]
    return torch.zeros(scores.shape, dtype=torch.bool).scatter_(1, idx, True)


def assign(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``argmax_k w[n] . C[k]`` (first maximum on ties) -> ``[N]`` long."""
    return (w @ centroids.float().T).argmax(1)


@torch.no_grad()
def fit_centroids(w: torch.Tensor, k: int, s: int, iters: int = 15, seed: int = 0,
                  allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Coverage k-means: ``(C [K, F] bool with s neurons each, assignment [N])`` maximising covered mass."""
    n, f = w.shape
    if k > n:
        raise MethodError(f"K={k} centroids but only {n} calibration tokens: lower K or raise --calib_tokens")
    if k < 1:
        raise MethodError(f"K must be >= 1, got {k}")
    n_allowed = f if allowed is None else int(allowed.sum())
    if not (1 <= s <= n_allowed):
        raise MethodError(f"centroid size {s} out of range [1, {n_allowed}] (density out of range)")
    w = w.float().cpu()
    g = torch.Generator().manual_seed(seed)
    c = _top_set(w[torch.randperm(n, generator=g)[:k]], s, allowed)
    lab = assign(w, c)
    for _ in range(iters):
        onehot = torch.zeros(k, n).index_put_((lab, torch.arange(n)), torch.ones(n))
        mass = onehot @ w  # [K, F] summed weight per cluster
        empty = onehot.sum(1) == 0
        if empty.any():
            cov = (w * c[lab].float()).sum(1) / w.sum(1).clamp_min(1e-30)
            worst = torch.argsort(cov, stable=True)[: int(empty.sum())]
            mass[empty] = w[worst]
        new_c = _top_set(mass, s, allowed)
        new_lab = assign(w, new_c)
        done = torch.equal(new_c, c) and torch.equal(new_lab, lab)
        c, lab = new_c, new_lab
        if done:
            break
    return c, lab


def covered_fraction(w: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over tokens of the share of their weight inside ``mask`` (``[N, F]`` bool)."""
    tot = w.sum(1).clamp_min(1e-30)
    return float(((w * mask.float()).sum(1) / tot).mean())


def train_router(x: torch.Tensor, labels: torch.Tensor, k: int, steps: int = 60, batch: int = 512,
                 lr: float = 1e-2, seed: int = 0, ridge: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear router ``x -> K`` logits for ``labels``; returns ``(W [K, H], b [K])``.

    Starts from the ridge least-squares fit to the one-hot labels (closed form, float64), then
    ``steps`` Adam steps of cross-entropy on minibatches drawn with ``seed``.
    """
    x = x.float().cpu()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xn = (x - mu) / sd
    n, hdim = xn.shape
    y = F.one_hot(labels, k).double()
    xd = xn.double()
    gram = xd.T @ xd + ridge * n * torch.eye(hdim, dtype=torch.float64)
    w0 = torch.linalg.solve(gram, xd.T @ (y - y.mean(0))).T  # [K, H]
    w = w0.float().clone().requires_grad_(True)
    b = y.mean(0).float().clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, n, (min(batch, n),), generator=g)
            loss = F.cross_entropy(F.linear(xn[idx], w, b), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    w_f = (w.detach() / sd).contiguous()
    return w_f, b.detach() - w_f @ mu
