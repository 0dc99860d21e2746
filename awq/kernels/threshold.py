"""The paper's threshold, ``y * [|y| >= t]``, exactly and in one fused pass (``hardshrink``).

The comparison happens in the tensor's own dtype, as in the artifact (``g >= T`` on fp16): ``hardshrink``
keeps ``|y| > lambda``, so lambda is the largest value of the dtype below ``dtype(t)``
(:func:`shrink_lambda`).  Reference: ``y * (y.abs() >= t)`` (tests/test_sparse_mlp.py).
"""
from __future__ import annotations

import functools

import torch

_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}


@functools.lru_cache(maxsize=4096)
def shrink_lambda(t: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value below ``dtype(t)``: ``|y| > shrink_lambda(t) <=> |y| >= dtype(t)``.

    The comparison happens in the tensor's own dtype, as in the artifact (``g >= T`` on fp16).
    Returns 0.0 when ``dtype(t)`` is 0 (nothing is masked then).
    """
    td = torch.tensor(t, dtype=dtype)
    if float(td) <= 0.0:
        return 0.0
    return float((td.view(_INT_VIEW[dtype]) - 1).view(dtype))  # positive floats: bit pattern - 1 = nextafter(., 0)


def threshold(y: torch.Tensor, t: float) -> torch.Tensor:
    """``y * [|y| >= t]`` in one fused pass (``hardshrink`` keeps ``|y| > lambda``)."""
    if t <= 0.0:
        return y
    if y.dtype not in _INT_VIEW:
        return y.masked_fill(y.abs() < t, 0)
    lam = shrink_lambda(t, y.dtype)
    return torch.nn.functional.hardshrink(y, lam) if lam > 0.0 else y
