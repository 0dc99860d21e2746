"""Benchmark one AWC iteration on one {0,1} block: the artifact's per-centroid loop (written plainly
below), this project's implementation, and scikit-learn's KMeans Lloyd iteration at the same size.

Prints seconds per iteration, the speedup over the reference, and the distance step's multiply-adds
per second as a fraction of a plain fp32 GEMM of the same shape.  The reference's distance loop is
timed on ``--ref_centroids`` centroids and extrapolated to ``k`` (said so in the output).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from awq.centroids import active_only_distance  # noqa: E402
from clustering.activation_aware_clustering import (  # noqa: E402
    awc_update,
    global_balanced_assign,
    greedy_balanced_assign,
    member_sums,
)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


# ---------------------------------------------------------------------------------------------
# the artifact's iteration, written the way the artifact writes it (one block, one "GPU")
# ---------------------------------------------------------------------------------------------
def ref_distances(X: torch.Tensor, C: torch.Tensor, centroids: int) -> torch.Tensor:
    D = torch.zeros(X.shape[0], centroids)
    for i in range(centroids):
        D[:, i] = torch.sum(torch.abs(X - C[i]) * X, dim=1)
    return D


def ref_assign(D: torch.Tensor, m: int) -> torch.Tensor:
    n, k = D.shape
    labels = torch.full((n,), -1, dtype=torch.long)
    unassigned = torch.arange(n)
    for i in range(k):
        if len(unassigned) == 0:
            break
        order = torch.argsort(D[unassigned, i])
        labels[unassigned[order[:m]]] = i
        unassigned = unassigned[order[m:]]
    return labels


def ref_update(X: torch.Tensor, C: torch.Tensor, labels: torch.Tensor, t: int, m: int, p: float) -> torch.Tensor:
    U = torch.zeros_like(C)
    for i in range(C.shape[0]):
        members = (labels == i).nonzero().flatten()
        if len(members) == 0:
            U[i] = C[i]
            continue
        mu = X[members].float().mean(0)
        s = (t * m * C[i] + m * mu) / (t * m + m)
        q = torch.quantile(s, p)
        U[i] = (s > q).float()
    return U


def main(n: int = 65536, width: int = 1536, k: int = 256, density: float = 0.5, sparsity: float = 0.4,
         ref_centroids: int = 8, repeats: int = 2, seed: int = 0, output: Optional[Path] = None,
         threads: Optional[int] = None) -> dict:
    """Run the benchmark and print the figures (``threads``: torch and scikit-learn thread count)."""
    if threads:
        torch.set_num_threads(threads)
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    g = torch.Generator().manual_seed(seed)
    X = (torch.rand(n, width, generator=g) < density).float()
    C = (torch.rand(k, width, generator=g) < 1 - sparsity).float()
    m = n // k
    print(f"sizes: n={n} rows, width F={width}, k={k}, cap m={m}, threads={torch.get_num_threads()}")
    res: dict = {"n": n, "width": width, "k": k, "threads": torch.get_num_threads()}

    # plain fp32 GEMM of the same shape
    gemm = best_of(lambda: X @ C.T, repeats)
    macs = n * width * k
    res["gemm_s"] = gemm
    res["gemm_gmacs"] = macs / gemm / 1e9
    Xi, Ci = X.to(torch.int8), C.to(torch.int8)
    gemm8 = best_of(lambda: torch._int_mm(Xi, Ci.T), repeats) if hasattr(torch, "_int_mm") else float("nan")
    res["int8_gemm_s"] = gemm8

    # this project's iteration
    D = active_only_distance(X, C)
    t_dist = best_of(lambda: active_only_distance(X, C), repeats)
    t_glob = best_of(lambda: global_balanced_assign(D, m), repeats)
    t_greedy = best_of(lambda: greedy_balanced_assign(D, m), repeats)
    lab = global_balanced_assign(D, m)

    def update() -> torch.Tensor:  # member sums + counts + top-percentile update, as in the iteration
        S = member_sums(X, lab, k)
        return awc_update(C, S, torch.bincount(lab[lab >= 0], minlength=k), 1, m, sparsity)

    t_upd = best_of(update, repeats)
    ours_global = t_dist + t_glob + t_upd
    ours_greedy = t_dist + t_greedy + t_upd
    res.update(dist_s=t_dist, assign_global_s=t_glob, assign_greedy_s=t_greedy, update_s=t_upd,
               iteration_global_s=ours_global, iteration_greedy_s=ours_greedy,
               dist_gmacs=macs / t_dist / 1e9, dist_fraction_of_gemm=gemm / t_dist)

    # reference (artifact) iteration: distance loop extrapolated from ref_centroids centroids
    rc = min(ref_centroids, k)
    t0 = time.perf_counter()
    ref_distances(X, C, rc)
    t_ref_dist = (time.perf_counter() - t0) * k / rc
    t0 = time.perf_counter()
    ref_lab = ref_assign(D, m)
    t_ref_assign = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_update(X, C, ref_lab, 1, m, sparsity)
    t_ref_upd = time.perf_counter() - t0
    ref_total = t_ref_dist + t_ref_assign + t_ref_upd
    res.update(ref_dist_s_extrapolated=t_ref_dist, ref_dist_centroids_timed=rc, ref_assign_s=t_ref_assign,
               ref_update_s=t_ref_upd, ref_iteration_s=ref_total)

    # scikit-learn KMeans, one Lloyd iteration from the same centroids
    from sklearn.cluster import KMeans

    Xn, Cn = X.numpy(), C.numpy()

    def sk() -> None:
        KMeans(n_clusters=k, init=Cn, n_init=1, max_iter=1, tol=0.0, algorithm="lloyd").fit(Xn)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_sk = best_of(sk, repeats)
    res["sklearn_lloyd_s"] = t_sk

    print(f"plain fp32 GEMM [{n}x{width}] @ [{width}x{k}]: {gemm:.3f} s = {res['gemm_gmacs']:.1f} GMAC/s")
    print(f"reference (artifact loop) iteration: {ref_total:.2f} s  (distance {t_ref_dist:.2f} s extrapolated from "
          f"{rc}/{k} centroids, greedy assignment {t_ref_assign:.2f} s, update {t_ref_upd:.2f} s)")
    print(f"this project, --assign global:  {ours_global:.3f} s/iteration  (distance {t_dist:.3f}, assignment "
          f"{t_glob:.3f}, update {t_upd:.3f})  speedup {ref_total / ours_global:.0f}x")
    print(f"this project, --assign greedy:  {ours_greedy:.3f} s/iteration  (assignment {t_greedy:.3f})  "
          f"speedup {ref_total / ours_greedy:.0f}x")
    print(f"distance step (incl. float->int8 conversion, row sums, subtraction): {res['dist_gmacs']:.1f} GMAC/s = "
          f"{100 * res['dist_fraction_of_gemm']:.0f}% of the plain fp32 GEMM rate "
          f"({100 * gemm8 / t_dist:.0f}% of a bare int8 GEMM of the same shape, {macs / gemm8 / 1e9:.1f} GMAC/s)")
    print(f"scikit-learn KMeans (lloyd, 1 iteration, same n/F/k): {t_sk:.3f} s/iteration  -> ours (global) is "
          f"{t_sk / ours_global:.2f}x its speed")
    if output:
        output.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=65536, help="rows in the block (default 65536 = one artifact chunk)")
    p.add_argument("--width", type=int, default=1536, help="pattern width F (default 1536 = SmolLM2-135M intermediate)")
    p.add_argument("--k", type=int, default=256, help="number of centroids (default 256)")
    p.add_argument("--density", type=float, default=0.5, help="fraction of ones in the random block")
    p.add_argument("--sparsity", type=float, default=0.4, help="AWC centroid sparsity p")
    p.add_argument("--ref_centroids", type=int, default=8, help="centroids timed in the reference distance loop")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats (best of)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--output", type=Path, default=None, help="also write the figures as JSON")
    p.add_argument("--threads", type=int, default=None, help="threads for torch and scikit-learn (default: torch's)")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    main(a.n, a.width, a.k, a.density, a.sparsity, a.ref_centroids, a.repeats, a.seed, a.output, a.threads)
