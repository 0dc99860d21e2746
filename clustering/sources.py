"""Data sources: the {0,1} rows an estimator fits, read block by block.

:class:`TensorSource` is an in-memory tensor (tests, library use); :class:`StoreSource` is one
projection of a bit-packed pattern store (:class:`awq.store.pattern_store.PatternStore`, written by
``python -m awq.entry --dump_masks``), pooled over all layers or one layer, optionally
subsampled to ``max_rows``.  Rows have a *canonical order*: window-major (``token // seqlen``),
then layer, then token -- so consecutive blocks of ``seqlen * num_layers`` rows are exactly the
artifact's "chunks" (one 2048-token window x all layers).  A block is read, unpacked and handed
out as a float32 {0,1} tensor; memory is bounded by the block size.  Under torch.distributed
each rank reads its contiguous slice of every block (:meth:`Source.iter_blocks`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from awq.load.arch import PROJS
from awq.store.pattern_store import PatternStore
from clustering import ClusteringError
from clustering.distributed import dist_info, slice_bounds


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
        self._sha = hashlib.sha256(self.X.numpy().tobytes()).hexdigest()[:16]

    def describe(self) -> dict:
        return {"kind": "tensor", "n_rows": self.n_rows, "width": self.width, "sha256": self._sha}

    def read(self, positions: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.X[torch.from_numpy(np.asarray(positions, dtype=np.int64))].to(device=device, dtype=torch.float32)

    def read_range(self, start: int, stop: int, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.X[start:stop].to(device=device, dtype=torch.float32)


class StoreSource(Source):
    """Rows of one projection of a pattern store, pooled over layers (or one ``layer``), in the
    store's canonical order (:meth:`awq.store.pattern_store.PatternStore.rows`), optionally subsampled."""

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
        path = Path(path)
        if proj not in PROJS:
            raise ClusteringError(f"unknown projection {proj!r}; expected one of {list(PROJS)}")
        st = PatternStore(path, allow_partial=allow_partial)  # StoreError (a ValueError) on a bad store
        self.store, self.path, self.proj, self.meta = st, path, proj, st.meta
        if proj not in st.widths:
            raise ClusteringError(f"pattern store {path} has no {proj} patterns (widths: {st.widths})")
        if layer is not None and not 0 <= layer < st.num_layers:
            raise ClusteringError(f"--layer {layer} out of range: the store has {st.num_layers} layers")
        if st.n_tokens == 0:
            raise ClusteringError(f"pattern store {path} is empty (0 complete windows)")
        if max_rows is not None and max_rows <= 0:
            raise ClusteringError("--max_rows must be positive")
        self.rows = st.rows(proj, layer, max_rows=max_rows, seed=seed)
        self.layers = list(self.rows.layers)
        self.width, self.n_rows, self.n_tokens = self.rows.width, self.rows.n_rows, self.rows.n_tokens
        self.max_rows, self.seed = max_rows, seed
        self.default_block_rows = int(block_rows or self.rows.chunk_rows)

    def describe(self) -> dict:
        return {
            "kind": "store",
            **self.rows.describe(),
            "store_meta": {k: v for k, v in self.meta.items() if isinstance(v, (int, float, str, bool))},
        }

    def layers_of(self, positions: np.ndarray) -> np.ndarray:
        return self.rows.layers_of(positions)

    def read(self, positions: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.rows.read(positions, torch.float32, device)


def as_source(X: Any, block_rows: Optional[int] = None) -> Source:
    """A :class:`Source` as is; a tensor / numpy array as a :class:`TensorSource`."""
    if isinstance(X, Source):
        return X
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(X)
    return TensorSource(X, block_rows)
