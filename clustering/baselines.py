"""The paper's baselines (artifact-behaviour section 3.7) as Lloyd-type estimators.

All three run batch Lloyd iterations over the whole source (streamed block by block; per-centroid
sums all-reduced under torch.distributed), stop when no label changes or after ``max_iter``, and
differ in distance, initialisation and update:

* :class:`BRBKMeans` -- Binary-to-Real-and-Back k-means: real-valued k-means with L2 distance on
  the {0,1} rows (init: ``k`` random distinct rows), centroids = cluster means; binarised by
  rounding (half to even: exactly 0.5 -> 0) at the end.  ``round_every_iter=True`` rounds after
  every update instead (the artifact's ``brbkmeans_same_k``).
* :class:`BMF` -- the "BMF randomized clustering" (k-majority): Hamming distance, majority-vote
  update ``round(mean)``, D1 seeding from an all-zeros first centre.
* :class:`PenalizedBRBKMeans` -- Hamming plus ``penalty`` per spurious active neuron
  (data 0 / centroid 1 costs ``1 + penalty``), ``round(mean)`` update, random-row init.

Distances are one fp32 GEMM per block: with ``|x|`` = active count,
Hamming = ``|x| + |c| - 2 x.c``; L2^2 = ``|x| - 2 x.c + ||c||^2``;
penalised = ``|x| + (1+pen)|c| - (2+pen) x.c``.  Empty clusters keep their centroid.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from awq.store.centroids import overlap
from clustering import ClusteringError
from clustering.base import BinaryClusterer, checkpoint_path
from clustering.cli import FitOptions, check_config, make_source, opt, write_result
from clustering.distributed import all_reduce_, dist_info, gather_slices, init_distributed, slice_bounds
from clustering.seeding import d1_seeding, random_rows, seeding_sample
from clustering.sources import Source

log = logging.getLogger("clustering.baselines")


class _Lloyd(BinaryClusterer):
    binary_centroids = True
    block_invariant = True  # batch Lloyd: assignments per row, updates summed over all blocks

    def _dist(self, X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _update(self, mean: torch.Tensor) -> torch.Tensor:
        return (mean > 0.5).float()  # round half to even on [0,1]: 0.5 -> 0

    def _init_centroids(self, src: Source) -> torch.Tensor:
        return random_rows(src, self.n_clusters, self.random_state)

    def _iteration(self, src: Source, C: torch.Tensor, it: int, prev: torch.Tensor):
        rank, world = dist_info()
        k = C.shape[0]
        labels = torch.empty(src.n_rows, dtype=torch.int64)
        S = torch.zeros_like(C)
        counts = torch.zeros(k, dtype=torch.float32, device=C.device)
        obj = torch.zeros(1, dtype=torch.float64, device=C.device)
        for start, stop, lo, hi, Xs in src.iter_blocks(self.block_rows, self.device, desc=f"{self.method} it {it}",
                                                        progress=self.progress):
            D = self._dist(Xs, C)
            d, lab = D.min(1)  # first index on ties
            obj += d.double().sum()
            S.index_add_(0, lab, Xs)
            counts += torch.bincount(lab, minlength=k).float()
            sizes = [e - s for s, e in slice_bounds(stop - start, rank, world)]
            labels[start:stop] = gather_slices(lab, sizes).cpu()
        all_reduce_(S)
        all_reduce_(counts)
        all_reduce_(obj)
        ne = counts > 0
        Cn = C.clone()
        Cn[ne] = self._update(S[ne] / counts[ne][:, None])
        return Cn, labels, {"objective": float(obj.item()), "empty_clusters": int((~ne).sum().item())}

    def _predict_block(self, X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        return self._dist(X, C).min(1).indices


class BRBKMeans(_Lloyd):
    method = "brbkmeans"

    def __init__(self, n_clusters: int, *, round_every_iter: bool = False, **kw) -> None:
        super().__init__(n_clusters, **kw)
        self.round_every_iter = round_every_iter

    def _params(self) -> dict:
        return {"round_every_iter": self.round_every_iter}

    def _dist(self, X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        return X.sum(1, keepdim=True) - 2 * X @ C.T + (C * C).sum(1)[None, :]

    def _update(self, mean: torch.Tensor) -> torch.Tensor:
        return torch.round(mean) if self.round_every_iter else mean

    def _finalize(self, C: torch.Tensor) -> torch.Tensor:
        return torch.round(C)

    def _predict_block(self, X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        return self._dist(X, C.float()).min(1).indices


class BMF(_Lloyd):
    method = "bmf"

    def __init__(self, n_clusters: int, *, seed_batch: int = 1, init_rows: Optional[int] = 65536, **kw) -> None:
        super().__init__(n_clusters, **kw)
        self.seed_batch = seed_batch
        self.init_rows = init_rows

    def _params(self) -> dict:
        return {"seed_batch": self.seed_batch, "init_rows": self.init_rows}

    def _dist(self, X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        return X.sum(1, keepdim=True) + C.sum(1)[None, :] - 2 * overlap(X, C)

    def _init_centroids(self, src: Source) -> torch.Tensor:
        X = seeding_sample(src, self.init_rows, self.random_state, self.device)
        g = torch.Generator().manual_seed(self.random_state)
        first = torch.zeros(1, src.width, device=X.device)
        return d1_seeding(X, self.n_clusters, first, g, batch=self.seed_batch, floor=0.0)


class PenalizedBRBKMeans(_Lloyd):
    method = "penalized_brbkmeans"

    def __init__(self, n_clusters: int, *, penalty: float = 2.0, **kw) -> None:
        super().__init__(n_clusters, **kw)
        self.penalty = penalty

    def _params(self) -> dict:
        return {"penalty": self.penalty}

    def _dist(self, X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        pen = self.penalty
        return X.sum(1, keepdim=True) + (1 + pen) * C.sum(1)[None, :] - (2 + pen) * overlap(X, C)


@dataclass(kw_only=True)
class BaselineOptions(FitOptions):
    """Options shared by the three baseline tools (their own options are added by subclasses)."""

    max_iter: int = opt(100, help="maximum iterations (default 100)", min=0)
    init: Optional[str] = opt(None, help="initial centroids: a .pt file, or 'random' (default)", kind="in_file",
                              words=("random",))


def fit_baseline(cls: type, cfg: BaselineOptions, **params) -> dict:
    """Fit baseline estimator ``cls`` (with its own ``params``) on the store rows of ``cfg``; write the result."""
    check_config(cfg)
    init = cfg.init if cfg.init not in (None, "random") else None
    if init is not None and not Path(init).suffix:
        raise ClusteringError(f"--init must be 'random' or a centroid .pt file, got {init!r}")
    src = make_source(cfg)
    init_distributed(cfg.device)
    est = cls(cfg.k, max_iter=cfg.max_iter, random_state=cfg.seed, device=cfg.device, block_rows=cfg.block_rows,
              checkpoint=checkpoint_path(cfg.output), resume=cfg.resume, progress=cfg.progress, **params)
    est.fit(src, init=init)
    meta = write_result(est, cfg.output, cfg.proj)
    if dist_info()[0] == 0:
        print(f"wrote {cfg.output}: k={cfg.k} iterations={est.n_iter_} converged={est.converged_} "
              f"objective={meta['objective_history'][-1] if meta['objective_history'] else float('nan'):.6g}")
    return meta
