"""Bit-packed, streamed, resumable store of MLP activation patterns.

Layout of a store directory (readable with numpy alone, see the README "Pattern store")::

    DIR/meta.json                 identity + shape information, windows_done, per-window stats
    DIR/<proj>/layer_<ll>.npy     uint8 [windows_total * seqlen, ceil(width / 8)], proj in gate_proj/up_proj/down_proj
    DIR/input/layer_<ll>.npy      float16 [windows_total * seqlen, hidden]   (only with record_inputs)

Row ``r`` of every file is token ``r`` of the scored token stream (window ``r // seqlen``); a row
of a mask file is ``numpy.packbits(mask, axis=-1)`` (big bit order: bit 7 of byte 0 is neuron 0)
with ``mask = (thresholded output != 0)``.  Only the first ``windows_done * seqlen`` rows are
valid; files are preallocated for ``windows_total`` windows.

Writing (:func:`record_masks`, :class:`StoreWriter`) goes window by window with ``os.pwrite``
into the preallocated files; after all rows of a window are written the files are fdatasync'ed
and ``meta.json`` is replaced atomically with ``windows_done = i + 1``.  A killed run therefore
leaves a store that a rerun resumes from the last complete window.

Reading (:class:`PatternStore`) memory-maps the files lazily; :meth:`PatternStore.iter_blocks`
streams blocks of rows (pooled over layers or of one layer) with bounded memory.
"""
from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from numpy.lib import format as npy_format

from awq.sparse_mlp import PROJS, add_observer, remove_observer, sparse_mlps

log = logging.getLogger(__name__)

FORMAT_NAME = "awq-pattern-store"
FORMAT_VERSION = 1
INPUT_KIND = "input"
BIT_ORDER = "big"
ROW_LAYOUT = (
    "row r of every layer file = token r of the scored stream (window r // tokens_per_window); "
    "pooled row id = layer * n_tokens + token"
)
# meta fields that must agree for a rerun to resume into an existing store
IDENTITY_KEYS: tuple[str, ...] = (
    "model",
    "thresholds_sha256",
    "dataset",
    "dataset_source",
    "split",
    "corpus_sha256",
    "dtype",
    "seqlen",
    "windows_total",
    "record_inputs",
)
# fields the writer owns; a caller's meta may not set them
_WRITER_KEYS = (
    "format",
    "format_version",
    "num_layers",
    "widths",
    "hidden",
    "bit_order",
    "row_layout",
    "windows_total",
    "windows_done",
    "tokens_per_window",
    "seqlen",
    "record_inputs",
    "created",
    "updated",
    "window_stats",
)


class StoreError(ValueError):
    """A pattern store is missing, corrupt, incomplete or does not fit the request."""


class StoreMismatchError(StoreError):
    """An existing store was written with different identity fields than the current run."""


# --------------------------------------------------------------------------------------------
# pack / unpack
# --------------------------------------------------------------------------------------------
_PACK_WEIGHTS: dict[torch.device, torch.Tensor] = {}
_UNPACK_LUT: dict[torch.device, torch.Tensor] = {}


def _pack_torch(mask: torch.Tensor) -> torch.Tensor:
    """Pack on the tensor's device (used for accelerators: moves 8x fewer bytes to the host)."""
    m = mask != 0
    w = m.shape[-1]
    pad = (-w) % 8
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    dev = m.device
    if dev not in _PACK_WEIGHTS:
        _PACK_WEIGHTS[dev] = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=dev)
    m = m.reshape(*m.shape[:-1], (w + pad) // 8, 8).to(torch.uint8)
    return (m * _PACK_WEIGHTS[dev]).sum(-1, dtype=torch.uint8)


def pack(mask: Any) -> np.ndarray:
    """Bit-pack a mask along its last axis: bool/0-1 (any nonzero = 1) ``[..., w]`` -> uint8 ``[..., ceil(w/8)]``.

    Same bytes as ``numpy.packbits(mask != 0, axis=-1)`` (big bit order).  Accepts numpy arrays
    and torch tensors on any device (packed on the device, then copied to the host).
    """
    if isinstance(mask, torch.Tensor):
        if mask.device.type != "cpu":
            return _pack_torch(mask.detach()).cpu().numpy()
        if mask.dtype == torch.bfloat16:  # the only dtype here numpy lacks
            mask = mask.detach() != 0
        # numpy, not torch, for the comparison: torch's threaded ops are slow on a busy CPU
        mask = mask.detach().numpy()
    m = np.asarray(mask)
    if m.dtype.kind == "f" or m.dtype.kind == "c":
        m = m != 0
    # packbits treats any nonzero integer as a 1 bit, so integer/bool masks need no comparison
    return np.packbits(m, axis=-1)


def _unpack_lut(device: torch.device) -> torch.Tensor:
    if device not in _UNPACK_LUT:
        lut = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1)  # [256, 8]
        _UNPACK_LUT[device] = torch.from_numpy(lut).to(device)
    return _UNPACK_LUT[device]


def unpack(
    packed: Any,
    width: int,
    dtype: torch.dtype = torch.float32,
    device: Any = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., ceil(width/8)]`` -> {0,1} tensor ``[..., width]`` of ``dtype``.

    On the CPU this is ``numpy.unpackbits`` (about 1.4 GB/s of packed data per core to uint8);
    other dtypes, and any ``out`` buffer, are filled in pieces of about 1 MB of packed rows so no
    full-size temporary is made.  Passing a reused ``out`` (shape ``[..., width]``, dtype
    ``dtype``) avoids page-faulting a fresh output for every block.  On an accelerator the packed
    bytes are moved first (8x fewer bytes) and expanded with a 256x8 lookup table on the device.
    """
    nbytes = (width + 7) // 8
    dev = torch.device(device) if device is not None else (out.device if out is not None else None)
    if isinstance(packed, torch.Tensor):
        if packed.dtype != torch.uint8:
            raise ValueError(f"unpack expects uint8 packed data, got {packed.dtype}")
        if dev is None:
            dev = packed.device
    else:
        packed = np.asarray(packed)
        if packed.dtype != np.uint8:
            raise ValueError(f"unpack expects uint8 packed data, got {packed.dtype}")
        if dev is None:
            dev = torch.device("cpu")
    if packed.shape[-1] != nbytes:
        raise ValueError(f"packed rows have {packed.shape[-1]} bytes but width {width} needs {nbytes}")
    shape = (*packed.shape[:-1], width)
    if out is not None and (
        tuple(out.shape) != shape or out.dtype != dtype or out.device != dev or not out.is_contiguous()
    ):
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype} on {out.device}, need contiguous {shape} {dtype} on {dev}"
        )
    if dev.type != "cpu":
        res = _unpack_torch(torch.as_tensor(packed).to(dev, non_blocking=True), width, dtype)
        return res if out is None else out.copy_(res)
    arr = packed.cpu().numpy() if isinstance(packed, torch.Tensor) else packed
    if out is None and dtype in (torch.uint8, torch.bool):
        res = torch.from_numpy(np.unpackbits(arr, axis=-1, count=width))
        return res.view(torch.bool) if dtype == torch.bool else res
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    flat_in, flat_out = arr.reshape(-1, nbytes), out.view(-1, width)
    # numpy does the casts (torch's threaded copy_ is slow on busy CPUs); numpy has no bfloat16,
    # but {0, 1} in bfloat16 is the bit pattern {0, 0x3F80}: write bits * 0x3F80 into an int16 view
    if dtype == torch.bfloat16:
        np_out, scale = flat_out.view(torch.int16).numpy(), np.int16(0x3F80)
    else:
        np_out, scale = flat_out.numpy(), None
    step = max(1, (1 << 18) // nbytes)
    for a in range(0, flat_in.shape[0], step):
        bits = np.unpackbits(flat_in[a : a + step], axis=-1, count=width)
        if scale is None:
            np.copyto(np_out[a : a + step], bits, casting="unsafe")
        else:
            np.multiply(bits, scale, out=np_out[a : a + step], casting="unsafe")
    return out


def _unpack_torch(t: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Lookup-table unpack on the tensor's device (the accelerator path of :func:`unpack`)."""
    out = _unpack_lut(t.device)[t.long()].reshape(*t.shape[:-1], t.shape[-1] * 8)
    if width != t.shape[-1] * 8:
        out = out[..., :width]
    return out.to(dtype).contiguous()


# --------------------------------------------------------------------------------------------
# small file helpers
# --------------------------------------------------------------------------------------------
def layer_file(root: Path, kind: str, layer: int) -> Path:
    return Path(root) / kind / f"layer_{layer:02d}.npy"


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file; StoreError if unreadable or the size is wrong."""
    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = npy_format.read_array_header_2_0(f)
            offset = f.tell()
    except FileNotFoundError:
        raise StoreError(f"missing store file {path}") from None
    except (ValueError, OSError) as e:
        raise StoreError(f"store file {path} is not a valid .npy file: {e}") from None
    if fortran:
        raise StoreError(f"store file {path} is Fortran-ordered (expected C order)")
    expect = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != expect:
        raise StoreError(f"store file {path} has {size} bytes, its header {shape} {dtype} needs {expect}")
    return tuple(int(s) for s in shape), dtype, offset


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename durable too
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _read_meta(root: Path) -> dict:
    path = root / "meta.json"
    if not path.is_file():
        raise StoreError(f"{root} is not a pattern store (no meta.json)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is corrupt (not valid JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise StoreError(f"{path} is not a pattern-store meta.json (format != '{FORMAT_NAME}')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path}: unsupported format_version {meta.get('format_version')!r} (want {FORMAT_VERSION})")
    for key, typ in (("windows_total", int), ("windows_done", int), ("tokens_per_window", int)):
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool) or meta[key] < 0:
            raise StoreError(f"{path}: field '{key}' is missing or not a non-negative integer")
    if meta["windows_done"] > meta["windows_total"]:
        raise StoreError(f"{path}: windows_done {meta['windows_done']} > windows_total {meta['windows_total']}")
    return meta


# --------------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------------
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
            if key in _WRITER_KEYS and key not in derived and key not in ("widths", "hidden"):
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
            created=_now(),
            window_stats=[],
        )
        try:  # what will be on disk (tuples become lists), and a clear error for unserialisable values
            new_meta = json.loads(json.dumps(new_meta))
        except (TypeError, ValueError) as e:
            raise ValueError(f"store meta must be JSON serialisable: {e}") from None
        if (self.root / "meta.json").exists():
            old = _read_meta(self.root)
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
                if not self.root.is_dir():
                    raise StoreError(f"{self.root} exists and is not a directory")
                if any(p.name != "meta.json.tmp" for p in self.root.iterdir()):  # tmp: killed while creating
                    raise StoreError(
                        f"{self.root} is not empty and holds no meta.json: refusing to write a store there"
                    )
            self.root.mkdir(parents=True, exist_ok=True)
            self.meta = new_meta
            _atomic_write_json(self.root / "meta.json", self.meta)
        self._files: dict[tuple[str, int], tuple[int, int, int]] = {}  # (kind, layer) -> (fd, offset, row bytes)
        self._written: set[tuple[str, int]] = set()
        self._dirty: set[int] = set()

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
            have_shape, have_dtype, offset = _npy_header(path)
            if have_shape != shape or have_dtype != dtype:
                raise StoreError(f"{path} is {have_shape} {have_dtype}, expected {shape} {dtype}")
        else:
            if self.windows_done > 0:
                raise StoreError(
                    f"{path} is missing although {self.windows_done} windows are recorded: store is corrupt"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            mm = npy_format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)  # sparse preallocation
            offset = int(mm.offset)
            del mm
            os.replace(tmp, path)
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
        while len(buf):
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
            for fd in self._dirty:
                os.fdatasync(fd)
        self._dirty.clear()
        self._written.clear()
        self.meta["windows_done"] = window + 1
        self.meta["window_stats"].append(entry)
        self.meta["updated"] = _now()
        _atomic_write_json(self.root / "meta.json", self.meta)

    def abort_window(self) -> None:
        """Forget rows written since the last end_window (they are overwritten on resume)."""
        self._written.clear()

    def close(self) -> None:
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files.clear()
        self._dirty.clear()


# --------------------------------------------------------------------------------------------
# recorder
# --------------------------------------------------------------------------------------------
class MaskRecorder:
    """Observer that writes each window's masks (and optionally MLP inputs) to a :class:`StoreWriter`."""

    def __init__(self, writer: StoreWriter) -> None:
        self.writer = writer
        self._cur: Optional[int] = None

    @property
    def windows_done(self) -> int:
        return self.writer.windows_done

    @property
    def meta(self) -> dict:
        return self.writer.meta

    def start_window(self, i: int) -> None:
        if i != self.writer.windows_done:
            raise ValueError(f"start_window({i}) but the next window to record is {self.writer.windows_done}")
        self.writer.abort_window()
        self._cur = i

    def end_window(self, i: int, stats: Optional[dict] = None) -> None:
        if self._cur != i:
            raise ValueError(f"end_window({i}) without start_window({i})")
        self.writer.end_window(i, stats)
        self._cur = None

    def window_stats(self) -> list[dict]:
        return self.writer.window_stats()

    def observe(self, layer: int, name: str, y: torch.Tensor) -> None:
        if name == INPUT_KIND and not self.writer.record_inputs:
            return
        if self._cur is None:
            raise RuntimeError("model forward while recording masks but outside start_window()/end_window()")
        if y.dim() != 3 or y.shape[0] != 1:
            raise ValueError(
                f"mask recording needs batch size 1 inputs [1, seqlen, width]; got {tuple(y.shape)} at {name}"
            )
        if y.shape[1] != self.writer.seqlen:
            raise ValueError(f"mask recording expects windows of {self.writer.seqlen} tokens, got {y.shape[1]}")
        y = y.detach()[0]
        if name == INPUT_KIND:
            if y.device.type == "cpu" and y.dtype in (torch.float32, torch.float16, torch.float64):
                rows = y.numpy().astype(np.float16, copy=False)  # numpy: torch threads are slow on a busy CPU
            else:
                rows = y.to(torch.float16).cpu().numpy()
            self.writer.write(INPUT_KIND, layer, self._cur, rows)
        else:
            self.writer.write(name, layer, self._cur, pack(y), width=int(y.shape[-1]))


@contextlib.contextmanager
def record_masks(
    model: torch.nn.Module,
    out_dir: str | Path,
    *,
    meta: dict,
    total_windows: int,
    seqlen: int,
    record_inputs: bool = False,
    sync: bool = True,
) -> Iterator[MaskRecorder]:
    """Record ``(thresholded output != 0)`` of every projection of every layer of a sparsified model.

    Usage::

        with record_masks(model, "masks/", meta=identity, total_windows=n, seqlen=2048) as rec:
            for i in range(n):
                if i < rec.windows_done:          # resumed: already on disk
                    continue
                rec.start_window(i)
                nll = score(model, window(i))      # batch [1, seqlen]
                rec.end_window(i, {"nll": nll})
            all_stats = rec.window_stats()

    ``meta`` holds the run's identity under the keys of :data:`IDENTITY_KEYS` (``model``,
    ``thresholds_sha256``, ``dataset``, ``dataset_source``, ``split``, ``corpus_sha256``,
    ``dtype``; a missing key counts as None) plus any other JSON-serialisable provenance
    (thresholds path, versions, ...).
    Raises :class:`StoreMismatchError` if ``out_dir`` holds a store with other identity fields
    (or another seqlen, total_windows, record_inputs), :class:`StoreError` if ``out_dir`` is a
    non-empty directory without meta.json.  The model must be called with batch size 1.
    ``sync=False`` skips the per-window fdatasync of the data files (still safe against a killed
    process, not against a power cut; for fast accelerators with big models).
    """
    mlps = sparse_mlps(model)
    if not mlps:
        raise RuntimeError("model has no SparseMLP modules: call sparsify_() before record_masks()")
    writer = StoreWriter(
        out_dir, meta=meta, total_windows=total_windows, seqlen=seqlen, num_layers=len(mlps),
        record_inputs=record_inputs, sync=sync,
    )
    rec = MaskRecorder(writer)
    add_observer(model, rec.observe)
    try:
        yield rec
    finally:
        remove_observer(model, rec.observe)
        writer.close()


# --------------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------------
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
        self.meta = _read_meta(self.root)
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
            have_shape, have_dtype, offset = _npy_header(path)
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
        out = np.empty((len(ids), (self.widths[proj] + 7) // 8), dtype=np.uint8)
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
            if t1 - t0 == b - a:  # contiguous run: one slice copy
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
        order = np.argsort(ids, kind="stable")
        rows = self._gather_sorted(proj, layer, ids[order], drop=True)
        out = np.empty_like(rows)
        out[order] = rows
        return out

    def close(self) -> None:
        """Drop all mappings (views returned by layer()/inputs() must not be used afterwards)."""
        self._maps.clear()
