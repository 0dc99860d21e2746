"""The estimator base class of every clustering method, and its checkpoints.

:class:`BinaryClusterer` is sklearn-style (``__init__`` stores, ``fit`` learns) and drives the
iterations of a subclass (``_init_centroids``, ``_iteration``, ``_finalize``, ``_predict_block``)
over a :class:`~clustering.sources.Source`.  With ``checkpoint`` set, rank 0 saves the state after
every iteration (atomically, ``awq.util.io``); ``resume=True`` continues from it when its fingerprint
(the configuration minus ``max_iter``) matches, so a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from awq.store.centroids import CentroidError, load_centroids, validate_centroids
from awq.util.fingerprint import config_fingerprint
from awq.util.io import atomic_torch_save
from clustering import ClusteringError
from clustering.distributed import dist_info
from clustering.sources import Source, as_source

log = logging.getLogger("clustering")


def memory_budget(device: str) -> int:
    """Bytes one block may use: ``AWQ_CLUSTER_MEMORY_GB`` if set, else a quarter of the available RAM
    (CPU, at most 8 GiB) or half of the free memory of the GPU."""
    env = os.environ.get("AWQ_CLUSTER_MEMORY_GB")
    if env:
        try:
            gb = float(env)
        except ValueError:
            raise ClusteringError(f"AWQ_CLUSTER_MEMORY_GB={env!r} is not a number") from None
        if not gb > 0 or gb == float("inf"):
            raise ClusteringError(f"AWQ_CLUSTER_MEMORY_GB={env!r} must be a positive finite number")
        return int(gb * 2**30)
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free // 2)
    avail = 16 * 2**30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return int(min(8 * 2**30, avail // 4))


def block_bytes(rows: int, width: int, k: int) -> int:
    """Approximate peak bytes of one block: the fp32 block ``[rows, width]`` and ~3 fp32 ``[rows, k]`` matrices
    (distances and the temporaries of the assignment)."""
    return 4 * int(rows) * (int(width) + 3 * int(k))


def checkpoint_path(output: Path) -> Path:
    """Where a run writing ``output`` keeps its per-iteration checkpoint (``OUTPUT.ckpt.pt``)."""
    output = Path(output)
    return output.with_name(output.stem + ".ckpt.pt")


class BinaryClusterer:
    """Base class of every method (sklearn-style: ``__init__`` stores, ``fit`` learns).

    Learned attributes: ``cluster_centers_`` (uint8 ``[K, F]``), ``labels_`` (int64 ``[n]``, one
    per source row in canonical order, -1 = unassigned; ``None`` when ``store_labels=False``),
    ``objective_history_`` (per iteration), ``cluster_sizes_`` (int64 ``[K]``, last iteration),
    ``n_iter_``, ``converged_``, ``history_`` (per-iteration dicts).
    """

    method = "base"
    #: True when the result does not depend on the block size (then an over-budget block is shrunk;
    #: otherwise it is refused, since shrinking would change the result)
    block_invariant = False

    def __init__(
        self,
        n_clusters: int,
        *,
        max_iter: int = 10,
        random_state: int = 42,
        device: str = "cpu",
        block_rows: Optional[int] = None,
        checkpoint: Optional[str | Path] = None,
        resume: bool = False,
        progress: bool = False,
        store_labels: bool = True,
    ) -> None:
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.random_state = random_state
        self.device = device
        self.block_rows = block_rows
        self.checkpoint = checkpoint
        self.resume = resume
        self.progress = progress
        self.store_labels = store_labels

    # ---- to be provided by subclasses ------------------------------------------------------
    def _params(self) -> dict:
        """Method parameters that define the result (go into the checkpoint fingerprint)."""
        return {}

    def _init_centroids(self, src: Source) -> torch.Tensor:
        raise NotImplementedError

    def _iteration(self, src: Source, C: torch.Tensor, it: int, prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """One pass; returns ``(new C, new labels [n] int64, stats dict with 'objective')``."""
        raise NotImplementedError

    def _finalize(self, C: torch.Tensor) -> torch.Tensor:
        return C

    def _predict_block(self, X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- generic driver -------------------------------------------------------------------
    def _validate(self, src: Source) -> None:
        k = self.n_clusters
        if not isinstance(k, int) or k <= 0:
            raise ClusteringError(f"n_clusters must be a positive integer, got {k!r}")
        if k > src.n_rows:
            raise ClusteringError(f"K = {k} exceeds the number of rows ({src.n_rows})")
        if self.max_iter < 0:
            raise ClusteringError("max_iter must be >= 0")

    def _guard_memory(self, src: Source, invariant: bool) -> Optional[int]:
        """The block size to use: as configured if it fits :func:`memory_budget`; else shrunk (``invariant``)
        or a one-line :class:`ClusteringError`."""
        br = int(self.block_rows or src.default_block_rows)
        need, budget = block_bytes(br, src.width, self.n_clusters), memory_budget(self.device)
        if need <= budget:
            return self.block_rows
        fit_rows = max(1, budget // block_bytes(1, src.width, self.n_clusters))
        if invariant:
            log.warning("%s: a block of %d rows x K=%d needs ~%.2f GiB, over the budget of %.2f GiB: using blocks "
                        "of %d rows (same result)", self.method, br, self.n_clusters, need / 2**30, budget / 2**30,
                        fit_rows)
            return int(fit_rows)
        raise ClusteringError(
            f"{self.method}: a block of {br} rows x K={self.n_clusters} needs ~{need / 2**30:.2f} GiB (block + "
            f"[block, K] distances), over the memory budget of {budget / 2**30:.2f} GiB; pass --block_rows "
            f"{fit_rows} or less (this method's result depends on the block) or set AWQ_CLUSTER_MEMORY_GB")

    def fit(self, X: Any, init: Optional[torch.Tensor | str | Path] = None) -> "BinaryClusterer":
        src = as_source(X, self.block_rows)
        self._validate(src)
        self.block_rows = self._guard_memory(src, self.block_invariant)
        self.source_ = src
        rank, _ = dist_info()
        cfg = {
            "method": self.method,
            "k": self.n_clusters,
            "max_iter": self.max_iter,
            "random_state": self.random_state,
            "block_rows": int(self.block_rows or src.default_block_rows),
            "params": self._params(),
            "source": src.describe(),
        }
        self.config_ = cfg
        fp = config_fingerprint({k: v for k, v in cfg.items() if k != "max_iter"})  # a run may be extended
        ck = Path(self.checkpoint) if self.checkpoint else None
        state = None
        if ck is not None and self.resume and ck.is_file():
            try:
                state = torch.load(ck, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise ClusteringError(f"checkpoint {ck} is unreadable: {str(e).splitlines()[0]}") from None
            if state.get("fingerprint") != fp:
                raise ClusteringError(f"checkpoint {ck} was written by a different configuration; remove it or drop --resume")
            log.info("resuming from %s after iteration %d", ck, state["it"])
        if state is None:
            C0 = self._resolve_init(src, init)
            state = {
                "fingerprint": fp,
                "it": 0,
                "C": C0.cpu(),
                "labels": torch.full((src.n_rows,), -1, dtype=torch.int64),
                "history": [],
                "converged": False,
            }
        C = state["C"].to(self.device, torch.float32)
        labels = state["labels"]
        history = list(state["history"])
        converged = bool(state["converged"])
        it = int(state["it"])
        while it < self.max_iter and not converged:
            it += 1
            t0 = time.perf_counter()
            C, new_labels, stats = self._iteration(src, C, it, labels)
            changed = int((new_labels != labels).sum().item())
            converged = changed == 0
            labels = new_labels
            stats.update(iteration=it, changed=changed, changed_frac=changed / src.n_rows, seconds=time.perf_counter() - t0)
            stats["density"] = float(C.mean().item())
            history.append(stats)
            log.info(
                "%s it %d: objective %.6g, labels changed %d (%.4f), density %.4f, %.2fs",
                self.method, it, stats["objective"], changed, stats["changed_frac"], stats["density"], stats["seconds"],
            )
            if ck is not None and rank == 0:
                atomic_torch_save(
                    {"fingerprint": fp, "it": it, "C": C.cpu(), "labels": labels, "history": history, "converged": converged}, ck
                )
        Cf = self._finalize(C)
        self.cluster_centers_ = validate_binary(Cf)
        self.labels_ = labels if self.store_labels else None
        self.history_ = history
        self.objective_history_ = [h["objective"] for h in history]
        valid = labels[labels >= 0]
        self.cluster_sizes_ = torch.bincount(valid, minlength=self.cluster_centers_.shape[0])
        self.n_iter_ = it
        self.converged_ = converged
        return self

    def _resolve_init(self, src: Source, init: Optional[torch.Tensor | str | Path]) -> torch.Tensor:
        if init is None:
            C = self._init_centroids(src)
        elif isinstance(init, torch.Tensor):
            C = validate_centroids(init, src.width, name="initial centroids")
        else:
            C, _ = load_centroids(init, src.width)
        if C.shape[0] != self.n_clusters:
            raise ClusteringError(f"initial centroids have K = {C.shape[0]}, expected {self.n_clusters}")
        return C.float()

    def predict(self, X: Any) -> torch.Tensor:
        src = as_source(X, self.block_rows)
        C = self.cluster_centers_.to(self.device, torch.float32)
        if src.width != C.shape[1]:
            raise CentroidError(f"width mismatch: data has width {src.width}, centroids have width {C.shape[1]}")
        out = []
        block_rows = self._guard_memory(src, invariant=True)  # labels do not depend on the block
        for s, e in src.blocks(block_rows):
            out.append(self._predict_block(src.read_range(s, e, self.device), C).cpu())
        return torch.cat(out)

    def result_meta(self) -> dict:
        return {
            "method": self.method,
            "k": int(self.cluster_centers_.shape[0]),
            "seed": self.random_state,
            "iterations": self.n_iter_,
            "converged": self.converged_,
            "config": self.config_,
            "objective_history": self.objective_history_,
            "history": self.history_,
            "cluster_sizes": {
                "min": int(self.cluster_sizes_.min()),
                "max": int(self.cluster_sizes_.max()),
                "empty": int((self.cluster_sizes_ == 0).sum()),
            },
        }


def validate_binary(C: torch.Tensor) -> torch.Tensor:
    return validate_centroids(C.cpu(), name="result centroids")
