"""Activation-Aware Clustering (AWC, the paper's method; artifact-behaviour section 3.4).

Per block of rows ``X`` (default: one window x all layers = the artifact's chunk), with current
centroids ``C``:

1. distances ``D = |x| - X C^T`` (active-only: active neurons the centroid misses), exact: on one CPU
   process the compiled popcount iteration (:mod:`clustering.cluster_kernel`, ``csrc/cluster_kernels.cpp``:
   all three steps in C++, bit-identical) where a cached one-time measurement finds it faster, else one
   GEMM, int8 or fp32 as :mod:`clustering.distance` / :func:`awq.kernels.hw.overlap_kernel` pick for this machine;
2. balanced assignment with cap ``m = floor(n_block0 / k)`` rows per centroid:
   * ``greedy`` (artifact): for centroid ``i = 0..k-1`` in index order, the ``m`` still-unassigned
     rows with the smallest ``D[:, i]`` (stable: ties -> lower row) get label ``i``;
   * ``global`` (default): order-independent proposal rounds -- every unassigned row proposes to
     its nearest centroid that still has capacity (ties -> lower centroid index); each centroid
     accepts its proposals in (distance, row) order up to its remaining capacity; rejected rows
     propose again after full centroids are removed.  Centroid order only matters for exact ties.
   Rows left over when ``k * m < n`` stay unassigned (-1, ignored; ``--leftovers drop``, the
   artifact) or go to their nearest centroid ignoring the cap (``--leftovers nearest``).
3. update of every centroid with members, with ``t = iteration * block_index`` (1-based, the
   artifact's weight): ``s = (t m C_i + m mean_i) / (t m + m)``, ``C_i = [s > quantile_p(s)]``
   (ties at the quantile are zeroed, so sparsity >= p); centroids without members are kept.

Iterations stop at ``--max_iter`` or when no label changed.  The greedy assignment is inherently
sequential over centroids: batched top-k candidate lists are computed for all centroids at once,
and only the cheap walk over each centroid's short list is sequential (see
:func:`greedy_balanced_assign`).  The global assignment needs ~10-20 vectorised rounds per block.

Memory per block: the block ``[n, F]`` plus the distance matrix ``[n, k]`` fp32 (gathered on every
rank under torch.distributed) -- e.g. 61,440 x 8,192 x 4 B = 2 GB; lower ``--block_rows`` for
large ``k``.
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from awq.kernels.cluster import awc_block
from awq.kernels.hw import SMALL_BLOCK, threads_for
from awq.load.arch import PROJS
from awq.store.centroids import CentroidError, assign_active_only
from awq.util import paths
from clustering import ClusteringError
from clustering.awc_iteration import torch_block
from clustering.base import BinaryClusterer, checkpoint_path
from clustering.cli import FitOptions, check_config, check_device, make_source, opt, run, setup_logging, write_result
from clustering.cluster_kernel import awc_kernel
from clustering.distributed import dist_info, init_distributed
from clustering.select_centroids import select_kmeanspp, select_random_rows
from clustering.sources import Source, StoreSource

log = logging.getLogger("clustering.awc")

__all__ = ["ActivationAwareClustering", "AWCConfig", "ArtifactSettings", "SETTINGS", "main", "cli", "run_defaults",
           "artifact_cli"]  # the iteration: clustering.awc_iteration; the assignments: clustering.assignment


# --------------------------------------------------------------------------------------------
# estimator
# --------------------------------------------------------------------------------------------
class ActivationAwareClustering(BinaryClusterer):
    """AWC estimator. ``sparsity`` = the artifact's percentile p (centroids >= p zeros)."""

    method = "awc"

    def __init__(
        self,
        n_clusters: int,
        *,
        max_iter: int = 10,
        random_state: int = 42,
        device: str = "cpu",
        sparsity: float = 0.4,
        assign: str = "global",
        leftovers: Optional[str] = None,
        tolerance: float = 1.0,
        init: str = "random",
        min_sparsity: float = 0.4,
        block_rows: Optional[int] = None,
        checkpoint: Optional[str | Path] = None,
        resume: bool = False,
        progress: bool = False,
        store_labels: bool = True,
        kernel: Optional[str] = None,
        threads: Optional[str] = None,
    ) -> None:
        super().__init__(
            n_clusters, max_iter=max_iter, random_state=random_state, device=device, block_rows=block_rows,
            checkpoint=checkpoint, resume=resume, progress=progress, store_labels=store_labels,
        )
        self.sparsity = sparsity
        self.assign = assign
        self.leftovers = leftovers
        self.tolerance = tolerance
        self.init = init
        self.min_sparsity = min_sparsity
        self.kernel = kernel  # CPU iteration: None/"auto" (measured once), "popcount", "int8", "fp32"; same result
        self.threads = threads  # small CPU blocks: None/"auto" (awq.kernels.hw decides), "1" or "all"; same result

    def _leftovers(self) -> str:
        return self.leftovers or ("drop" if self.assign == "greedy" else "nearest")

    def _params(self) -> dict:
        return {"sparsity": self.sparsity, "assign": self.assign, "leftovers": self._leftovers(),
                "tolerance": self.tolerance, "init": self.init, "min_sparsity": self.min_sparsity}

    def _validate(self, src: Source) -> None:
        super()._validate(src)
        if not 0.0 <= self.sparsity < 1.0:
            raise ClusteringError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.assign not in ("greedy", "global"):
            raise ClusteringError(f"assign must be 'greedy' or 'global', got {self.assign!r}")
        if self._leftovers() not in ("drop", "nearest"):
            raise ClusteringError(f"leftovers must be 'drop' or 'nearest', got {self.leftovers!r}")
        s, e = src.blocks(self.block_rows)[0]
        self.cap_ = int(math.floor(self.tolerance * (e - s) / self.n_clusters))
        if self.cap_ < 1:
            raise ClusteringError(
                f"K = {self.n_clusters} exceeds the rows of one block ({e - s}); raise --block_rows or lower K"
            )

    def _init_centroids(self, src: Source) -> torch.Tensor:
        if self.init == "kmeanspp":
            return select_kmeanspp(src, self.n_clusters, seed=self.random_state, min_sparsity=self.min_sparsity)
        if self.init == "random":
            return select_random_rows(src, self.n_clusters, seed=self.random_state, min_sparsity=self.min_sparsity,
                                      block_rows=self.block_rows)
        raise ClusteringError(f"unknown init {self.init!r} (use 'random', 'kmeanspp' or a .pt file)")

    def _iteration(self, src: Source, C: torch.Tensor, it: int, prev: torch.Tensor):
        world, cap = dist_info()[1], self.cap_
        labels = torch.full((src.n_rows,), -1, dtype=torch.int64)
        objective, unassigned, empty = 0.0, 0, 0
        greedy, nearest = self.assign == "greedy", self._leftovers() == "nearest"
        compiled = world == 1 and torch.device(self.device).type == "cpu" and awc_kernel(self.kernel) == "popcount"
        for b, (start, stop, lo, hi, Xs) in enumerate(
            src.iter_blocks(self.block_rows, self.device, desc=f"awc it {it}", progress=self.progress), start=1
        ):
            # small blocks may run faster on one thread (awq.kernels.hw.threads_for: measured once, cached)
            with threads_for(Xs.numel() if Xs.device.type == "cpu" else SMALL_BLOCK, self.threads):
                if compiled:  # csrc/cluster_kernels.cpp: bit-identical to torch_block
                    C, lab, obj, miss, emp = awc_block(Xs, C, cap, greedy, nearest, it * b, self.sparsity)
                else:
                    C, lab, obj, miss, emp = torch_block(Xs, C, cap, greedy, nearest, it * b, self.sparsity,
                                                         self.kernel, (lo - start, hi - start, stop - start))
            objective += obj
            unassigned += miss
            empty += emp
            labels[start:stop] = lab.cpu()
        return C, labels, {"objective": objective, "unassigned": unassigned, "empty_cluster_blocks": empty}

    def _predict_block(self, X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        return assign_active_only(X, C)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class AWCConfig(FitOptions):
    """Options of ``python -m clustering.activation_aware_clustering``."""

    sparsity: float = opt(0.4, min=0.0, lt=1.0, kind="fraction",
                          help="centroid sparsity p: the top (1-p) features are kept (0.2/0.3/0.4; default 0.4)")
    assign: str = opt("global", choices=("global", "greedy"),
                      help="balanced assignment: 'global' (order-independent, default) or 'greedy' (artifact's "
                           "centroid order)")
    leftovers: Optional[str] = opt(None, choices=("drop", "nearest"),
                                   help="rows beyond k*cap: 'drop' (artifact, default for greedy) or 'nearest' "
                                        "(default for global)")
    min_sparsity: float = opt(0.4, min=0.0, max=1.0, kind="fraction",
                              help="initial rows need at least this fraction of zeros")
    kernel: str = opt("auto", choices=("auto", "popcount", "int8", "fp32"),
                      help="CPU iteration: 'auto' (default: the compiled popcount iteration or the torch one, by a "
                           "cached one-time measurement, logged), 'popcount' (csrc/cluster_kernels.cpp), 'int8' / "
                           "'fp32' (torch path with that distance GEMM); all give identical results")
    threads: str = opt("auto", choices=("auto", "1", "all"),
                       help="threads for blocks under 2M values: 'auto' (default: a cached one-time measurement, "
                            "logged), '1' or 'all' (torch's); large blocks use all; same results either way")


def main(cfg: AWCConfig) -> dict:
    """Fit AWC on a pattern store and write ``cfg.output`` (+ ``.json`` sidecar, ``.results.json``)."""
    check_config(cfg)
    check_device(cfg.device)
    init_distributed(cfg.device)
    src = make_source(cfg)
    log.info("AWC %s: %d rows x %d, k=%d, p=%.2f, assign=%s, world=%d", cfg.proj, src.n_rows, src.width, cfg.k,
             cfg.sparsity, cfg.assign, dist_info()[1])
    named = cfg.init in (None, "random", "kmeanspp")
    est = ActivationAwareClustering(
        cfg.k, max_iter=cfg.max_iter, random_state=cfg.seed, device=cfg.device, sparsity=cfg.sparsity,
        assign=cfg.assign, leftovers=cfg.leftovers, init=cfg.init if cfg.init in ("random", "kmeanspp") else "random",
        min_sparsity=cfg.min_sparsity, block_rows=cfg.block_rows, checkpoint=checkpoint_path(cfg.output),
        resume=cfg.resume, progress=cfg.progress, kernel=cfg.kernel,
        threads=cfg.threads,
    )
    est.fit(src, init=None if named else cfg.init)
    meta = write_result(est, cfg.output, cfg.proj, {"sparsity": cfg.sparsity, "assign": cfg.assign, "cap": est.cap_})
    if dist_info()[0] == 0:
        print(f"wrote {cfg.output}: k={cfg.k} density={meta['history'][-1]['density'] if meta['history'] else float('nan'):.4f} "
              f"iterations={est.n_iter_} converged={est.converged_}")
    return meta


# --------------------------------------------------------------------------------------------
# the artifact's no-configuration run
# --------------------------------------------------------------------------------------------
# The artifact's no-configuration clustering step: ``python clustering/activation_aware_clustering.py``.
# 
# With no arguments the AWC script reads the default pattern store (:func:`awq.util.paths.default_store`,
# written by ``python -m awq.entry --dump_masks``), clusters gate_proj, up_proj and down_proj with
# the paper's settings (K = 2048, centroid sparsity 0.4 = "the top 60% of features", the artifact's
# seed 42) on a deterministic row budget, and writes one directory of centroids
# (:func:`awq.util.paths.default_centroid_dir`) that ``python -m awq.entry --centroids DIR`` reads.
# Locations resolve against the project root, so it runs the same from the repository root, from
# inside ``clustering/`` and as ``python -m clustering.activation_aware_clustering``.
# 
# Row budget: 61,440 rows per projection (one 2048-token window x 30 layers, the artifact's chunk)
# and 10 iterations (the artifact's): 4.6 minutes for all three projections measured on 2 CPU cores
# shared with other jobs (load ~8).
@dataclass(frozen=True)
class ArtifactSettings:
    """The paper's clustering settings with a CPU-sized row budget."""

    k: int = 2048  # clusters per projection (paper, section 5.1 / Fig. 4a)
    sparsity: float = 0.4  # centroid keeps the top 60% of features (paper, section 4)
    max_rows: Optional[int] = 61440  # one 2048-token window x 30 layers (the artifact's chunk)
    max_iter: int = 10  # the artifact's iterations
    seed: int = 42  # the artifact's seed
    device: str = "cpu"


SETTINGS = ArtifactSettings()


def no_store_message(store: Path, root: Optional[Path] = None) -> str:
    return (f"no pattern store at {store}: make one first with `python -m awq.entry --dump_masks` "
            f"(all test windows, ~10 min on 2 cores; add --nsamples 2 for a quick one)")


def run_defaults(root: Optional[Path] = None, settings: ArtifactSettings = SETTINGS) -> Path:
    """Cluster all three projections of the default store into the default centroid directory; -> that directory.

    ``root`` overrides the project root (else ``$AWQ_PROJECT_ROOT`` / the checkout).  Raises
    :class:`ClusteringError` (one line) when the store is missing or unusable.
    """
    store = paths.default_store(root)
    if not (store / "meta.json").is_file():
        raise ClusteringError(no_store_message(store, root))
    out_dir = paths.default_centroid_dir(root)
    for proj in PROJS:
        src = StoreSource(store, proj, max_rows=settings.max_rows, seed=settings.seed)
        s0, e0 = src.blocks()[0]
        block, k = e0 - s0, settings.k
        if k > block:
            log.warning("K=%d exceeds the %d rows of one block of this store: using K=%d", k, block, block)
            k = block
        out = out_dir / f"{proj}.pt"
        cfg = AWCConfig(masks=store, proj=proj, k=k, output=out, sparsity=settings.sparsity,
                        max_rows=settings.max_rows, max_iter=settings.max_iter, seed=settings.seed,
                        device=settings.device, progress=False)
        log.info("clustering %s: K=%d, sparsity %.2f, %s rows, %d iterations -> %s", proj, k, settings.sparsity,
                 settings.max_rows or "all", settings.max_iter, paths.display(out, root))
        main(cfg)
        checkpoint_path(out).unlink(missing_ok=True)  # finished: only the centroid files stay in the directory
    return out_dir


def artifact_cli(root: Optional[Path] = None, settings: ArtifactSettings = SETTINGS) -> int:
    """The no-argument command: one result line on stdout, one error line on stderr (exit 2)."""
    setup_logging(False)
    try:
        out_dir = run_defaults(root, settings)
    except (ClusteringError, CentroidError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"centroids for {', '.join(PROJS)} written to {out_dir}; next: python -m awq.entry --centroids {out_dir}")
    return 0


NO_ARGS_HELP = ("With no arguments (the artifact's step 2): reads the default pattern store results/masks, clusters "
                "gate/up/down with K=2048 and sparsity 0.4 on 61,440 rows each and writes results/centroids/awc "
                "(paths relative to the project root; see ArtifactSettings).")


def cli(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # the artifact's "no additional configuration" run

        return artifact_cli()
    return run(AWCConfig, main, argv, description=__doc__.split("\n\n")[0] + " " + NO_ARGS_HELP)


if __name__ == "__main__":
    sys.exit(cli())
