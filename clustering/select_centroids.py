"""Initial centroids for AWC (artifact-behaviour section 3.3).

``--init random`` (artifact's ``select_centroids``): ``random.Random(seed).sample(range(N), k)``
sorted; for each sampled row ``r`` the first row among ``r, r+1, ..., r+scan`` (never crossing the
end of its block = the artifact's chunk) with at least ``--min_sparsity`` zeros is taken.  Rows
are taken in data order; duplicates are possible (as in the artifact).  Fewer than ``k`` found
is an error (the artifact silently continued and then crashed).

``--init kmeanspp`` (artifact's ``new_select_centroids``, binary version): on the first block, the
first centroid is the most active row, then D1 sampling on the Euclidean distance to the nearest
centroid (non-positive -> 1e-6, so chosen rows can be re-picked, as in the artifact), each sample
moved forward to the first row within ``scan`` rows with >= ``min_sparsity`` zeros (resampled when
none).  ``--seed_batch B`` samples B rows per round (one GEMM per round) -- an approximation for
large K; B = 1 is exact sequential D1.
"""
from __future__ import annotations

import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from awq.store.centroids import save_centroids
from clustering import ClusteringError
from clustering.cli import StoreOptions, check_config, make_source, opt, run
from clustering.seeding import d1_seeding, seeding_sample
from clustering.sources import Source

log = logging.getLogger("clustering.select")


def select_random_rows(
    src: Source,
    k: int,
    *,
    seed: int = 42,
    min_sparsity: float = 0.4,
    scan: int = 100,
    block_rows: Optional[int] = None,
    batch: int = 512,
) -> torch.Tensor:
    """The artifact's rule (see module doc); returns float32 {0,1} ``[k, width]``."""
    if k > src.n_rows:
        raise ClusteringError(f"K = {k} exceeds the number of rows ({src.n_rows})")
    samples = np.asarray(sorted(random.Random(seed).sample(range(src.n_rows), k)), dtype=np.int64)
    br = int(block_rows or src.default_block_rows)
    out: list[torch.Tensor] = []
    for s0 in range(0, k, batch):
        smp = samples[s0 : s0 + batch]
        end = np.minimum(smp + scan + 1, (smp // br + 1) * br)
        end = np.minimum(end, src.n_rows)
        lens = end - smp
        cand = np.concatenate([np.arange(a, b) for a, b in zip(smp, end)])
        uniq, inv = np.unique(cand, return_inverse=True)
        Xu = src.read(uniq)
        qual = ((Xu == 0).float().mean(1) >= min_sparsity).numpy()[inv]  # zero fraction of every candidate
        owner = np.repeat(np.arange(len(smp)), lens)
        first = np.full(len(smp), -1, dtype=np.int64)
        hit = np.nonzero(qual)[0]
        # first qualifying candidate per sample (candidates are grouped per sample, in order)
        o, idx = np.unique(owner[hit], return_index=True)
        first[o] = hit[idx]
        for j in np.nonzero(first < 0)[0]:
            log.warning("no row with >= %.0f%% zeros within %d rows after sampled row %d", 100 * min_sparsity, scan, smp[j])
        good = first[first >= 0]
        out.append(Xu[torch.from_numpy(inv[good])])
    C = torch.cat(out, 0)
    if C.shape[0] < k:
        raise ClusteringError(
            f"only {C.shape[0]} of {k} sampled rows have >= {min_sparsity:.0%} zeros within {scan} rows; "
            "lower --min_sparsity or K"
        )
    return C[:k]


def select_kmeanspp(
    src: Source,
    k: int,
    *,
    seed: int = 42,
    min_sparsity: float = 0.4,
    scan: int = 100,
    init_rows: Optional[int] = None,
    seed_batch: int = 1,
    device: str = "cpu",
) -> torch.Tensor:
    """k-means++-style initialisation on the first block (or ``init_rows`` sampled rows)."""
    X = seeding_sample(src, init_rows, seed, device)
    if k > X.shape[0]:
        raise ClusteringError(f"K = {k} exceeds the rows available for seeding ({X.shape[0]})")
    qualify = (X == 0).float().mean(1) >= min_sparsity
    if not bool(qualify.any()):
        raise ClusteringError(f"no row has >= {min_sparsity:.0%} zeros; lower --min_sparsity")
    first = X[int(torch.argmax(X.sum(1)))][None]  # most active row (L2 norm of a binary row), first on ties
    g = torch.Generator().manual_seed(seed)
    return d1_seeding(X, k, first, g, batch=seed_batch, sqrt=True, floor=1e-6, qualify=qualify, scan=scan)


@dataclass(kw_only=True)
class SelectConfig(StoreOptions):
    """Options of ``python -m clustering.select_centroids``."""

    k: int = opt(help="number of clusters", min=1)
    output: Path = opt(help="output centroid file (.pt); a .json sidecar is written too", kind="out_file")
    init: str = opt("random", choices=("random", "kmeanspp"), help="selection rule (default random)")
    min_sparsity: float = opt(0.4, min=0.0, max=1.0, kind="fraction", help="minimum fraction of zeros of a selected row")
    scan: int = opt(100, min=0, help="rows scanned forward from a sample (default 100)")
    seed_batch: int = opt(1, min=1, help="kmeanspp: rows sampled per D1 round (1 = exact)")
    init_rows: Optional[int] = opt(None, min=1, help="kmeanspp: seed from this many sampled rows (default: first "
                                                     "block)")


def main(cfg: SelectConfig) -> torch.Tensor:
    """Select ``cfg.k`` initial centroids and save them to ``cfg.output``."""
    check_config(cfg)
    src = make_source(cfg)
    k, seed = cfg.k, cfg.seed
    if cfg.init == "random":
        C = select_random_rows(src, k, seed=seed, min_sparsity=cfg.min_sparsity, scan=cfg.scan,
                               block_rows=cfg.block_rows)
    elif cfg.init == "kmeanspp":
        C = select_kmeanspp(src, k, seed=seed, min_sparsity=cfg.min_sparsity, scan=cfg.scan, init_rows=cfg.init_rows,
                            seed_batch=cfg.seed_batch, device=cfg.device)
    else:
        raise ClusteringError(f"unknown --init {cfg.init!r}")
    save_centroids(cfg.output, C, {"method": f"select_{cfg.init}", "proj": cfg.proj, "k": k, "seed": seed,
                                   "min_sparsity": cfg.min_sparsity, "scan": cfg.scan, "source": src.describe()})
    print(f"wrote {cfg.output}: {C.shape[0]} x {C.shape[1]} initial centroids, density {C.mean().item():.4f}")
    return C


def cli(argv: Optional[list[str]] = None) -> int:
    return run(SelectConfig, main, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(cli())
