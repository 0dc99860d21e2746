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

import argparse
import logging
import random
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clustering.common import (  # noqa: E402
    ClusteringError,
    Source,
    add_data_args,
    d1_seeding,
    make_source,
    run_cli,
    seeding_sample,
    setup_logging,
)
from awq.centroids import save_centroids  # noqa: E402

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


def main(
    masks: Path,
    proj: str,
    k: int,
    output: Path,
    *,
    init: str = "random",
    seed: int = 42,
    min_sparsity: float = 0.4,
    scan: int = 100,
    seed_batch: int = 1,
    init_rows: Optional[int] = None,
    layer: Optional[int] = None,
    max_rows: Optional[int] = None,
    block_rows: Optional[int] = None,
    allow_partial: bool = False,
    device: str = "cpu",
) -> torch.Tensor:
    """Select ``k`` initial centroids and save them to ``output``."""
    args = argparse.Namespace(masks=masks, proj=proj, layer=layer, max_rows=max_rows, seed=seed,
                              block_rows=block_rows, allow_partial=allow_partial, device=device)
    src = make_source(args)
    if init == "random":
        C = select_random_rows(src, k, seed=seed, min_sparsity=min_sparsity, scan=scan, block_rows=block_rows)
    elif init == "kmeanspp":
        C = select_kmeanspp(src, k, seed=seed, min_sparsity=min_sparsity, scan=scan, init_rows=init_rows,
                            seed_batch=seed_batch, device=device)
    else:
        raise ClusteringError(f"unknown --init {init!r}")
    save_centroids(output, C, {"method": f"select_{init}", "proj": proj, "k": k, "seed": seed,
                               "min_sparsity": min_sparsity, "scan": scan, "source": src.describe()})
    print(f"wrote {output}: {C.shape[0]} x {C.shape[1]} initial centroids, density {C.mean().item():.4f}")
    return C


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p)
    p.add_argument("--init", choices=("random", "kmeanspp"), default="random", help="selection rule (default random)")
    p.add_argument("--min_sparsity", type=float, default=0.4, help="minimum fraction of zeros of a selected row")
    p.add_argument("--scan", type=int, default=100, help="rows scanned forward from a sample (default 100)")
    p.add_argument("--seed_batch", type=int, default=1, help="kmeanspp: rows sampled per D1 round (1 = exact)")
    p.add_argument("--init_rows", type=int, default=None, help="kmeanspp: seed from this many sampled rows (default: first block)")
    a = p.parse_args()
    setup_logging(a.verbose)
    run_cli(lambda: main(a.masks, a.proj, a.k, a.output, init=a.init, seed=a.seed, min_sparsity=a.min_sparsity,
                         scan=a.scan, seed_batch=a.seed_batch, init_rows=a.init_rows, layer=a.layer,
                         max_rows=a.max_rows, block_rows=a.block_rows, allow_partial=a.allow_partial,
                         device=a.device))
