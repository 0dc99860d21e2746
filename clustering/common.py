"""Shared machinery of the clustering suite: data sources, the estimator base class, checkpoints,
torch.distributed helpers and CLI plumbing.

Data sources
------------
Every estimator fits a *source* of {0,1} rows: :class:`TensorSource` (an in-memory tensor, used by
tests) or :class:`StoreSource` (a bit-packed pattern store written by :mod:`awq.masks`, pooled over
all layers or one layer, optionally subsampled to ``max_rows``).  Rows have a *canonical order*:
window-major (``token // seqlen``), then layer, then token -- so consecutive blocks of
``seqlen * num_layers`` rows are exactly the artifact's "chunks" (one 2048-token window x all
layers).  A block is read, unpacked and handed out as a float32 {0,1} tensor; memory is bounded
by the block size.

Distributed
-----------
Under ``torchrun`` (``WORLD_SIZE > 1``) every block's rows are split into ``world_size``
contiguous slices; rank ``r`` reads and processes slice ``r``.  Estimators all-reduce per-centroid
sums (exact: integer counts in fp32) and all-gather what the (replicated, deterministic)
assignment needs, so the result does not depend on the number of processes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python clustering/x.py` without an installed package
    sys.path.insert(0, str(REPO))

from awq.centroids import (  # noqa: E402
    CentroidError,
    atomic_torch_save,
    atomic_write_json,
    load_centroids,
    overlap,
    save_centroids,
)

log = logging.getLogger("clustering")

PROJS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")


class ClusteringError(ValueError):
    """Bad input or configuration for a clustering run (one-line message)."""


# --------------------------------------------------------------------------------------------
# torch.distributed helpers (no-ops with one process)
# --------------------------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> tuple[int, int]:
    """Initialise the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist_info()


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    if dist_info()[1] > 1:
        dist.all_reduce(t)
    return t


def gather_slices(t: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Concatenate every rank's slice (rank order) along dim 0; ``sizes`` = rows of each slice."""
    rank, world = dist_info()
    if world == 1:
        return t
    mx = max(sizes)
    pad = t.new_zeros((mx,) + tuple(t.shape[1:]))
    pad[: t.shape[0]] = t
    out = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(out, pad)
    return torch.cat([o[:s] for o, s in zip(out, sizes)], 0)


def slice_bounds(n: int, rank: int, world: int) -> list[tuple[int, int]]:
    return [(n * r // world, n * (r + 1) // world) for r in range(world)]


# --------------------------------------------------------------------------------------------
# data sources
# --------------------------------------------------------------------------------------------
class Source:
    """Rows of {0,1} patterns in a canonical order, read block by block."""

    n_rows: int
    width: int
    default_block_rows: int

    def describe(self) -> dict:
        raise NotImplementedError

    def read(self, positions: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
        """Rows at canonical ``positions`` (sorted int64) as float32 {0,1} ``[len, width]``."""
        raise NotImplementedError

    def layers_of(self, positions: np.ndarray) -> np.ndarray:
        return np.zeros(len(positions), dtype=np.int64)

    def read_range(self, start: int, stop: int, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.read(np.arange(start, stop, dtype=np.int64), device)

    def blocks(self, block_rows: Optional[int] = None) -> list[tuple[int, int]]:
        br = int(block_rows or self.default_block_rows)
        return [(s, min(s + br, self.n_rows)) for s in range(0, self.n_rows, br)]

    def iter_blocks(
        self, block_rows: Optional[int] = None, device: str | torch.device = "cpu", *, desc: str = "", progress: bool = False
    ) -> Iterator[tuple[int, int, int, int, torch.Tensor]]:
        """Yield ``(start, stop, lo, hi, X)``: block ``[start, stop)`` and this rank's slice ``[lo, hi)``."""
        rank, world = dist_info()
        blocks = self.blocks(block_rows)
        it: Any = blocks
        if progress and rank == 0:
            from tqdm import tqdm

            it = tqdm(blocks, desc=desc, unit="block", leave=False, dynamic_ncols=True)
        for start, stop in it:
            lo, hi = slice_bounds(stop - start, rank, world)[rank]
            yield start, stop, start + lo, start + hi, self.read_range(start + lo, start + hi, device)


class TensorSource(Source):
    """An in-memory {0,1} tensor ``[n, width]`` (any dtype)."""

    def __init__(self, X: torch.Tensor, block_rows: Optional[int] = None) -> None:
        if not isinstance(X, torch.Tensor) or X.dim() != 2:
            raise ClusteringError("data must be a 2-D {0,1} tensor [n, width]")
        if X.shape[0] == 0 or X.shape[1] == 0:
            raise ClusteringError(f"data is empty (shape {tuple(X.shape)})")
        Xu = X.to(torch.uint8) if X.dtype == torch.bool else X
        if not bool(((Xu == 0) | (Xu == 1)).all()):
            raise ClusteringError("data must hold only 0/1 values")
        self.X = Xu.to("cpu", torch.uint8).contiguous()
        self.n_rows, self.width = int(X.shape[0]), int(X.shape[1])
        self.default_block_rows = int(block_rows or min(self.n_rows, 65536))
        self._sha = hashlib.sha1(self.X.numpy().tobytes()).hexdigest()[:16]

    def describe(self) -> dict:
        return {"kind": "tensor", "n_rows": self.n_rows, "width": self.width, "sha1": self._sha}

    def read(self, positions: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.X[torch.from_numpy(np.asarray(positions, dtype=np.int64))].to(device=device, dtype=torch.float32)

    def read_range(self, start: int, stop: int, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.X[start:stop].to(device=device, dtype=torch.float32)


class StoreSource(Source):
    """Rows of one projection of a pattern store, pooled over layers (or one ``layer``)."""

    def __init__(
        self,
        path: str | Path,
        proj: str,
        *,
        layer: Optional[int] = None,
        max_rows: Optional[int] = None,
        seed: int = 0,
        block_rows: Optional[int] = None,
        allow_partial: bool = False,
    ) -> None:
        from awq.masks import PatternStore

        path = Path(path)
        if proj not in PROJS:
            raise ClusteringError(f"unknown projection {proj!r}; expected one of {list(PROJS)}")
        st = PatternStore(path, allow_partial=allow_partial)  # StoreError (a ValueError) on a bad store
        self.store, self.path, self.proj, self.meta = st, path, proj, st.meta
        if proj not in st.widths:
            raise ClusteringError(f"pattern store {path} has no {proj} patterns (widths: {st.widths})")
        self.width = int(st.widths[proj])
        num_layers = st.num_layers
        if layer is not None and not 0 <= layer < num_layers:
            raise ClusteringError(f"--layer {layer} out of range: the store has {num_layers} layers")
        self.layers = [layer] if layer is not None else list(range(num_layers))
        n_tokens = self.n_tokens = int(st.n_tokens)
        if n_tokens == 0:
            raise ClusteringError(f"pattern store {path} is empty (0 complete windows)")
        self.seqlen = int(st.seqlen) or n_tokens
        L, T = len(self.layers), n_tokens
        # canonical order: window, then layer, then token
        tok = np.tile(np.arange(T, dtype=np.int64), L)
        lay = np.repeat(np.asarray(self.layers, dtype=np.int64), T)
        order = np.lexsort((tok, lay, tok // self.seqlen))
        rows = lay[order] * T + tok[order]
        self.max_rows, self.seed = max_rows, seed
        if max_rows is not None and max_rows < len(rows):
            if max_rows <= 0:
                raise ClusteringError("--max_rows must be positive")
            keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=max_rows, replace=False))
            rows = rows[keep]
        self.rows = rows  # pooled row id (layer * n_tokens + token) of each canonical position
        self.n_rows = len(rows)
        self.default_block_rows = int(block_rows or self.seqlen * L)

    def describe(self) -> dict:
        return {
            "kind": "store",
            "path": str(self.path),
            "proj": self.proj,
            "layers": self.layers if len(self.layers) == 1 else "all",
            "n_tokens": self.n_tokens,
            "n_rows": self.n_rows,
            "width": self.width,
            "max_rows": self.max_rows,
            "subsample_seed": self.seed if self.max_rows else None,
            "store_meta": {k: v for k, v in self.meta.items() if isinstance(v, (int, float, str, bool))},
        }

    def layers_of(self, positions: np.ndarray) -> np.ndarray:
        return self.rows[positions] // self.n_tokens

    def read(self, positions: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
        from awq.masks import unpack

        ids = self.rows[np.asarray(positions, dtype=np.int64)]
        return unpack(self.store.read_rows(self.proj, ids), self.width, torch.float32, device)


def as_source(X: Any, block_rows: Optional[int] = None) -> Source:
    if isinstance(X, Source):
        return X
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(X)
    return TensorSource(X, block_rows)


# --------------------------------------------------------------------------------------------
# small exact helpers
# --------------------------------------------------------------------------------------------
def row_quantile(s: torch.Tensor, p: float) -> torch.Tensor:
    """Per-row quantile with linear interpolation, bit-identical to ``torch.quantile(s, p, dim=1)``
    (which refuses inputs above 16M elements)."""
    srt = s.sort(dim=1).values
    q = torch.tensor(p, dtype=s.dtype, device=s.device)
    ranks = q * (s.shape[1] - 1)
    below = ranks.long()
    above = ranks.ceil().long()
    w = ranks - below
    vb = srt[:, below]
    va = srt[:, above]
    return vb.lerp(va, w)


def config_hash(cfg: dict) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# estimator base class
# --------------------------------------------------------------------------------------------
class BinaryClusterer:
    """Base class of every method (sklearn-style: ``__init__`` stores, ``fit`` learns).

    Learned attributes: ``cluster_centers_`` (uint8 ``[K, F]``), ``labels_`` (int64 ``[n]``, one
    per source row in canonical order, -1 = unassigned; ``None`` when ``store_labels=False``),
    ``objective_history_`` (per iteration), ``cluster_sizes_`` (int64 ``[K]``, last iteration),
    ``n_iter_``, ``converged_``, ``history_`` (per-iteration dicts).
    """

    method = "base"

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

    def fit(self, X: Any, init: Optional[torch.Tensor | str | Path] = None) -> "BinaryClusterer":
        src = as_source(X, self.block_rows)
        self._validate(src)
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
        fp = config_hash({k: v for k, v in cfg.items() if k != "max_iter"})  # a run may be extended
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
            from awq.centroids import validate_centroids

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
        for s, e in src.blocks(self.block_rows):
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
    from awq.centroids import validate_centroids

    return validate_centroids(C.cpu(), name="result centroids")


# --------------------------------------------------------------------------------------------
# random rows / D1 seeding (shared by select_centroids and the baselines)
# --------------------------------------------------------------------------------------------
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
    Xo = X.to(torch.int8) if X.device.type == "cpu" else X  # overlap() operand, converted once
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


# --------------------------------------------------------------------------------------------
# CLI plumbing
# --------------------------------------------------------------------------------------------
def setup_logging(verbose: bool = False) -> None:
    rank = int(os.environ.get("RANK", dist_info()[0]))  # before init_process_group too
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def add_data_args(p: argparse.ArgumentParser, *, need_k: bool = True, need_output: bool = True) -> None:
    p.add_argument("--masks", type=Path, required=True, help="pattern store directory (written by awq.masks)")
    p.add_argument("--proj", choices=PROJS, required=True, help="projection whose patterns are clustered")
    p.add_argument("--layer", type=int, default=None, help="use one layer only (default: all layers pooled)")
    p.add_argument("--max_rows", type=int, default=None, help="deterministic random subsample of this many rows")
    p.add_argument("--block_rows", type=int, default=None,
                   help="rows per block (default seqlen x #layers = one window of all layers, the artifact's chunk)")
    p.add_argument("--allow_partial", action="store_true", help="accept a pattern store whose extraction is unfinished")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda[:i]")
    p.add_argument("--seed", type=int, default=42, help="random seed (the artifact uses 42)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    if need_k:
        p.add_argument("--k", type=int, required=True, help="number of clusters")
    if need_output:
        p.add_argument("--output", type=Path, required=True, help="output centroid file (.pt); a .json sidecar is written too")


def add_fit_args(p: argparse.ArgumentParser, max_iter: int) -> None:
    p.add_argument("--max_iter", type=int, default=max_iter, help=f"maximum iterations (default {max_iter})")
    p.add_argument("--init", default=None, help="initial centroids: a .pt file, or 'random' / 'kmeanspp'")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT.ckpt.pt after an interruption")
    p.add_argument("--no_progress", action="store_true", help="disable the tqdm progress bar")


def check_device(device: str) -> None:
    """Fail with one line when the requested device does not exist."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ClusteringError(f"bad --device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ClusteringError(f"--device {device}: CUDA is not available on this machine")


def make_source(args: argparse.Namespace) -> StoreSource:
    check_device(getattr(args, "device", "cpu"))
    return StoreSource(
        args.masks, args.proj, layer=args.layer, max_rows=args.max_rows, seed=args.seed,
        block_rows=args.block_rows, allow_partial=args.allow_partial,
    )


def checkpoint_path(output: Path) -> Path:
    return output.with_name(output.stem + ".ckpt.pt")


def write_result(est: BinaryClusterer, output: Path, proj: str, extra: Optional[dict] = None) -> dict:
    """Save the centroids (+ sidecar meta) and a results JSON next to them (rank 0 only)."""
    meta = est.result_meta()
    meta["proj"] = proj
    meta.update(extra or {})
    if dist_info()[0] == 0:
        save_centroids(output, est.cluster_centers_, meta)
        atomic_write_json(meta, output.with_name(output.stem + ".results.json"))
    return meta


def run_cli(fn: Callable[[], Any]) -> None:
    """Run a CLI body: bad input -> 'error: ...' on stderr and exit status 2."""
    try:
        fn()
    except (ClusteringError, CentroidError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
