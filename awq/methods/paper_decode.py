"""Batch-1 decode kernel of the paper's thresholded MLP (:class:`awq.methods.paper_mlp.SparseMLP`).

One decoded token ``x`` (``H`` entries)::

    [g; u] = W_gu x (+ bias)          one dense GEMV over the concatenated [gate; up] weight (read in full)
    g, u   = g [|g| >= T_gate], u [|u| >= T_up]          in the model's dtype, as the masked path
    h      = act(g) * u
    y      = sum_{n: h_n != 0} h_n W_down^T[n] (+ bias)  reads only the rows of W_down^T of the nonzero h
    y      = y [|y| >= T_down]                           thresholding down's output saves no reads

so a step reads ``2/3 + 1/3 density(h)`` of the MLP's weight bytes, which is what the module meters.
For SiLU it is one C++ call (``threshold_swiglu`` of ``csrc/sparse_mlp.cpp``: GEMV, thresholds,
activation and gather; the torch ops between two calls cost more than the rows saved on SmolLM2);
otherwise ``dense_gemv``, the activation in torch and ``down_gather`` (output split over threads
from ``MIN_BYTES_PER_THREAD`` weight bytes each); a loaded kernel without ``down_gather`` falls back
to a torch ``index_select`` + GEMV over the same rows.

Memory: ``[gate; up]`` and ``W_down^T`` are copies made once by :meth:`SparseMLP.prepare_decode`
(one extra copy of the MLP's weights); many-token calls (prefill, perplexity) keep the original
weights and the masked dense path.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from awq.kernels.mlp import cpp_kernel, is_silu, min_bytes_per_thread
from awq.kernels.threshold import threshold
from awq.methods.dynamic_sparse import _as_row, bias_of, gu_bias
from awq.methods.dynamic_sparse import log_once as _log_once
from awq.methods.dynamic_sparse import unsupported as _unsupported


def unsupported(mlp: nn.Module) -> Optional[str]:
    """Why the kernel cannot run this base MLP (None: it can); any activation (it runs in torch off SiLU)."""
    return _unsupported(mlp, silu_only=False)


def log_once(why: str) -> None:
    _log_once(why, "paper decode kernel")


def down_gather_torch(h: torch.Tensor, wd_t: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Reference / fallback of ``down_gather``: the rows of ``wd_t`` [F, H] of the nonzero ``h`` [F]."""
    idx = torch.nonzero(h).view(-1)
    counts[0] = idx.numel()
    return h.index_select(0, idx) @ wd_t.index_select(0, idx).float()


class PaperDecode:
    """The batch-1 kernel of one :class:`~awq.methods.paper_mlp.SparseMLP` (thresholds per projection)."""

    def __init__(self, base: nn.Module, thresholds: dict[str, float], act_fn) -> None:
        with torch.no_grad():
            wg, wu = base.gate_proj.weight.detach(), base.up_proj.weight.detach()
            self.wgu = torch.cat([wg, wu]).contiguous()  # [2F, H]
            self.wd_t = base.down_proj.weight.detach().t().contiguous()  # [F, H]
        self.F, self.H = wg.shape
        self.bias_gu = gu_bias(bias_of(base.gate_proj), bias_of(base.up_proj), self.F)  # empty: none
        bd = bias_of(base.down_proj)
        self.bias_d = None if bd is None else bd.float()
        self.t = thresholds  # the module's own dict: a changed threshold applies here too
        self.act_fn = act_fn
        self.kern = cpp_kernel()
        self.gather = getattr(self.kern, "down_gather", None)
        if self.gather is None:
            log_once("the loaded C++ kernel has no down_gather: torch gather fallback")
        self.min_bytes = min_bytes_per_thread()
        self.counts = torch.zeros(1, dtype=torch.long)
        # SiLU: the whole step (GEMV, thresholds, activation, gather) in one C++ call
        self.fused = getattr(self.kern, "threshold_swiglu", None) if is_silu(act_fn) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """One token -> ``y`` [H] in ``x.dtype`` (down threshold applied); ``self.counts[0]`` = nonzero
        ``h`` (rows of W_down read)."""
        if self.fused is None:
            return self.parts(x)[0]
        y = self.fused(_as_row(x), self.wgu, self.bias_gu, self.wd_t, self.t["gate_proj"], self.t["up_proj"],
                       self.min_bytes, self.counts)
        if self.bias_d is not None:
            y = y + self.bias_d
        return threshold(y.to(x.dtype), self.t["down_proj"])

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step in torch around ``dense_gemv`` and ``down_gather`` (any activation) -> ``(y, g, u, h)``:
        ``y`` as :meth:`__call__`, the thresholded ``g``, ``u`` and ``h`` [F]."""
        gu = self.kern.dense_gemv(_as_row(x), self.wgu, self.min_bytes)
        if self.bias_gu.numel():
            gu = gu + self.bias_gu
        gu = gu.to(x.dtype)
        g = threshold(gu[: self.F], self.t["gate_proj"])
        u = threshold(gu[self.F:], self.t["up_proj"])
        h = self.act_fn(g) * u
        hf = h.float().contiguous()
        if self.gather is not None:
            y = self.gather(hf, self.wd_t, self.min_bytes, self.counts)
        else:
            y = down_gather_torch(hf, self.wd_t, self.counts)
        if self.bias_d is not None:
            y = y + self.bias_d
        return threshold(y.to(x.dtype), self.t["down_proj"]), g, u, h

    def density(self) -> float:
        """Nonzero h / F of the last call (the share of W_down read)."""
        return int(self.counts[0]) / self.F
