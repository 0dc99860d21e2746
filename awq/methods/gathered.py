"""Gathered-weight sparse SwiGLU MLP: compute only the active intermediate neurons.

A sparsity method of the one walker: ``sparsify_(model, GatheredConfig(thresholds, selector))``
swaps every decoder layer's MLP for a :class:`GatheredSparseMLP`.  Given the active neuron set
``m`` of the intermediate dimension (a 0/1 mask ``[F]``, per-token masks ``[T, F]``, an index
list, or cluster labels plus a centroid table) it computes::

    g = gate_proj(x)[m] * [|g| >= T_gate]        (only rows m of W_gate are read)
    u = up_proj(x)[m]   * [|u| >= T_up]          (only rows m of W_up are read)
    d = W_down[:, m] @ (act(g) * u)              (only columns m of W_down are read)
    d = d * [|d| >= T_down] * out_mask           (optional, on the H-dim output)

which equals the masked dense computation ``down(act(g*m) * (u*m))`` (and :class:`SparseMLP`
with the same thresholds and the same mask as the gate/up codebook) to floating-point tolerance,
because ``act(0) == 0`` (checked at construction).

Layout (batch-1 decode is memory bound: time ~ weight bytes read): the three projections are
stored interleaved per neuron, ``weight[F, 3, H] = [W_gate[n], W_up[n], W_down[:, n]]``, so one
active neuron is one contiguous ``3*H`` run and a sparse step reads exactly ``3*H*|m|`` weights.
The dense path, and the ``base`` MLP that :func:`awq.methods.base.base_mlp` returns (for
re-configuring), use strided views of the same tensor: nothing is stored twice.

Kernels: a fused C++ kernel (``csrc/sparse_mlp.cpp``: gather, two dot products, threshold, SiLU,
down axpy; AVX-512 or AVX2+FMA, parallel over neurons from ``MIN_BYTES_PER_THREAD`` weight bytes
per thread), built once by :mod:`awq.kernels.build`; if it cannot be built, or the activation is
not SiLU, or the tensors are not on the CPU, a pure torch path (``index_select`` + ``matmul``) is
used, with one logged warning.  ``AWQ_SPARSE_KERNEL=torch`` forces the pure torch path.  With
``kernel="auto"``, more than ``GEMM_TOKENS`` tokens sharing a set (prefill) use the torch GEMM.
A fixed set (:meth:`GatheredSparseMLP.set_active`) is prepared once; a decode step with it is one
kernel call (no per-call validation, selector, index or dtype work).

Batched tokens: tokens are grouped by their active set (cluster label or identical mask rows);
each group reads its neurons' weights once for all its tokens.  When the groups together would
read about as many bytes as the dense MLP (prefill, many distinct clusters), the exact masked
dense computation is used instead (a GEMM is then faster than many gathered GEMVs).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn

from awq.kernels.mlp import EMPTY, cpp_kernel, is_silu, min_bytes_per_thread
from awq.load.arch import PROJS, decoder_layers
from awq.methods.active_sets import (  # noqa: F401
    Active,
    PreparedIndices,
    Selector,
    as_bool_mask,
    cluster_selector,
    group_tokens,
    indices_from_active,
)
from awq.methods.base import MethodConfig, SwappedMLP
from awq.methods.interleaved import InterleavedMLP  # noqa: F401  (re-exported)
from awq.store.thresholds import check_thresholds

log = logging.getLogger(__name__)

KERNELS: tuple[str, ...] = ("auto", "cpp", "torch")
# kernel="auto": more tokens than this sharing one set (prefill) go to a gathered GEMM (index_select +
# matmul), which reuses each weight row for all tokens; the C++ kernel is a per-token GEMV loop
GEMM_TOKENS = 16

# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------
def _threshold(y: torch.Tensor, t: float) -> torch.Tensor:
    return y if t <= 0.0 else y.masked_fill(y.abs() < t, 0)


class GatheredSparseMLP(SwappedMLP):
    """SwiGLU MLP that reads only the active neurons' weights (see the module docstring).

    ``forward(x, active=None)``: ``active`` as in :func:`group_tokens`; when None, the module's
    ``selector(layer_idx, x2d)`` is asked, then the fixed set from :meth:`set_active`; with none of
    these the MLP is dense.  ``out_mask`` ([H] or [..., H]) optionally masks the output (the
    artifact's down_proj centroid mask).  ``base`` is the MLP as views of the interleaved weight.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        layer_idx: int = 0,
        thresholds: Optional[Mapping[str, float]] = None,
        bias_gu: Optional[torch.Tensor] = None,
        bias_down: Optional[torch.Tensor] = None,
        kernel: str = "auto",
        max_groups: int = 16,
        dense_ratio: float = 0.9,
    ) -> None:
        super().__init__(None, layer_idx)
        if weight.dim() != 3 or weight.shape[1] != 3:
            raise ValueError(f"weight must be [F, 3, H], got {tuple(weight.shape)}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        with torch.no_grad():
            z = act_fn(torch.zeros(2, dtype=weight.dtype, device=weight.device))
        if bool((z != 0).any()):
            raise ValueError("act_fn(0) != 0: skipping inactive neurons would not be exact")
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias_gu = None if bias_gu is None else nn.Parameter(bias_gu.reshape(-1, 2).float(), requires_grad=False)
        self.bias_down = None if bias_down is None else nn.Parameter(bias_down.detach().clone(), requires_grad=False)
        self.act_fn = act_fn
        thr = dict(thresholds or {})
        self.thresholds = {p: float(thr.get(p, 0.0)) for p in PROJS}
        self.kernel = kernel
        self.max_groups = max_groups
        self.dense_ratio = dense_ratio
        self.selector: Optional[Selector] = None
        self._fixed: Active = None
        self._fast: Optional[tuple] = None  # (weight key, kernel args) of the fixed set's single-call path
        self._view: Optional[tuple] = None
        self._is_silu = is_silu(act_fn)  # the fused kernel implements SiLU; recognised by value, not by class
        if kernel == "cpp" and not self._is_silu:
            raise ValueError("kernel='cpp' implements SiLU only; use kernel='torch' for this activation")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_mlp(
        cls,
        mlp: nn.Module,
        layer_idx: Optional[int] = None,
        thresholds: Optional[Mapping[str, float]] = None,
        **kw,
    ) -> "GatheredSparseMLP":
        """Build from a HF SwiGLU MLP or a :class:`awq.methods.paper_mlp.SparseMLP` (whose thresholds are
        taken unless given).  The weights are copied into the interleaved layout (except from an
        :class:`InterleavedMLP`, whose weight is reused); drop the old module to free its memory."""
        missing = [a for a in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(mlp, a)]
        if missing:
            raise ValueError(f"{type(mlp).__name__} lacks {missing}; only SwiGLU MLPs are supported")
        if layer_idx is None:
            layer_idx = int(getattr(mlp, "layer_idx", 0))
        if thresholds is None and isinstance(getattr(mlp, "thresholds", None), dict):
            thresholds = mlp.thresholds
        wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        Fi, H = wg.shape
        if wu.shape != (Fi, H) or wd.shape != (H, Fi):
            raise ValueError(f"inconsistent MLP shapes gate {tuple(wg.shape)} up {tuple(wu.shape)} down {tuple(wd.shape)}")
        with torch.no_grad():
            if isinstance(mlp, InterleavedMLP) and mlp.shares_storage():
                w = mlp.interleaved
            else:
                w = torch.empty(Fi, 3, H, dtype=wg.dtype, device=wg.device)
                w[:, 0].copy_(wg)
                w[:, 1].copy_(wu)
                w[:, 2].copy_(wd.t())
            bg, bu = getattr(mlp.gate_proj, "bias", None), getattr(mlp.up_proj, "bias", None)
            bias_gu = None
            if bg is not None or bu is not None:
                bias_gu = torch.stack([
                    bg if bg is not None else torch.zeros(Fi, dtype=wg.dtype, device=wg.device),
                    bu if bu is not None else torch.zeros(Fi, dtype=wg.dtype, device=wg.device),
                ], dim=1)
        return cls(w, mlp.act_fn, layer_idx, thresholds, bias_gu, getattr(mlp.down_proj, "bias", None), **kw)

    @property
    def base(self) -> InterleavedMLP:
        """The original MLP as views of the current weight (rebuilt after a move or dtype change)."""
        w = self.weight
        key = (w.data_ptr(), w.device, w.dtype)
        if self._view is None or self._view[0] != key:
            self._view = (key, InterleavedMLP(self))
        return self._view[1]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.weight.shape[0]

    def decode_unsupported(self) -> Optional[str]:
        if self.selector is not None or self._fixed is None:
            return "no fixed active set (the batch-1 kernel serves a set fixed with set_active)"
        if self._fast_args() is None:
            return "the fixed set needs more than the kernel (torch path, output bias or threshold)"
        return None

    def prepare_decode(self) -> bool:
        """The fixed set's one-call kernel (made on first use by forward); True when it serves decode steps."""
        return self.decode_unsupported() is None

    def set_active(self, active: Active) -> None:
        """Fix the active set used when forward gets none (None: dense).  A set shared by all
        tokens (1-D mask or indices) is validated and turned into indices once, here."""
        if isinstance(active, torch.Tensor) and active.dim() == 1:
            active = PreparedIndices(indices_from_active(active.to(self.weight.device), self.intermediate_size))
        self._fixed = active
        self._fast = None

    def _fast_args(self) -> Optional[tuple]:
        """Kernel arguments of the fixed prepared set (made once per set and weight), or None when the
        call needs more than the kernel (torch path, output bias/threshold)."""
        w = self.weight
        key = (w.data_ptr(), w.device, w.dtype)
        if self._fast is None or self._fast[0] != key:
            ok = (isinstance(self._fixed, PreparedIndices) and self._use_cpp() and self.bias_down is None
                  and self.thresholds["down_proj"] <= 0.0)
            args = None
            if ok:
                idx = self._fixed.idx.contiguous()
                bias = self.bias_gu.contiguous() if self.bias_gu is not None else EMPTY
                args = (cpp_kernel().fused_sparse_swiglu, w, idx, bias, self._thr("gate_proj"), self._thr("up_proj"),
                        idx.numel() / self.intermediate_size)
            self._fast = (key, args)
        return self._fast[1]

    def _use_cpp(self) -> bool:
        if self.kernel == "torch" or not self._is_silu or self.weight.device.type != "cpu":
            return False
        if self.weight.dtype not in (torch.float32, torch.bfloat16):
            return False
        mod = cpp_kernel()
        if mod is None and self.kernel == "cpp":
            raise RuntimeError("kernel='cpp' requested but the C++ sparse MLP kernel could not be built")
        return mod is not None

    def _thr(self, proj: str) -> float:
        t = self.thresholds[proj]
        # compare in the weights' dtype, like SparseMLP on a model of that dtype
        return float(torch.tensor(t, dtype=self.weight.dtype)) if t > 0 else 0.0

    # -- compute -----------------------------------------------------------------------------
    def _sparse(self, x2: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Tokens x2 [t, H] sharing the active indices idx [k] -> [t, H] (before down bias/threshold)."""
        if self._use_cpp() and (x2.shape[0] <= GEMM_TOKENS or self.kernel == "cpp"):
            bias = self.bias_gu if self.bias_gu is not None else EMPTY
            out = cpp_kernel().fused_sparse_swiglu(
                x2.float().contiguous(), self.weight, idx.contiguous(), bias,
                self._thr("gate_proj"), self._thr("up_proj"), min_bytes_per_thread())
            return out.to(x2.dtype)
        rows = self.weight.index_select(0, idx)  # [k, 3, H]
        gu = torch.matmul(x2, rows[:, :2].reshape(-1, rows.shape[2]).t()).view(x2.shape[0], -1, 2)
        if self.bias_gu is not None:
            gu = gu + self.bias_gu.index_select(0, idx).to(gu.dtype)
        g = _threshold(gu[..., 0], self.thresholds["gate_proj"])
        u = _threshold(gu[..., 1], self.thresholds["up_proj"])
        return torch.matmul(self.act_fn(g) * u, rows[:, 2])

    def _masked_dense(self, x2: torch.Tensor, m: Optional[torch.Tensor]) -> torch.Tensor:
        """Exact dense reference path: down(act(g*m) * (u*m)); m [T, F] bool or None."""
        w = self.weight
        g = torch.matmul(x2, w[:, 0].t())
        u = torch.matmul(x2, w[:, 1].t())
        if self.bias_gu is not None:
            g = g + self.bias_gu[:, 0].to(g.dtype)
            u = u + self.bias_gu[:, 1].to(u.dtype)
        g = _threshold(g, self.thresholds["gate_proj"])
        u = _threshold(u, self.thresholds["up_proj"])
        if m is not None:
            g = g * m
            u = u * m
        return torch.matmul(self.act_fn(g) * u, w[:, 2])

    def _compute(self, x2: torch.Tensor, active: Active) -> tuple[torch.Tensor, Union[float, torch.Tensor]]:
        """-> (output [T, H] before down bias/threshold, fraction of the neurons read: scalar or per token).

        The fraction is the realizable cost: gate row, up row and down column of each active neuron
        (``|active| / F`` per token).  The masked dense fallback computes the same function with a
        GEMM (faster for prefill) and is counted the same way, as what a gathered step would read.
        """
        T, Fi = x2.shape[0], self.intermediate_size
        if active is None or T == 0:
            return self._masked_dense(x2, None), 1.0
        if isinstance(active, PreparedIndices):
            return self._sparse(x2, active.idx), active.idx.numel() / Fi
        if isinstance(active, torch.Tensor) and active.dim() == 1:
            idx = indices_from_active(active.to(x2.device), Fi)
            return self._sparse(x2, idx), idx.numel() / Fi
        masks, inv = group_tokens(active, T, Fi)
        sizes = masks.sum(1)
        G = masks.shape[0]
        if G == 1:
            return self._sparse(x2, torch.nonzero(masks[0]).flatten()), int(sizes[0]) / Fi
        frac = sizes.double()[inv] / Fi
        if G <= self.max_groups and int(sizes.sum()) <= self.dense_ratio * Fi:
            out = x2.new_empty(T, x2.shape[1])
            order = torch.argsort(inv, stable=True)
            counts = torch.bincount(inv, minlength=G).tolist()
            starts = 0
            for gi in range(G):  # bounded by max_groups: each group reads its weights once
                tok = order[starts:starts + counts[gi]]
                starts += counts[gi]
                out[tok] = self._sparse(x2.index_select(0, tok), torch.nonzero(masks[gi]).flatten())
            return out, frac
        return self._masked_dense(x2, masks[inv]), frac

    def forward(self, x: torch.Tensor, active: Active = None, out_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (active is None and out_mask is None and self.selector is None and self._fixed is not None
                and x.dtype == torch.float32 and x.is_contiguous() and x.dim() >= 2):
            fast = self._fast_args()
            if fast is not None and x.shape[-1] == fast[1].shape[2] and (
                    x.numel() <= GEMM_TOKENS * x.shape[-1] or self.kernel == "cpp"):
                # decode with a fixed set: one kernel call (indices, bias and thresholds prepared once)
                fn, w, idx, bias, tg, tu, frac = fast
                out = fn(x.view(-1, x.shape[-1]), w, idx, bias, tg, tu, min_bytes_per_thread())
                if self.read_meter is not None:
                    self.read_meter.add(self.layer_idx, out.shape[0], frac, frac, frac)
                return out.view(x.shape)
        H = self.hidden_size
        if x.shape[-1] != H:
            raise ValueError(f"input has hidden size {x.shape[-1]} but the MLP expects {H}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, H)
        if active is None and self.selector is not None:
            active = self.selector(self.layer_idx, x2)
            if isinstance(active, dict):  # {"active": ..., "out_mask": ...}
                if out_mask is None:
                    out_mask = active.get("out_mask")
                active = active.get("active")
        if active is None:
            active = self._fixed
        out, frac = self._compute(x2, active)
        if self.read_meter is not None:
            self.read_meter.add(self.layer_idx, x2.shape[0], frac, frac, frac)
        if self.bias_down is not None:
            out = out + self.bias_down
        out = _threshold(out, self.thresholds["down_proj"])
        if out_mask is not None:
            om = as_bool_mask(out_mask, H, "output mask", "hidden size")
            out = out * om.reshape(-1, H) if om.dim() > 1 else out * om
        return out.reshape(*lead, H)

    def extra_repr(self) -> str:
        Fi, _, H = self.weight.shape
        t = ", ".join(f"{p}={v:.4g}" for p, v in self.thresholds.items())
        return f"layer={self.layer_idx}, hidden={H}, intermediate={Fi}, kernel={self.kernel}, thresholds=({t})"


# --------------------------------------------------------------------------------------------
# the method: sparsify_(model, GatheredConfig(...))
# --------------------------------------------------------------------------------------------
@dataclass
class GatheredConfig(MethodConfig):
    """Gathered sparse compute for :func:`awq.methods.base.sparsify_`.

    thresholds: ``{proj: [t per layer]}`` or None (no thresholding).
    selector: ``selector(layer_idx, x2d [T, H]) -> active`` (e.g. :func:`cluster_selector`), shared
        by all layers; None computes densely unless a set is fixed with ``set_active``.
    kernel: ``auto`` (C++ when it builds, else torch), ``cpp`` (required) or ``torch``.
    max_groups / dense_ratio: see :class:`GatheredSparseMLP` (when grouped tokens go masked-dense).
    fixed: one fixed active set per layer (indices or a ``[F]`` mask), set with ``set_active``; None: none.
    """

    thresholds: Optional[dict[str, list[float]]] = None
    selector: Optional[Selector] = None
    kernel: str = "auto"
    max_groups: int = 16
    dense_ratio: float = 0.9
    fixed: Optional[list[torch.Tensor]] = None

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        check_thresholds(self.thresholds)

    def validate(self, model: nn.Module) -> None:
        n = len(decoder_layers(model))
        check_thresholds(self.thresholds, n)
        if self.fixed is not None and len(self.fixed) != n:
            raise ValueError(f"GatheredConfig: {len(self.fixed)} fixed sets but the model has {n} decoder layers")

    def build(self, mlp: nn.Module, layer_idx: int) -> "GatheredSparseMLP":
        thr = {p: float(self.thresholds[p][layer_idx]) for p in PROJS} if self.thresholds is not None else {}
        new = GatheredSparseMLP.from_mlp(mlp, layer_idx, thr, kernel=self.kernel, max_groups=self.max_groups,
                                         dense_ratio=self.dense_ratio)
        new.selector = self.selector
        if self.fixed is not None:
            new.set_active(self.fixed[layer_idx])
        return new


def random_sets(model: nn.Module, density: float, seed: int = 0) -> GatheredConfig:
    """A fixed random set of ``density * F`` neurons per layer (seeded): reads exactly that share of every
    MLP weight at decode.  A speed probe of the gathered kernel: the text it gives is not meaningful."""
    g = torch.Generator().manual_seed(seed)
    sets = []
    for layer in decoder_layers(model):
        n = layer.mlp.gate_proj.out_features
        sets.append(torch.randperm(n, generator=g)[: max(1, round(density * n))].sort().values)
    return GatheredConfig(fixed=sets)


