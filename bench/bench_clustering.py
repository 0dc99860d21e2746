"""Benchmark one AWC iteration on one {0,1} block: the artifact's per-centroid loop (written plainly
below), this project's implementation, and scikit-learn's Lloyd iteration on the same data and K.

All pieces are timed interleaved round-robin (bench/common.py: warm-up, then ``--repeats`` rounds
each running every piece once), medians with their spread.  Like with like: "this project" is one
whole AWC iteration (distance, balanced assignment, centroid update) timed as one call, and
"scikit-learn Lloyd iteration" is one call of scikit-learn's own per-iteration kernel
(``lloyd_iter_chunked_dense``: distances, labels, centre update) on the same float32 block, the
same starting centroids and the same thread count; ``KMeans(max_iter=1).fit`` (the public call,
which adds input checks and a second labelling pass) is timed beside it.  Our iteration runs on both
paths: the compiled popcount iteration (``csrc/cluster_kernels.cpp``, :mod:`clustering.cluster_kernel`)
and the torch iteration, whose distance GEMM (int8 ``torch._int_mm`` or fp32) is the one
:func:`awq.kernels.hw.overlap_kernel` picks here; "ours" is the path AWC itself takes
(:func:`clustering.cluster_kernel.awc_kernel`: ``--kernel`` or a cached one-time measurement; printed),
and the two paths are checked to give identical centroids.  ``AWQ_HW_FLAGS="avx2 fma"`` makes every
choice and the compiled kernel's build (``-march=haswell``) those of an AVX2-only CPU.  The distance step's
rate is printed against a bare GEMM
of the chosen kind (roofline 1.0x: the step is that GEMM plus a subtraction).  The reference's
distance loop is timed on ``--ref_centroids`` centroids and extrapolated to ``k`` per round.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from awq.kernels.cluster import awc_block, build_flags  # noqa: E402
from awq.kernels.cluster import kernel as compiled_kernel
from awq.kernels.hw import SMALL_BLOCK, cpu_flags, overlap_kernel, overlap_reason, threads_for  # noqa: E402
from awq.util.cli import opt  # noqa: E402
from bench.common import Report, Timing, interleaved, parse_bench, run_cli  # noqa: E402
from clustering.assignment import global_balanced_assign, greedy_balanced_assign  # noqa: E402
from clustering.awc_iteration import awc_update, member_sums  # noqa: E402
from clustering.cluster_kernel import awc_kernel  # noqa: E402
from clustering.distance import block_distance  # noqa: E402


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


def sklearn_lloyd_iteration(X, C, threads: int):
    """One call of scikit-learn's per-iteration Lloyd kernel (labels + centre update) from centres ``C``,
    or None when this scikit-learn lacks it (private API)."""
    import numpy as np

    try:
        from sklearn.cluster._k_means_lloyd import lloyd_iter_chunked_dense
    except ImportError:
        return None
    from threadpoolctl import ThreadpoolController

    n, k = X.shape[0], C.shape[0]
    sw = np.ones(n, dtype=X.dtype)
    ctl = ThreadpoolController()

    def it() -> None:
        # as KMeans.fit runs it: BLAS single-threaded inside scikit-learn's own OpenMP loop over chunks
        with ctl.limit(limits=1, user_api="blas"):
            lloyd_iter_chunked_dense(X, sw, C, np.zeros_like(C), np.zeros(k, X.dtype), np.full(n, -1, np.int32),
                                     np.zeros(k, X.dtype), threads)

    return it


@dataclass
class ClusteringBenchConfig:
    """Options of ``python bench/bench_clustering.py``."""

    n: int = opt(65536, help="rows in the block (default 65536 = one artifact chunk)", min=1)
    width: int = opt(1536, help="pattern width F (default 1536 = SmolLM2-135M intermediate)", min=1)
    k: int = opt(256, help="number of centroids (default 256)", min=1)
    density: float = opt(0.5, help="fraction of ones in the random block, in (0, 1]", gt=0, max=1, kind="fraction")
    sparsity: float = opt(0.4, help="AWC centroid sparsity p, a fraction in [0, 1)", min=0, lt=1, kind="fraction")
    ref_centroids: int = opt(8, help="centroids timed in the reference distance loop", min=1)
    repeats: int = opt(3, help="timed interleaved rounds, medians reported (default 3)", min=1)
    warmup: int = opt(1, help="untimed rounds before timing (default 1)", min=0)
    seed: int = opt(0, help="random seed", kind="seed")
    kernel: str = opt("auto", choices=("auto", "popcount", "int8", "fp32"),
                      help="AWC's path: auto (default: the compiled popcount iteration or the torch one, as AWC picks "
                           "here, printed), popcount (compiled), int8 or fp32 (torch iteration with that distance GEMM)")
    block_threads: str = opt("auto", choices=("auto", "1", "all"),
                             help="threads of our iteration on blocks under 2M values: auto (default: awq.kernels.hw's "
                                  "cached choice), 1 or all")
    output: Optional[Path] = opt(None, help="also write the figures and config as JSON", kind="out_file")
    threads: Optional[int] = opt(None, help="threads for torch and scikit-learn (default: torch's)", min=1)
    no_sklearn: bool = opt(False, help="skip the scikit-learn comparison")
    quick: bool = opt(False, help="smoke run: n=2048, F=128, k=16, 5 rounds (checks the script, not the machine)")


def main(argv: Optional[Sequence[str]] = None) -> Report:
    """Run the benchmark, print the figures, return the :class:`bench.common.Report`."""
    a = parse_bench(ClusteringBenchConfig, argv, description=__doc__.split("\n\n")[0],
                    n=2048, width=128, k=16, ref_centroids=4, repeats=5, warmup=1)  # --quick: new defaults; explicit options win
    if a.k > a.n:
        raise ValueError(f"--k {a.k} exceeds --n {a.n}")
    if a.output is not None:
        from awq.util.io import check_output_path

        check_output_path(a.output)
    if a.threads:
        torch.set_num_threads(a.threads)
        from threadpoolctl import threadpool_limits

        threadpool_limits(a.threads)
    n, width, k, sparsity = a.n, a.width, a.k, a.sparsity
    gemm_arg = a.kernel if a.kernel in ("int8", "fp32") else None
    kern = overlap_kernel(gemm_arg, width)  # chosen (or measured once and cached) before any timing
    path = awc_kernel(a.kernel)  # AWC's own choice: compiled popcount or torch iteration
    mod = compiled_kernel()
    g = torch.Generator().manual_seed(a.seed)
    X = (torch.rand(n, width, generator=g) < a.density).float()
    C = (torch.rand(k, width, generator=g) < 1 - sparsity).float()
    m = n // k
    rc = min(a.ref_centroids, k)
    cfg = {kk: (str(v) if isinstance(v, Path) else v) for kk, v in vars(a).items()} | {"cap_m": m, "kernel_used": kern}
    rep = Report("bench_clustering", cfg)
    rep.emit(f"# sizes: n={n} rows, width F={width}, k={k}, cap m={m}")
    rep.emit(f"CPU flags acted on: {' '.join(cpu_flags())}"
             + (" (AWQ_HW_FLAGS)" if "AWQ_HW_FLAGS" in os.environ else ""))
    libs = {v: os.environ[v] for v in ("ATEN_CPU_CAPABILITY", "OPENBLAS_CORETYPE", "MKL_ENABLE_INSTRUCTIONS",
                                       "ONEDNN_MAX_CPU_ISA") if v in os.environ}
    rep.emit(f"baselines' instruction sets: torch {torch.backends.cpu.get_cpu_capability()}"
             + "".join(f", {v}={x}" for v, x in libs.items()))
    rep.figure("baseline_isa_env", libs)
    rep.emit("compiled AWC kernel: " + (f"{mod.simd()} build ({' '.join(build_flags())})" if mod else "unavailable"))
    why_path = "forced by --kernel" if a.kernel != "auto" else \
        "awq.kernels.hw.choose: cached one-time measurement or AWQ_KERNEL_AWC"
    rep.emit(f"AWC iteration path: {path} ({why_path})")
    rep.emit(f"torch path's distance GEMM: {overlap_reason(gemm_arg, width)}")
    nthreads = torch.get_num_threads()
    with threads_for(X.numel(), a.block_threads) as used:
        why = "all: block >= 2M values" if n * width >= SMALL_BLOCK and a.block_threads == "auto" else \
            "awq.kernels.hw.threads_for: " + ("forced by --block_threads" if a.block_threads != "auto" else "cached one-time measurement")
        rep.emit(f"threads of our iteration on this block ({n * width} values): {used} of {nthreads} ({why})")
    rep.figure("block_threads", used)
    rep.figure("distance_kernel", kern)
    rep.figure("awc_path", path)

    Xi, Ci = X.to(torch.int8), C.to(torch.int8)
    D = block_distance(X, C, kern)
    lab = global_balanced_assign(D, m)
    ref_lab = ref_assign(D, m)

    def update(labels: torch.Tensor) -> torch.Tensor:  # member sums + counts + top-percentile update
        S = member_sums(X, labels, k)
        return awc_update(C, S, torch.bincount(labels[labels >= 0], minlength=k), 1, m, sparsity)

    def iteration(assign) -> torch.Tensor:  # one whole AWC iteration on the block, as the estimator runs it
        with threads_for(X.numel(), a.block_threads):
            Dk = block_distance(X, C, kern)
            return update(assign(Dk, m))

    def same_threads(f):  # a part of our iteration, timed in the thread setting the iteration uses
        def run():
            with threads_for(X.numel(), a.block_threads):
                return f()
        return run

    def compiled(greedy: bool):  # the compiled iteration: pack, popcount distance, assignment, update
        def run():
            with threads_for(X.numel(), a.block_threads):
                return awc_block(X, C, m, greedy, False, 1, sparsity)[0]
        return run

    if mod is not None:
        same = torch.equal(compiled(False)(), iteration(global_balanced_assign))
        rep.emit(f"compiled and torch iterations give identical centroids: {same}")
        rep.figure("compiled_equals_torch", same)
        if not same:
            raise RuntimeError("the compiled AWC iteration differs from the torch iteration")
    bare = same_threads((lambda: torch._int_mm(Xi, Ci.T)) if kern == "int8" else (lambda: X @ C.T))
    fns = {"iteration_global": lambda: iteration(global_balanced_assign),
           "iteration_greedy": lambda: iteration(greedy_balanced_assign),
           "gemm_fp32": same_threads(lambda: X @ C.T),
           "gemm_int8": same_threads(lambda: torch._int_mm(Xi, Ci.T)), "gemm_chosen": bare,
           "distance": same_threads(lambda: block_distance(X, C, kern)),
           "assign_global": same_threads(lambda: global_balanced_assign(D, m)),
           "assign_greedy": same_threads(lambda: greedy_balanced_assign(D, m)), "update": same_threads(lambda: update(lab)),
           "ref_distance_partial": lambda: ref_distances(X, C, rc),
           **({"iteration_popcount_global": compiled(False), "iteration_popcount_greedy": compiled(True),
               "distance_popcount": same_threads(lambda: mod.distance(mod.pack_rows(X), mod.pack_rows(C)))}
              if mod is not None else {}), "ref_assign": lambda: ref_assign(D, m),
           "ref_update": lambda: ref_update(X, C, ref_lab, 1, m, sparsity)}
    sk_note = ""
    if not a.no_sklearn:
        from sklearn.cluster import KMeans

        Xn, Cn = X.numpy(), C.numpy()
        for th in sorted({1, nthreads}):
            it = sklearn_lloyd_iteration(Xn, Cn, th)
            if it is not None:
                fns[f"sklearn_lloyd_iter_{th}t"] = it
        if it is None:
            sk_note = " (this scikit-learn has no lloyd_iter_chunked_dense: compared with the whole fit call)"

        def sk_fit() -> None:  # the public call for one Lloyd iteration from the same centroids
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                KMeans(n_clusters=k, init=Cn, n_init=1, max_iter=1, tol=0.0, algorithm="lloyd").fit(Xn)

        fns["sklearn_fit_1iter"] = sk_fit
    t = interleaved(fns, a.repeats, a.warmup)
    t["ref_distance"] = t["ref_distance_partial"].scaled(k / rc)
    t["reference"] = _sum(t["ref_distance"], t["ref_assign"], t["ref_update"])
    macs = n * width * k
    for name in ("gemm_fp32", "gemm_int8", "gemm_chosen", "distance", "distance_popcount", "assign_global",
                 "assign_greedy", "update",
                 "iteration_global", "iteration_greedy", "iteration_popcount_global", "iteration_popcount_greedy",
                 "ref_distance", "ref_assign", "ref_update", "reference",
                 "sklearn_lloyd_iter_1t", f"sklearn_lloyd_iter_{nthreads}t", "sklearn_fit_1iter"):
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
    ours = {kind: f"iteration_popcount_{kind}" if path == "popcount" else f"iteration_{kind}"
            for kind in ("global", "greedy")}
    for kind in ("global", "greedy"):
        rep.emit(f"torch iteration, --assign {kind}: {med[f'iteration_{kind}']:.4f} s, one call  (parts timed alone: "
                 f"distance {med['distance']:.4f}, assignment {med[f'assign_{kind}']:.4f}, update {med['update']:.4f})")
        if mod is not None:
            rep.emit(f"compiled popcount iteration, --assign {kind}: {med[f'iteration_popcount_{kind}']:.4f} s, one "
                     f"call  (pack + popcount distance alone {med['distance_popcount']:.4f})")
            rep.ratio(f"compiled vs torch iteration ({kind})", t[f"iteration_{kind}"], t[f"iteration_popcount_{kind}"],
                      None, note="same result; different kernels: no roofline")
        rep.ratio(f"ours ({kind}) vs reference", t["reference"], t[ours[kind]], None,
                  note=f"AWC's path here: {path}; algorithmic: no byte roofline")
    rep.emit(f"distance step ({kern} GEMM with the row sums folded in, one subtraction): "
             f"{macs / med['distance'] / 1e9:.1f} GMAC/s = {100 * med['gemm_fp32'] / med['distance']:.0f}% of the "
             f"plain fp32 GEMM rate")
    rep.ratio("distance rate / bare GEMM rate", t["gemm_chosen"], t["distance"], 1.0, what="rate",
              note=f"bare {kern} GEMM of the same shape: the distance step is that GEMM plus a subtraction")
    if mod is not None:
        rep.figure("distance_popcount_gmacs", macs / med["distance_popcount"] / 1e9)
        rep.emit(f"popcount distance (packing the float32 block included): {macs / med['distance_popcount'] / 1e9:.1f} "
                 f"G neuron-pairs/s = {med['gemm_fp32'] / med['distance_popcount']:.1f}x the plain fp32 GEMM rate")
    if not a.no_sklearn:
        its = [kk for kk in t if kk.startswith("sklearn_lloyd_iter_")]
        sk = min(its, key=lambda kk: med[kk]) if its else "sklearn_fit_1iter"  # the faster thread setting
        per = ", ".join(f"{kk.rsplit('_', 1)[1][:-1]} thread(s) {med[kk]:.4f} s" for kk in its)
        rep.emit(f"scikit-learn Lloyd, same block/K/centroids: per-iteration kernel {per or 'n/a'}; "
                 f"KMeans(max_iter=1).fit ({nthreads} threads) {med['sklearn_fit_1iter']:.4f} s{sk_note}")
        rep.ratio("ours (global) vs scikit-learn Lloyd", t[sk], t[ours["global"]], None,
                  note=f"AWC's path here: {path}; against the faster sklearn setting ({sk}); different algorithm: "
                       "no roofline")
        if path == "popcount":
            rep.ratio("torch iteration (global) vs scikit-learn Lloyd", t[sk], t["iteration_global"], None,
                      note="the path AWC did not choose, for comparison")
        rep.ratio("ours (global) vs scikit-learn KMeans(max_iter=1).fit", t["sklearn_fit_1iter"],
                  t[ours["global"]], None, note=f"AWC's path here: {path}; the public call: adds input checks and a "
                                                "2nd labelling pass")
    rep.write(a.output)
    return rep


def cli(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
