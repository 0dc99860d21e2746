"""On-disk layout of a pattern store: constants, errors and the checks both its writer and reader use.

See :mod:`awq.store.pattern_store` for the layout and the public API; this module holds what
:mod:`awq.store.store_writer` and :mod:`awq.store.pattern_store` share.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from awq.load.arch import PROJS
from awq.store.bitpack import BIT_ORDER

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "INPUT_KIND", "BIT_ORDER", "ROW_LAYOUT", "IDENTITY_KEYS", "PROJS",
    "StoreError", "StoreMismatchError", "layer_file", "read_meta", "npy_header", "is_meta_temp", "now",
]

FORMAT_NAME = "awq-pattern-store"
FORMAT_VERSION = 1
INPUT_KIND = "input"
ROW_LAYOUT = (
    "row r of every layer file = token r of the scored stream (window r // tokens_per_window); "
    "pooled row id = layer * n_tokens + token"
)
META_JSON_INDENT = 1
# meta fields that must agree for a rerun to resume into an existing store
IDENTITY_KEYS: tuple[str, ...] = (
    "model",
    "model_fingerprint",  # awq.util.fingerprint.weights_fingerprint of the loaded (sparsified) model
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
WRITER_KEYS: tuple[str, ...] = (
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
# temp names of meta.json: awq.util.io's unique ".meta.json.<random>.tmp", and the fixed name of old writers
_META_TMP = re.compile(r"^(meta\.json\.tmp|\.meta\.json\..+\.tmp)$")


class StoreError(ValueError):
    """A pattern store is missing, corrupt, incomplete or does not fit the request."""


class StoreMismatchError(StoreError):
    """An existing store was written with different identity fields than the current run."""


def layer_file(root: Path, kind: str, layer: int) -> Path:
    """``root/<kind>/layer_<ll>.npy`` (kind: a projection or ``input``)."""
    return Path(root) / kind / f"layer_{layer:02d}.npy"


def is_meta_temp(name: str) -> bool:
    """True for what a writer killed while creating meta.json leaves behind (temp file, its lock file)."""
    return name == ".lock" or bool(_META_TMP.match(name))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
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


def read_meta(root: Path) -> dict:
    """``root/meta.json`` checked for format, version and the window counters (StoreError otherwise)."""
    path = Path(root) / "meta.json"
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
