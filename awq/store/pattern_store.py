"""Bit-packed, streamed, resumable store of MLP activation patterns: the one reader (and the public names).

Layout of a store directory (readable with numpy alone, see docs/formats.md "Pattern store")::

    DIR/meta.json                 identity + shape information, windows_done, per-window stats
    DIR/<proj>/layer_<ll>.npy     uint8 [windows_total * seqlen, ceil(width / 8)], proj in gate_proj/up_proj/down_proj
    DIR/input/layer_<ll>.npy      float16 [windows_total * seqlen, hidden]   (only with record_inputs)

Row ``r`` of every file is token ``r`` of the scored token stream (window ``r // seqlen``); a row
of a mask file is ``numpy.packbits(mask, axis=-1)`` (big bit order: bit 7 of byte 0 is neuron 0,
see :mod:`awq.store.bitpack`) with ``mask = (thresholded output != 0)``.  Only the first
``windows_done * seqlen`` rows are valid; files are preallocated for ``windows_total`` windows.

Writing: :class:`StoreWriter` (:mod:`awq.store.store_writer`) and, from a model's forward pass,
``awq.methods.recording.record_masks``; both commit whole windows (fdatasync + atomic ``meta.json``).

Reading (:class:`PatternStore`, memory-maps files lazily; every read here has bounded memory)
------------------------------------------------------------------------------------------------
Row ids: per layer, ``token`` (0 .. n_tokens-1); *pooled* over layers, ``layer * n_tokens + token``.

* ``PatternStore(path, allow_partial=False)``: ``.meta``, ``.num_layers``, ``.widths`` (proj ->
  width), ``.hidden``, ``.seqlen``, ``.n_tokens`` (complete windows only).
* ``.layer(proj, l)`` / ``.inputs(l)``: read-only maps ``[n_tokens, ceil(w/8)]`` / ``[n_tokens, hidden]``.
* ``.n_rows(proj, layer=None)``; ``.read_rows(proj, ids, layer=None)``: packed rows of any ids (pooled,
  or per layer), in the given order.
* ``.iter_blocks(proj, layer=None, block_rows, max_rows, seed, rank, world_size)``: ``(ids, packed)``
  in increasing row-id order (layer-major), optionally a seeded subsample and a rank's shard.
* ``.rows(proj, layer=None, *, max_rows=None, seed=0)`` -> :class:`StoreRows`: the rows in
  **canonical order** -- window-major, then layer, then token -- so consecutive blocks of
  ``chunk_rows = seqlen * n_layers`` rows are the artifact's "chunks" (one window x all layers).
  ``max_rows`` (the row budget) keeps a uniform seeded subsample, in canonical order, of exactly
  ``min(max_rows, rows)`` rows: positions ``sort(default_rng(seed).choice(rows, max_rows, replace=False))``.
  A :class:`StoreRows` maps a *position* ``p`` (0 .. n_rows-1) to its row:
  ``row_ids(p)`` (pooled ids), ``layers_of(p)``, ``tokens_of(p)``, ``read_packed(p)`` (uint8),
  ``read(p, dtype, device)`` / ``read_range(start, stop, ...)`` (unpacked {0,1} tensors),
  ``blocks(block_rows)`` and ``iter_blocks(block_rows, packed=False, ...)`` -> ``(start, stop, rows)``
  over all positions (default block: one chunk).

Errors: :class:`StoreError` (a ``ValueError``, one-line message naming the file) for missing,
corrupt, incomplete or mismatched stores; :class:`StoreMismatchError` when a rerun's identity
differs from the store it would resume.
"""
from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from awq.store.bitpack import pack, packed_width, unpack
from awq.store.store_format import (
    BIT_ORDER,
    FORMAT_NAME,
    FORMAT_VERSION,
    IDENTITY_KEYS,
    INPUT_KIND,
    PROJS,
    ROW_LAYOUT,
    StoreError,
    StoreMismatchError,
    layer_file,
    npy_header,
    read_meta,
)
from awq.store.store_writer import StoreWriter

__all__ = [
    "PatternStore", "StoreRows", "StoreWriter", "StoreError", "StoreMismatchError", "pack", "unpack",
    "layer_file", "BIT_ORDER", "FORMAT_NAME", "FORMAT_VERSION", "IDENTITY_KEYS", "INPUT_KIND", "ROW_LAYOUT",
]

_PAGE = mmap.PAGESIZE


class _Mapped:
    """A read-only mapping of one layer file; pages are dropped after streaming reads."""

    def __init__(self, path: Path, shape: tuple[int, int], dtype: np.dtype, offset: int) -> None:
        self.path, self.offset = path, offset
        self.row_bytes = shape[1] * dtype.itemsize
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.array = np.frombuffer(self.mm, dtype=dtype, count=shape[0] * shape[1], offset=offset).reshape(shape)

    def drop(self, row0: int, row1: int) -> None:
        """Release the pages of rows [row0, row1) from this process (keeps peak RSS bounded)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = (self.offset + row0 * self.row_bytes) // _PAGE * _PAGE
        end = min(len(self.mm), self.offset + row1 * self.row_bytes)
        if end > start:
            self.mm.madvise(mmap.MADV_DONTNEED, start, end - start)


class PatternStore:
    """Read a pattern store.  Nothing is loaded until asked; streaming reads have bounded memory."""

    def __init__(self, path: str | Path, *, allow_partial: bool = False) -> None:
        self.root = Path(path)
        if not self.root.is_dir():
            raise StoreError(f"pattern store {self.root} does not exist")
        self.meta = read_meta(self.root)
        m = self.meta
        if not isinstance(m.get("num_layers"), int) or m["num_layers"] < 1:
            raise StoreError(f"{self.root}/meta.json: 'num_layers' missing or invalid")
        widths = m.get("widths")
        if m["windows_done"] > 0 and (not isinstance(widths, dict) or sorted(widths) != sorted(PROJS)):
            raise StoreError(f"{self.root}/meta.json: 'widths' must give {list(PROJS)}")
        if m["windows_done"] < m["windows_total"] and not allow_partial:
            raise StoreError(
                f"pattern store {self.root} is incomplete ({m['windows_done']}/{m['windows_total']} windows); "
                "rerun the extraction to finish it, or open with allow_partial=True"
            )
        self.num_layers: int = m["num_layers"]
        self.widths: dict[str, int] = {p: int(w) for p, w in (widths or {}).items()}
        self.hidden: Optional[int] = m.get("hidden")
        self.seqlen: int = m["tokens_per_window"]
        self.n_tokens: int = m["windows_done"] * self.seqlen
        self._rows_alloc = m["windows_total"] * self.seqlen
        self._maps: dict[tuple[str, int], _Mapped] = {}

    def __repr__(self) -> str:
        return (
            f"PatternStore({str(self.root)!r}, layers={self.num_layers}, tokens={self.n_tokens}, widths={self.widths})"
        )

    # -- per-layer views ------------------------------------------------------------------------
    def _check(self, proj: str, layer: Optional[int]) -> None:
        if proj not in self.widths:
            raise StoreError(f"unknown projection '{proj}' (store has {sorted(self.widths)})")
        if layer is not None and not 0 <= layer < self.num_layers:
            raise StoreError(f"layer {layer} out of range 0..{self.num_layers - 1}")

    def _map(self, kind: str, layer: int) -> _Mapped:
        key = (kind, layer)
        if key not in self._maps:
            path = layer_file(self.root, kind, layer)
            if kind == INPUT_KIND:
                shape, dtype = (self._rows_alloc, self.hidden or 0), np.dtype(np.float16)
            else:
                shape, dtype = (self._rows_alloc, (self.widths[kind] + 7) // 8), np.dtype(np.uint8)
            have_shape, have_dtype, offset = npy_header(path)
            if have_shape != shape or have_dtype != dtype:
                raise StoreError(f"{path} is {have_shape} {have_dtype}, meta.json implies {shape} {dtype}")
            self._maps[key] = _Mapped(path, shape, dtype, offset)
        return self._maps[key]

    def layer(self, proj: str, layer: int) -> np.ndarray:
        """Read-only memory map of the complete rows, uint8 ``[n_tokens, ceil(width/8)]``."""
        self._check(proj, layer)
        return self._map(proj, layer).array[: self.n_tokens]

    def inputs(self, layer: int) -> np.ndarray:
        """Read-only memory map of the recorded MLP inputs, float16 ``[n_tokens, hidden]``."""
        if not self.meta.get("record_inputs") or not self.hidden:
            raise StoreError(f"pattern store {self.root} has no MLP inputs (record with --dump_inputs)")
        if not 0 <= layer < self.num_layers:
            raise StoreError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        return self._map(INPUT_KIND, layer).array[: self.n_tokens]

    def n_rows(self, proj: str, layer: Optional[int] = None) -> int:
        self._check(proj, layer)
        return self.n_tokens if layer is not None else self.n_tokens * self.num_layers

    # -- streaming ------------------------------------------------------------------------------
    def _gather_sorted(self, proj: str, layer: Optional[int], ids: np.ndarray, drop: bool) -> np.ndarray:
        """Packed rows for sorted ids (pooled ids if layer is None)."""
        out = np.empty((len(ids), packed_width(self.widths[proj])), dtype=np.uint8)
        if len(ids) == 0:
            return out
        n = self.n_tokens
        if layer is None:
            layers = ids // n
            tokens = ids - layers * n
            first, last = int(layers[0]), int(layers[-1])
            cuts = np.searchsorted(layers, np.arange(first, last + 2))
            segments = [(l, int(cuts[j]), int(cuts[j + 1])) for j, l in enumerate(range(first, last + 1))]
        else:
            tokens = ids
            segments = [(layer, 0, len(ids))]
        for l, a, b in segments:
            if b <= a:
                continue
            mp = self._map(proj, l)
            t0, t1 = int(tokens[a]), int(tokens[b - 1]) + 1
            # contiguous run (sorted, so a full range without repeats): one slice copy
            if t1 - t0 == b - a and (b - a < 2 or bool(np.all(np.diff(tokens[a:b]) == 1))):
                out[a:b] = mp.array[t0:t1]
            else:
                out[a:b] = mp.array[tokens[a:b]]
            if drop:
                mp.drop(t0, t1)
        return out

    def iter_blocks(
        self,
        proj: str,
        layer: Optional[int] = None,
        *,
        block_rows: int = 65536,
        max_rows: Optional[int] = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(row_ids int64 [b], packed uint8 [b, ceil(w/8)])`` blocks in increasing row-id order.

        ``layer=None`` pools all layers (row id = layer * n_tokens + token).  ``max_rows`` draws a
        uniform subsample without replacement that depends only on ``seed`` and the row count (the
        same for every rank); ``rank``/``world_size`` give contiguous shards of the (sub)sampled
        ids, so every row is yielded exactly once over all ranks.  Memory is bounded by the block.
        """
        self._check(proj, layer)
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1 (got {block_rows})")
        if not (world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size (got rank={rank}, world_size={world_size})")
        n = self.n_rows(proj, layer)
        ids: Optional[np.ndarray] = None
        m = n
        if max_rows is not None:
            if max_rows < 0:
                raise ValueError(f"max_rows must be >= 0 (got {max_rows})")
            if max_rows < n:
                rng = np.random.default_rng(seed)
                ids = np.sort(rng.choice(n, size=max_rows, replace=False)).astype(np.int64)
                m = max_rows
        lo, hi = m * rank // world_size, m * (rank + 1) // world_size
        for b0 in range(lo, hi, block_rows):
            b1 = min(b0 + block_rows, hi)
            rid = np.arange(b0, b1, dtype=np.int64) if ids is None else ids[b0:b1]
            yield rid, self._gather_sorted(proj, layer, rid, drop=True)

    def read_rows(self, proj: str, row_ids: Any, layer: Optional[int] = None) -> np.ndarray:
        """Packed rows for the given (pooled, or per-layer if ``layer`` is given) row ids, in the given order."""
        self._check(proj, layer)
        ids = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        n = self.n_rows(proj, layer)
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            raise StoreError(f"row ids out of range 0..{n - 1} for {proj}")
        if len(ids) < 2 or bool(np.all(ids[1:] >= ids[:-1])):  # already sorted (e.g. canonical blocks)
            return self._gather_sorted(proj, layer, ids, drop=True)
        order = np.argsort(ids, kind="stable")
        rows = self._gather_sorted(proj, layer, ids[order], drop=True)
        out = np.empty_like(rows)
        out[order] = rows
        return out

    def rows(
        self, proj: str, layer: Optional[int] = None, *, max_rows: Optional[int] = None, seed: int = 0
    ) -> "StoreRows":
        """The rows of ``proj`` (pooled, or of one ``layer``) in canonical order, see :class:`StoreRows`."""
        return StoreRows(self, proj, layer, max_rows=max_rows, seed=seed)

    def close(self) -> None:
        """Drop all mappings (views returned by layer()/inputs() must not be used afterwards)."""
        self._maps.clear()


class StoreRows:
    """Rows of one projection in canonical order: window-major, then layer, then token.

    Canonical position ``c`` of ``L`` layers and windows of ``S`` tokens is window ``c // (L*S)``,
    layer ``layers[c % (L*S) // S]``, token ``window * S + c % S``.  With ``max_rows`` (the row
    budget) only a seeded uniform subsample of canonical positions is kept, still in canonical
    order; *positions* ``0 .. n_rows-1`` index the kept rows.  Nothing is materialised: ids are
    computed per request, so memory is bounded by what is read.
    """

    def __init__(
        self, store: PatternStore, proj: str, layer: Optional[int] = None, *,
        max_rows: Optional[int] = None, seed: int = 0,
    ) -> None:
        store._check(proj, layer)
        self.store, self.proj = store, proj
        self.layers: tuple[int, ...] = (int(layer),) if layer is not None else tuple(range(store.num_layers))
        self._layer_ids = np.asarray(self.layers, dtype=np.int64)
        self.width = int(store.widths[proj])
        self.n_tokens = int(store.n_tokens)
        self.seqlen = max(int(store.seqlen), 1)
        self.chunk_rows = self.seqlen * len(self.layers)  # one window x all layers
        self.n_canonical = self.n_tokens * len(self.layers)
        self.max_rows, self.seed = max_rows, int(seed)
        self._keep: Optional[np.ndarray] = None
        if max_rows is not None:
            if int(max_rows) < 1:
                raise ValueError(f"max_rows must be positive (got {max_rows})")
            if max_rows < self.n_canonical:
                rng = np.random.default_rng(seed)
                self._keep = np.sort(rng.choice(self.n_canonical, size=int(max_rows), replace=False)).astype(np.int64)
        self.n_rows = self.n_canonical if self._keep is None else len(self._keep)

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return f"StoreRows({self.proj}, layers={len(self.layers)}, n_rows={self.n_rows}, width={self.width})"

    def _split(self, positions: Any) -> tuple[np.ndarray, np.ndarray]:
        """(layer index into self.layers, token) of each position."""
        p = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(p) and (p.min() < 0 or p.max() >= self.n_rows):
            raise StoreError(f"positions out of range 0..{self.n_rows - 1} for {self.proj} rows of {self.store.root}")
        c = p if self._keep is None else self._keep[p]
        window, r = np.divmod(c, self.chunk_rows)
        li, t = np.divmod(r, self.seqlen)
        return li, window * self.seqlen + t

    def row_ids(self, positions: Any = None) -> np.ndarray:
        """Pooled row ids (``layer * n_tokens + token``) of ``positions`` (default: all, int64 ``[n_rows]``)."""
        li, tok = self._split(np.arange(self.n_rows) if positions is None else positions)
        return self._layer_ids[li] * self.n_tokens + tok

    def layers_of(self, positions: Any) -> np.ndarray:
        return self._layer_ids[self._split(positions)[0]]

    def tokens_of(self, positions: Any) -> np.ndarray:
        return self._split(positions)[1]

    def read_packed(self, positions: Any) -> np.ndarray:
        """uint8 ``[len, ceil(width/8)]`` rows at ``positions`` (any order, repeats allowed)."""
        return self.store.read_rows(self.proj, self.row_ids(positions))

    def read(self, positions: Any, dtype: torch.dtype = torch.float32, device: Any = "cpu") -> torch.Tensor:
        """{0,1} ``[len, width]`` tensor of ``dtype`` on ``device`` for ``positions``."""
        return unpack(self.read_packed(positions), self.width, dtype, device)

    def read_range(self, start: int, stop: int, dtype: torch.dtype = torch.float32, device: Any = "cpu") -> torch.Tensor:
        return self.read(np.arange(start, stop, dtype=np.int64), dtype, device)

    def blocks(self, block_rows: Optional[int] = None) -> list[tuple[int, int]]:
        """``[start, stop)`` of consecutive blocks covering all positions (default: one chunk each)."""
        br = int(block_rows or self.chunk_rows)
        if br < 1:
            raise ValueError(f"block_rows must be >= 1 (got {block_rows})")
        return [(s, min(s + br, self.n_rows)) for s in range(0, self.n_rows, br)]

    def iter_blocks(
        self, block_rows: Optional[int] = None, *, packed: bool = False,
        dtype: torch.dtype = torch.float32, device: Any = "cpu",
    ) -> Iterator[tuple[int, int, Any]]:
        """Yield ``(start, stop, rows)`` over all positions in order; rows packed uint8 or unpacked."""
        for s, e in self.blocks(block_rows):
            pos = np.arange(s, e, dtype=np.int64)
            yield s, e, (self.read_packed(pos) if packed else self.read(pos, dtype, device))

    def describe(self) -> dict:
        return {
            "path": str(self.store.root), "proj": self.proj,
            "layers": list(self.layers) if len(self.layers) == 1 else "all",
            "n_tokens": self.n_tokens, "n_rows": self.n_rows, "width": self.width, "max_rows": self.max_rows,
            "subsample_seed": self.seed if self.max_rows else None,
        }
