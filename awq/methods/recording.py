"""Recording what a sparsified model computes: observers, and the mask recorder that fills a pattern store.

Every module ``awq.methods.base.sparsify_`` installs (a :class:`awq.methods.base.SwappedMLP`) calls its
observers as ``fn(layer_idx, name, tensor)`` with ``name`` one of ``input`` (the MLP input) and
``gate_proj``/``up_proj``/``down_proj`` (the thresholded projection outputs).

* :func:`add_observer` / :func:`remove_observer` / :func:`observing` attach ``fn`` to every swapped MLP.
* :class:`MaskRecorder` is the observer that bit-packs ``output != 0`` (and optionally the float16
  inputs) of each window into a :class:`awq.store.pattern_store.StoreWriter`.
* :func:`record_masks` is the context manager that wires the two for a model and a store folder
  (resumable: see its docstring).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from awq.methods.base import SwappedMLP, swapped_mlps
from awq.store.bitpack import pack
from awq.store.store_format import INPUT_KIND
from awq.store.store_writer import StoreWriter
from awq.util.fingerprint import weights_fingerprint

__all__ = ["Observer", "observed_mlps", "add_observer", "remove_observer", "observing", "MaskRecorder", "record_masks"]

Observer = Callable[[int, str, torch.Tensor], None]


def observed_mlps(model: torch.nn.Module) -> list[SwappedMLP]:
    """Every swapped MLP of ``model`` (they all accept observers), in layer order."""
    return swapped_mlps(model, SwappedMLP)


def add_observer(model: torch.nn.Module, fn: Observer) -> list[SwappedMLP]:
    """Attach ``fn`` to every swapped MLP; RuntimeError if the model was not sparsified."""
    mlps = observed_mlps(model)
    if not mlps:
        raise RuntimeError("model has no sparsified MLPs: call sparsify_() first")
    for m in mlps:
        m.observers.append(fn)
    return mlps


def remove_observer(model: torch.nn.Module, fn: Observer) -> None:
    for m in observed_mlps(model):
        if fn in m.observers:
            m.observers.remove(fn)


@contextlib.contextmanager
def observing(model: torch.nn.Module, fn: Observer) -> Iterator[list[SwappedMLP]]:
    """``with observing(model, fn):`` -- ``fn`` sees every forward pass inside the block."""
    mlps = add_observer(model, fn)
    try:
        yield mlps
    finally:
        remove_observer(model, fn)


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
    (thresholds path, versions, ...).  ``model_fingerprint`` defaults to
    :func:`awq.util.fingerprint.weights_fingerprint` of ``model`` (so two models whose directories share a
    name never resume into one store).
    Raises :class:`StoreMismatchError` if ``out_dir`` holds a store with other identity fields
    (or another seqlen, total_windows, record_inputs), :class:`StoreError` if ``out_dir`` is a
    non-empty directory without meta.json.  The model must be called with batch size 1.
    ``sync=False`` skips the per-window fdatasync of the data files (still safe against a killed
    process, not against a power cut; for fast accelerators with big models).
    """
    mlps = observed_mlps(model)
    if not mlps:
        raise RuntimeError("model has no SparseMLP modules: call sparsify_() before record_masks()")
    if "model_fingerprint" not in meta:  # identity by content, not by the model's (directory) name

        meta = {**meta, "model_fingerprint": weights_fingerprint(model)}
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
