"""Write a pattern store window by window, resumably (see :mod:`awq.store.pattern_store` for the layout).

:class:`StoreWriter` preallocates one ``.npy`` file per (kind, layer) for ``windows_total`` windows
and writes each window's rows with ``os.pwrite``.  After all rows of a window are written the
files are fdatasync'ed and ``meta.json`` is replaced atomically (:mod:`awq.util.io`, unique temp name)
with ``windows_done = i + 1``: a killed run leaves a store that a rerun resumes from the last
complete window, and a reader never sees rows of an unfinished window.  The writer holds an
advisory lock on ``DIR/.lock`` from construction to :meth:`StoreWriter.close`: a second writer of
the same store is refused at once (:class:`awq.util.io.LockedError`, one line).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from numpy.lib import format as npy_format

from awq.store.store_format import (
    BIT_ORDER,
    FORMAT_NAME,
    FORMAT_VERSION,
    IDENTITY_KEYS,
    INPUT_KIND,
    META_JSON_INDENT,
    PROJS,
    ROW_LAYOUT,
    WRITER_KEYS,
    StoreError,
    StoreMismatchError,
    is_meta_temp,
    layer_file,
    now,
    npy_header,
    read_meta,
)
from awq.util.io import atomic_path, atomic_write_json, disk_full_as_error, output_lock

__all__ = ["StoreWriter"]

log = logging.getLogger(__name__)


class StoreWriter:
    """Create or resume a store and write it window by window (used by the recorder and importers).

    ``meta`` carries the caller's identity fields (see :data:`IDENTITY_KEYS`: model,
    thresholds_sha256, dataset, dataset_source, split, corpus_sha256, dtype) and anything else worth keeping
    (thresholds path, package versions, ...).  ``num_layers`` is required; widths/hidden are
    learned from the first rows written (or given as ``meta["widths"]``/``meta["hidden"]`` and
    then checked).  Fields the writer derives itself (seqlen, windows_total, num_layers, ...) may
    appear in ``meta`` only with the same value.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        meta: Mapping[str, Any],
        total_windows: int,
        seqlen: int,
        num_layers: int,
        record_inputs: bool = False,
        sync: bool = True,
    ) -> None:
        if total_windows < 1 or seqlen < 1 or num_layers < 1:
            raise ValueError(
                f"total_windows, seqlen and num_layers must be >= 1 (got {total_windows}, {seqlen}, {num_layers})"
            )
        derived = {
            "seqlen": seqlen, "tokens_per_window": seqlen, "windows_total": total_windows,
            "record_inputs": bool(record_inputs), "num_layers": num_layers, "bit_order": BIT_ORDER,
        }
        for key in meta:
            if key in derived and meta[key] != derived[key]:
                raise ValueError(f"meta[{key!r}] = {meta[key]!r} contradicts the recorder's {key} = {derived[key]!r}")
            if key in WRITER_KEYS and key not in derived and key not in ("widths", "hidden"):
                raise ValueError(f"meta may not set the writer-owned field {key!r}")
        pre_widths = dict(meta.get("widths") or {})
        if any(p not in PROJS for p in pre_widths):
            raise ValueError(f"meta['widths'] keys must be among {PROJS}")
        self.root = Path(out_dir)
        self.seqlen, self.total_windows, self.num_layers = int(seqlen), int(total_windows), int(num_layers)
        self.record_inputs = bool(record_inputs)
        self.sync = bool(sync)
        self.kinds = PROJS + ((INPUT_KIND,) if self.record_inputs else ())
        new_meta = {k: v for k, v in meta.items() if k not in ("widths", "hidden")}
        new_meta.update(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            seqlen=self.seqlen,
            tokens_per_window=self.seqlen,
            windows_total=self.total_windows,
            windows_done=0,
            record_inputs=self.record_inputs,
            num_layers=self.num_layers,
            widths={p: int(w) for p, w in pre_widths.items()},
            hidden=None if meta.get("hidden") is None else int(meta["hidden"]),
            bit_order=BIT_ORDER,
            row_layout=ROW_LAYOUT,
            files={p: f"{p}/layer_<ll>.npy" for p in self.kinds},
            created=now(),
            window_stats=[],
        )
        try:  # what will be on disk (tuples become lists), and a clear error for unserialisable values
            new_meta = json.loads(json.dumps(new_meta))
        except (TypeError, ValueError) as e:
            raise ValueError(f"store meta must be JSON serialisable: {e}") from None
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} exists and is not a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the pattern store folder {self.root}: {e.strerror or e}") from None
        self._lock = output_lock(self.root, what="pattern store", folder=True)
        self._lock.__enter__()  # released by close()
        self._files: dict[tuple[str, int], tuple[int, int, int]] = {}  # (kind, layer) -> (fd, offset, row bytes)
        try:
            self._open_meta(new_meta, pre_widths)
        except BaseException:
            self.close()
            raise
        self._written: set[tuple[str, int]] = set()
        self._dirty: set[int] = set()

    def _open_meta(self, new_meta: dict, pre_widths: dict) -> None:
        if (self.root / "meta.json").exists():
            old = read_meta(self.root)
            for key in IDENTITY_KEYS:
                if old.get(key) != new_meta.get(key):
                    raise StoreMismatchError(
                        f"{self.root} holds a store with {key}={old.get(key)!r}, "
                        f"this run has {key}={new_meta.get(key)!r}; use another directory or delete it"
                    )
            if old.get("num_layers") != self.num_layers:
                raise StoreMismatchError(
                    f"{self.root} holds a store with num_layers={old.get('num_layers')!r}, "
                    f"the model has {self.num_layers}"
                )
            if not isinstance(old.get("window_stats"), list) or len(old["window_stats"]) != old["windows_done"]:
                raise StoreError(f"{self.root}/meta.json: window_stats does not have windows_done entries")
            # keep the creation record, refresh the free-form fields
            for key, val in pre_widths.items():
                if (old.get("widths") or {}).get(key, val) != val:
                    raise StoreMismatchError(
                        f"{self.root} holds {key} of width {old['widths'][key]}, this run says {val}"
                    )
            for key in ("created", "widths", "hidden", "windows_done", "window_stats"):
                new_meta[key] = old.get(key, new_meta[key])
            self.meta = new_meta
            log.info("resuming store %s at window %d/%d", self.root, self.meta["windows_done"], self.total_windows)
        else:
            if self.root.exists():
                if not all(is_meta_temp(p.name) for p in self.root.iterdir()):  # tmp: killed while creating
                    raise StoreError(
                        f"{self.root} is not empty and holds no meta.json: refusing to write a store there"
                    )
            self.meta = new_meta
            atomic_write_json(self.root / "meta.json", self.meta, what="pattern store meta", indent=META_JSON_INDENT)

    # -- state --------------------------------------------------------------------------------
    @property
    def windows_done(self) -> int:
        return int(self.meta["windows_done"])

    def window_stats(self) -> list[dict]:
        return [dict(s) for s in self.meta["window_stats"]]

    # -- files --------------------------------------------------------------------------------
    def _file(self, kind: str, layer: int, width: int, dtype: np.dtype) -> tuple[int, int, int]:
        key = (kind, layer)
        if key in self._files:
            return self._files[key]
        path = layer_file(self.root, kind, layer)
        cols = width if kind == INPUT_KIND else (width + 7) // 8
        shape = (self.total_windows * self.seqlen, cols)
        if path.exists():
            have_shape, have_dtype, offset = npy_header(path)
            if have_shape != shape or have_dtype != dtype:
                raise StoreError(f"{path} is {have_shape} {have_dtype}, expected {shape} {dtype}")
        else:
            if self.windows_done > 0:
                raise StoreError(
                    f"{path} is missing although {self.windows_done} windows are recorded: store is corrupt"
                )
            with atomic_path(path, what="pattern store file") as tmp:
                mm = npy_format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)  # sparse preallocation
                offset = int(mm.offset)
                del mm
        fd = os.open(path, os.O_RDWR)
        self._files[key] = (fd, offset, cols * dtype.itemsize)
        return self._files[key]

    def write(self, kind: str, layer: int, window: int, rows: np.ndarray, width: Optional[int] = None) -> None:
        """Write the ``seqlen`` rows of ``window`` for (kind, layer).

        Masks: ``rows`` packed uint8 ``[seqlen, ceil(width/8)]`` and ``width`` the unpacked width.
        Inputs: float16 ``[seqlen, hidden]``.
        """
        if kind not in self.kinds:
            raise ValueError(f"unknown or unrecorded kind '{kind}' (store records {self.kinds})")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        if window != self.windows_done:
            raise ValueError(f"window {window} is not the next window ({self.windows_done})")
        if rows.ndim != 2 or rows.shape[0] != self.seqlen:
            raise ValueError(
                f"{kind} layer {layer}: got rows of shape {tuple(rows.shape)}, expected [{self.seqlen}, ...]"
            )
        if kind == INPUT_KIND:
            dtype, width = np.dtype(np.float16), rows.shape[1]
            known = self.meta["hidden"]
        else:
            dtype = np.dtype(np.uint8)
            if width is None or (width + 7) // 8 != rows.shape[1]:
                raise ValueError(f"{kind} layer {layer}: width {width} does not fit {rows.shape[1]} packed bytes")
            known = self.meta["widths"].get(kind)
        if rows.dtype != dtype:
            raise ValueError(f"{kind} layer {layer}: rows are {rows.dtype}, expected {dtype}")
        if known is None:
            if kind == INPUT_KIND:
                self.meta["hidden"] = int(width)
            else:
                self.meta["widths"][kind] = int(width)
        elif known != width:
            raise StoreError(f"{kind} layer {layer} has width {width}, the store has {known}")
        fd, offset, row_bytes = self._file(kind, layer, width, dtype)
        buf = memoryview(np.ascontiguousarray(rows)).cast("B")
        pos = offset + window * self.seqlen * row_bytes
        with disk_full_as_error(layer_file(self.root, kind, layer), "pattern store file"):  # rows of a window that
            while len(buf):  # is never committed: a rerun rewrites them
                n = os.pwrite(fd, buf, pos)
                buf, pos = buf[n:], pos + n
        self._written.add((kind, layer))
        self._dirty.add(fd)

    def end_window(self, window: int, stats: Optional[dict] = None) -> None:
        """Check every (kind, layer) of ``window`` was written, sync the data, then commit meta.json."""
        if window != self.windows_done:
            raise ValueError(f"end_window({window}) but the next window is {self.windows_done}")
        missing = [(k, l) for k in self.kinds for l in range(self.num_layers) if (k, l) not in self._written]
        if missing:
            k, l = missing[0]
            raise StoreError(
                f"window {window}: no rows were recorded for {len(missing)} (kind, layer) pairs, e.g. {k} layer {l} "
                "(did the forward pass run between start_window and end_window?)"
            )
        entry = dict(stats or {})
        try:
            json.dumps(entry)
        except (TypeError, ValueError) as e:
            raise ValueError(f"window stats are not JSON serialisable: {e}") from None
        if self.sync:  # without it a killed process is still safe (page cache); a power cut is not
            with disk_full_as_error(self.root, "pattern store"):
                for fd in self._dirty:
                    os.fdatasync(fd)
        self._dirty.clear()
        self._written.clear()
        self.meta["windows_done"] = window + 1
        self.meta["window_stats"].append(entry)
        self.meta["updated"] = now()
        atomic_write_json(self.root / "meta.json", self.meta, what="pattern store meta", indent=META_JSON_INDENT)

    def abort_window(self) -> None:
        """Forget rows written since the last end_window (they are overwritten on resume)."""
        self._written.clear()

    def close(self) -> None:
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files.clear()
        getattr(self, "_dirty", set()).clear()
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.__exit__(None, None, None)
