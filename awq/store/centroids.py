"""Centroid files and the active-only nearest-centroid rule, shared by ``awq`` and ``clustering``.

A centroid set is a ``[K, width]`` tensor of 0/1 values, one row per cluster.  Files written here
hold a ``uint8`` tensor in a ``.pt`` file plus a sidecar JSON (``path.with_suffix('.json')``) with
the metadata (method, proj, k, sparsity, seed, iterations, store meta, config).  Readers also
accept the artifact's bare float32 0/1 tensors and bool/uint8 tensors.

The active-only distance of the paper is ``d(a, c) = sum_j a_j |a_j - c_j| = |a| - <a, c>`` for
binary ``a``/``c`` (the number of ``a``'s active neurons that ``c`` does not cover), so the nearest
centroid is the one with the largest overlap ``<a, c>`` (ties -> lowest index).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from awq.kernels.hw import overlap_int8, overlap_kernel
from awq.util import io as awq_io

__all__ = [
    "CentroidError",
    "save_centroids",
    "load_centroids",
    "validate_centroids",
    "overlap",
    "active_only_distance",
    "assign_active_only",
    "coverage_stats",
]


class CentroidError(ValueError):
    """A centroid file or tensor is missing, unreadable or malformed."""


# --------------------------------------------------------------------------------------------
# validation / IO
# --------------------------------------------------------------------------------------------
def validate_centroids(c: Any, width: Optional[int] = None, name: str = "centroids") -> torch.Tensor:
    """Check a centroid tensor and return it as ``uint8 [K, width]`` (0/1) on the CPU."""
    if not isinstance(c, torch.Tensor):
        raise CentroidError(f"{name}: expected a tensor, got {type(c).__name__}")
    if c.dim() != 2:
        raise CentroidError(f"{name}: expected a 2-D [K, width] tensor, got shape {tuple(c.shape)}")
    if c.shape[0] == 0:
        raise CentroidError(f"{name}: holds no centroids (K == 0)")
    if width is not None and c.shape[1] != width:
        raise CentroidError(f"{name}: width mismatch: centroids have width {c.shape[1]}, data has width {width}")
    if c.dtype == torch.bool:
        return c.detach().to("cpu", torch.uint8).contiguous()
    if c.is_complex():
        raise CentroidError(f"{name}: complex values are not 0/1 centroids")
    bad = ~((c == 0) | (c == 1))
    if bool(bad.any()):
        v = c[bad].flatten()[0].item()
        raise CentroidError(f"{name}: non-binary centroid values (e.g. {v}); expected only 0/1")
    return c.detach().to("cpu", torch.uint8).contiguous()


def _plain(obj: Any) -> Any:
    """Convert to JSON/`weights_only`-safe plain types."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def save_centroids(path: str | Path, centroids: torch.Tensor, meta: Optional[dict] = None) -> None:
    """Write ``{"centroids": uint8 [K, width], "meta": {...}}`` atomically, plus a sidecar JSON."""
    path = Path(path)
    c = validate_centroids(centroids)
    meta = _plain(dict(meta or {}))
    meta.setdefault("k", int(c.shape[0]))
    meta.setdefault("width", int(c.shape[1]))
    meta["density"] = float(c.float().mean().item())
    # the sidecar first: the centroid file is the one a run's completion is judged by, so it comes last
    awq_io.atomic_write_json(path.with_suffix(".json"), meta, what="centroid metadata")
    awq_io.atomic_torch_save({"centroids": c, "meta": meta}, path, what="centroid file")


def load_centroids(path: str | Path, width: Optional[int] = None) -> tuple[torch.Tensor, dict]:
    """Read a centroid file (this project's format or a bare tensor); returns ``(uint8 [K,width], meta)``."""
    path = Path(path)
    if not path.is_file():
        raise CentroidError(f"centroid file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/zip error means the file is unusable
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CentroidError(f"centroid file {path} is corrupt or unreadable: {msg}") from None
    meta: dict = {}
    if isinstance(obj, dict):
        if "centroids" not in obj:
            raise CentroidError(f"centroid file {path}: dict without a 'centroids' entry (keys: {sorted(obj)[:5]})")
        meta = dict(obj.get("meta") or {})
        obj = obj["centroids"]
    else:
        side = path.with_suffix(".json")
        if side.is_file():
            try:
                meta = json.loads(side.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {}
    c = validate_centroids(obj, width, name=f"centroid file {path}")
    return c, meta


# --------------------------------------------------------------------------------------------
# active-only distance / assignment / coverage
# --------------------------------------------------------------------------------------------
def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()




def overlap(A: torch.Tensor, C: torch.Tensor, kernel: Optional[str] = None) -> torch.Tensor:
    """``<a, c>`` for every row pair of {0,1} ``A [n, F]`` and ``C [K, F]`` as exact float32 ``[n, K]``.

    Both kernels are exact: an int8 x int8 -> int32 GEMM (``torch._int_mm``) or an fp32 GEMM (products
    are 0/1 and fp32 sums are exact below 2**24).  On the CPU the faster one on this machine is used
    (``kernel``: "auto"/None, "int8", "fp32"; env ``AWQ_KERNEL_OVERLAP``; a one-time measurement,
    cached and logged: :func:`awq.kernels.hw.overlap_kernel`); int8 wins with AVX-512 VNNI, fp32 on AVX2-only
    CPUs.  Elsewhere the fp32 GEMM (TF32/bf16 inputs included).
    """
    C = C.to(A.device)
    if A.device.type == "cpu" and A.shape[0] > 0 and C.shape[0] > 0:
        if overlap_kernel(kernel, A.shape[1]) == "int8":
            return overlap_int8(A, C)
    return _as_float(A) @ _as_float(C).T


def active_only_distance(A: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``D[n, K] = |a| - <a, c>`` for {0,1} inputs, exact (one GEMM, see :func:`overlap`)."""
    rowsum = A.sum(1, keepdim=True, dtype=torch.float32) if A.dtype.is_floating_point else A.float().sum(1, keepdim=True)
    return overlap(A, C).neg_().add_(rowsum)  # in place: no second [n, K] buffer


def assign_active_only(A: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Nearest centroid by the active-only distance = argmax overlap, ties -> lowest index (int64 [n])."""
    if A.shape[1] != C.shape[1]:
        raise CentroidError(f"width mismatch: data has width {A.shape[1]}, centroids have width {C.shape[1]}")
    return torch.argmax(overlap(A, C), dim=1)  # argmax returns the first maximal index


def coverage_stats(A: torch.Tensor, C: torch.Tensor, labels: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Counts for precision-type metrics of rows ``A`` against their centroids ``C[labels]``.

    Returns plain sums (so they can be accumulated over blocks): ``active`` = sum(A),
    ``covered`` = sum(A & C_label) (true positives), ``predicted`` = sum(C_label), ``rows``, ``cells``.
    ``labels`` default to :func:`assign_active_only`.
    """
    A = _as_float(A)
    C = _as_float(C).to(A.device)
    G = overlap(A, C)
    if labels is None:
        labels = torch.argmax(G, dim=1)
    cov = G.gather(1, labels.view(-1, 1)) if A.shape[0] else A.new_zeros(0, 1)
    return {
        "active": float(A.sum().item()),
        "covered": float(cov.sum().item()),
        "predicted": float(C.sum(1)[labels].sum().item()),
        "rows": float(A.shape[0]),
        "cells": float(A.numel()),
    }


def metrics_from_counts(active: float, covered: float, predicted: float, cells: float) -> dict[str, float]:
    """precision (paper eq. 6, = recall of the active set), true precision, F1, Jaccard, densities."""
    def div(a: float, b: float) -> float:
        return float(a / b) if b else 0.0
    return {
        "precision": div(covered, active),
        "true_precision": div(covered, predicted),
        "f1": div(2 * covered, active + predicted),
        "jaccard": div(covered, active + predicted - covered),
        "data_density": div(active, cells),
        "predicted_density": div(predicted, cells),
    }
