"""Benchmark one AWC iteration on one {0,1} block: the artifact's per-centroid loop (written plainly
below), this project's implementation, and scikit-learn's KMeans Lloyd iteration at the same size.

All pieces are timed interleaved round-robin (bench/common.py: warm-up, then ``--repeats`` rounds
each running every piece once), medians with their spread.  Prints seconds per iteration, the
speedup over the reference and over scikit-learn, and the distance step's multiply-adds per second
against a plain fp32 GEMM and a bare int8 GEMM of the same shape.  The distance step *is* that int8
GEMM plus conversions, so its rate relative to the bare int8 GEMM has a roofline of 1.0x (a value
above it is flagged as a measurement error).  The reference's distance loop is timed on
``--ref_centroids`` centroids and extrapolated to ``k`` per round (said so in the output).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from awq.centroids import active_only_distance  # noqa: E402
from bench.common import Report, Timing, interleaved, parse_args, run_cli  # noqa: E402
from clustering.activation_aware_clustering import (  # noqa: E402
    awc_update,
    global_balanced_assign,
    greedy_balanced_assign,
    member_sums,
)


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


def _sum(*ts: Timing, scale: Sequence[float] = ()) -> Timing:
    """Per-round sum of timings (optionally each scaled)."""
    sc = list(scale) + [1.0] * (len(ts) - len(scale))
    return Timing([sum(f * t.samples[i] for f, t in zip(sc, ts)) for i in range(len(ts[0].samples))])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=65536, help="rows in the block (default 65536 = one artifact chunk)")
    p.add_argument("--width", type=int, default=1536, help="pattern width F (default 1536 = SmolLM2-135M intermediate)")
    p.add_argument("--k", type=int, default=256, help="number of centroids (default 256)")
    p.add_argument("--density", type=float, default=0.5, help="fraction of ones in the random block")
    p.add_argument("--sparsity", type=float, default=0.4, help="AWC centroid sparsity p")
    p.add_argument("--ref_centroids", type=int, default=8, help="centroids timed in the reference distance loop")
    p.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds, medians reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--output", type=Path, default=None, help="also write the figures and config as JSON")
    p.add_argument("--threads", type=int, default=None, help="threads for torch and scikit-learn (default: torch's)")
    p.add_argument("--no_sklearn", action="store_true", help="skip the scikit-learn comparison")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: n=2048, F=128, k=16, 2 rounds (checks the script, not the machine)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Report:
    """Run the benchmark, print the figures, return the :class:`bench.common.Report`."""
    p = build_parser()
    a = parse_args(p, argv, n=2048, width=128, k=16, ref_centroids=4, repeats=2, warmup=1)  # --quick: new defaults; explicit options win
    if min(a.n, a.width, a.k, a.ref_centroids, a.repeats) < 1 or (a.threads is not None and a.threads < 1):
        raise ValueError("--n, --width, --k, --ref_centroids, --repeats and --threads must be >= 1")
    if a.k > a.n:
        raise ValueError(f"--k {a.k} exceeds --n {a.n}")
    if not (0 < a.density <= 1 and 0 <= a.sparsity < 1):
        raise ValueError("--density must be in (0, 1] and --sparsity in [0, 1)")
    if a.output is not None:
        from awq.io import check_output_path

        check_output_path(a.output)
    if a.threads:
        torch.set_num_threads(a.threads)
        from threadpoolctl import threadpool_limits

        threadpool_limits(a.threads)
    n, width, k, sparsity = a.n, a.width, a.k, a.sparsity
    g = torch.Generator().manual_seed(a.seed)
    X = (torch.rand(n, width, generator=g) < a.density).float()
    C = (torch.rand(k, width, generator=g) < 1 - sparsity).float()
    m = n // k
    rc = min(a.ref_centroids, k)
    cfg = {kk: (str(v) if isinstance(v, Path) else v) for kk, v in vars(a).items()} | {"cap_m": m}
    rep = Report("bench_clustering", cfg)
    rep.emit(f"# sizes: n={n} rows, width F={width}, k={k}, cap m={m}")

    Xi, Ci = X.to(torch.int8), C.to(torch.int8)
    D = active_only_distance(X, C)
    lab = global_balanced_assign(D, m)
    ref_lab = ref_assign(D, m)

    def update() -> torch.Tensor:  # member sums + counts + top-percentile update, as in the iteration
        S = member_sums(X, lab, k)
        return awc_update(C, S, torch.bincount(lab[lab >= 0], minlength=k), 1, m, sparsity)

    fns = {"gemm_fp32": lambda: X @ C.T, "gemm_int8": lambda: torch._int_mm(Xi, Ci.T),
           "distance": lambda: active_only_distance(X, C), "assign_global": lambda: global_balanced_assign(D, m),
           "assign_greedy": lambda: greedy_balanced_assign(D, m), "update": update,
           "ref_distance_partial": lambda: ref_distances(X, C, rc), "ref_assign": lambda: ref_assign(D, m),
           "ref_update": lambda: ref_update(X, C, ref_lab, 1, m, sparsity)}
    if not a.no_sklearn:
        from sklearn.cluster import KMeans

        Xn, Cn = X.numpy(), C.numpy()

        def sk() -> None:  # one Lloyd iteration from the same centroids
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                KMeans(n_clusters=k, init=Cn, n_init=1, max_iter=1, tol=0.0, algorithm="lloyd").fit(Xn)

        fns["sklearn_lloyd"] = sk
    t = interleaved(fns, a.repeats, a.warmup)
    t["ref_distance"] = t["ref_distance_partial"].scaled(k / rc)
    t["ours_global"] = _sum(t["distance"], t["assign_global"], t["update"])
    t["ours_greedy"] = _sum(t["distance"], t["assign_greedy"], t["update"])
    t["reference"] = _sum(t["ref_distance"], t["ref_assign"], t["ref_update"])
    macs = n * width * k
    for name in ("gemm_fp32", "gemm_int8", "distance", "assign_global", "assign_greedy", "update", "ours_global",
                 "ours_greedy", "ref_distance", "ref_assign", "ref_update", "reference", "sklearn_lloyd"):
        if name in t:
            rep.timing(name, t[name], echo=False)
    med = {kk: v.median for kk, v in t.items()}
    for name in ("gemm_fp32", "gemm_int8", "distance"):
        rep.figure(f"{name}_gmacs", macs / med[name] / 1e9)
    rep.emit(f"plain fp32 GEMM [{n}x{width}] @ [{width}x{k}]: {med['gemm_fp32']:.4f} s = "
             f"{macs / med['gemm_fp32'] / 1e9:.1f} GMAC/s; bare int8 GEMM {med['gemm_int8']:.4f} s = "
             f"{macs / med['gemm_int8'] / 1e9:.1f} GMAC/s (medians)")
    rep.emit(f"reference (artifact loop) iteration: {med['reference']:.3f} s  (distance {med['ref_distance']:.3f} s "
             f"extrapolated from {rc}/{k} centroids, greedy assignment {med['ref_assign']:.3f} s, update "
             f"{med['ref_update']:.3f} s)")
    for kind in ("global", "greedy"):
        rep.emit(f"this project, --assign {kind}: {med[f'ours_{kind}']:.4f} s/iteration  (distance "
                 f"{med['distance']:.4f}, assignment {med[f'assign_{kind}']:.4f}, update {med['update']:.4f})")
        rep.ratio(f"ours ({kind}) vs reference", t["reference"], t[f"ours_{kind}"], None,
                  note="algorithmic: no byte roofline")
    rep.emit(f"distance step (incl. float->int8 conversion, row sums, subtraction): "
             f"{macs / med['distance'] / 1e9:.1f} GMAC/s = {100 * med['gemm_fp32'] / med['distance']:.0f}% of the "
             f"plain fp32 GEMM rate")
    rep.ratio("distance rate / bare int8 GEMM rate", t["gemm_int8"], t["distance"], 1.0, what="rate",
              note="the distance step is that GEMM plus conversions")
    if "sklearn_lloyd" in t:
        rep.emit(f"scikit-learn KMeans (lloyd, 1 iteration, same n/F/k): {med['sklearn_lloyd']:.4f} s/iteration")
        rep.ratio("ours (global) vs scikit-learn Lloyd", t["sklearn_lloyd"], t["ours_global"], None,
                  note="different algorithm at the same size: no roofline")
    rep.write(a.output)
    return rep


def cli(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
