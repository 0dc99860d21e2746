"""The thresholded (and optionally centroid-masked) MLP, installed by a module swap.

``sparsify_(model, config)`` walks the decoder layers and replaces each layer's ``mlp`` by a
:class:`SparseMLP` that reuses the original ``gate_proj``/``up_proj``/``down_proj``/``act_fn``
(same weight objects, nothing copied).  Per layer ``l`` it computes::

    g = gate_proj(x) * [|g| >= T_gate[l]]
    u = up_proj(x)   * [|u| >= T_up[l]]
    d = down_proj(act_fn(g) * u) * [|d| >= T_down[l]]

and, when a codebook is attached to a projection, masks that projection's thresholded output
with the centroid chosen for each token (see :mod:`awq.centroids`).

Observers (recording masks or MLP inputs) are plain callables attached to the modules; they see
``(layer_idx, name, tensor)`` with ``name`` in ``{"input", "gate_proj", "up_proj", "down_proj"}``
and the tensor after thresholding and *before* any centroid mask.

Batch-1 decode: :meth:`SparseMLP.prepare_decode` (called by :class:`awq.decode.LeanDecoder`) makes
the kernel of :mod:`awq.paper_decode`; from then on a single unobserved token reads ``[gate; up]``
in full and only the rows of ``W_down^T`` of the nonzero ``h`` (same outputs and metered cost as the
masked path, to float tolerance).  Several tokens, observers or codebooks keep the masked path.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from awq.sparsify import (MLP_ATTRS, PROJS, SwappedMLP, UnsupportedModelError, check_supported,  # noqa: F401
                          decoder_layers, register_method, sparsify_, swapped_mlps)
from awq.recording import add_observer, remove_observer  # noqa: F401  (historic home)
from awq.thresholds import ThresholdsError, check_thresholds, load_thresholds, save_thresholds  # noqa: F401

log = logging.getLogger(__name__)

Observer = Callable[[int, str, torch.Tensor], None]


# --------------------------------------------------------------------------------------------
# config and module
# --------------------------------------------------------------------------------------------
@dataclass
class SparsityConfig:
    """What ``sparsify_`` installs.

    thresholds: ``{proj: [t per layer]}`` or None for no thresholding (dense, but still swapped so
        that recording and centroid masks work).
    codebooks: ``{proj: module}``; ``module(y, raw=, layer_idx=, x=)`` maps the thresholded output
        ``y`` of a projection (``raw``: before thresholding, ``x``: the MLP input) to the
        centroid-masked output.  One codebook per projection, shared by every layer.
    """

    thresholds: Optional[dict[str, list[float]]] = None
    codebooks: dict[str, nn.Module] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for proj in self.codebooks:
            if proj not in PROJS:
                raise ValueError(f"unknown projection '{proj}' (want one of {PROJS})")
        check_thresholds(self.thresholds)

    def validate(self, model: nn.Module) -> None:
        check_thresholds(self.thresholds, len(decoder_layers(model)))


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


def _threshold(y: torch.Tensor, t: float) -> torch.Tensor:
    """``y * [|y| >= t]`` in one fused pass (``hardshrink`` keeps ``|y| > lambda``)."""
    if t <= 0.0:
        return y
    if y.dtype not in _INT_VIEW:
        return y.masked_fill(y.abs() < t, 0)
    lam = shrink_lambda(t, y.dtype)
    return torch.nn.functional.hardshrink(y, lam) if lam > 0.0 else y


class SparseMLP(SwappedMLP):
    """Thresholded SwiGLU MLP; reuses the projections of the module it replaces (``base``)."""

    def __init__(
        self,
        base: nn.Module,
        layer_idx: int,
        thresholds: Optional[Mapping[str, float]] = None,
        codebooks: Optional[Mapping[str, nn.Module]] = None,
    ) -> None:
        super().__init__(base, layer_idx)
        self.gate_proj, self.up_proj, self.down_proj = base.gate_proj, base.up_proj, base.down_proj
        self.act_fn = base.act_fn
        self.thresholds = {p: float((thresholds or {}).get(p, 0.0)) for p in PROJS}
        # codebooks are shared between layers: keep them out of this module's state_dict/children
        self._codebooks: dict[str, nn.Module] = dict(codebooks or {})
        self._decode = None  # awq.paper_decode.PaperDecode once prepare_decode() made it

    def decode_unsupported(self) -> Optional[str]:
        """Why this module has no batch-1 kernel (None: it has one)."""
        if self._codebooks:
            return "centroid codebooks (no batch-1 kernel for the codebook masks)"
        if type(self)._account is not SparseMLP._account:
            return f"{type(self).__name__} meters its own reads (no batch-1 kernel for them)"
        from awq.paper_decode import unsupported

        return unsupported(self.base)

    def prepare_decode(self) -> bool:
        """Make the batch-1 kernel (:mod:`awq.paper_decode`; copies ``[gate; up]`` and ``W_down^T``
        once) used for single-token calls from now on.  False (reason logged once) if it cannot run."""
        if self._decode is None:
            why = self.decode_unsupported()
            if why is not None:
                from awq.paper_decode import log_once

                log_once(why)
                return False
            from awq.paper_decode import PaperDecode

            self._decode = PaperDecode(self.base, self.thresholds, self.act_fn)
        return True

    @classmethod
    def from_mlp(cls, mlp: nn.Module, layer_idx: int, config: SparsityConfig) -> "SparseMLP":
        thr = None if config.thresholds is None else {p: config.thresholds[p][layer_idx] for p in PROJS}
        return cls(mlp, layer_idx, thr, config.codebooks)

    def _post(self, proj: str, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = _threshold(raw, self.thresholds[proj])
        if self.observers:
            self._notify(proj, y)
        cb = self._codebooks.get(proj)
        if cb is not None:
            y = cb(y, raw=raw, layer_idx=self.layer_idx, x=x)
        return y

    def _decode_step(self, x: torch.Tensor) -> torch.Tensor:
        y = self._decode(x)
        if self.read_meter is not None:
            self.read_meter.add(self.layer_idx, 1, 1.0, 1.0, self._decode.density())
        return y.view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._decode is not None and not self.observers and not self._codebooks and x.numel() == x.shape[-1]:
            return self._decode_step(x)
        if self.observers:
            self._notify("input", x)
        g = self._post("gate_proj", self.gate_proj(x), x)
        u = self._post("up_proj", self.up_proj(x), x)
        h = self.act_fn(g) * u
        if self.read_meter is not None:
            with torch.no_grad():
                self._account(g, u, h)
        return self._post("down_proj", self.down_proj(h), x)

    def _account(self, g: torch.Tensor, u: torch.Tensor, h: torch.Tensor) -> None:
        """Weights read per token: gate and up are computed in full; down reads the columns of nonzero h."""
        h2 = h.reshape(-1, h.shape[-1])
        dens = (h2 != 0).sum(1, dtype=torch.float64) / h2.shape[-1]
        self.read_meter.add(self.layer_idx, h2.shape[0], 1.0, 1.0, dens)

    def extra_repr(self) -> str:
        t = ", ".join(f"{p}={self.thresholds[p]:.4g}" for p in PROJS)
        cbs = ",".join(self._codebooks) or "none"
        return f"layer={self.layer_idx}, thresholds=({t}), codebooks={cbs}"


@register_method(SparsityConfig)
def _build_sparse_mlp(mlp: nn.Module, layer_idx: int, config: SparsityConfig) -> SparseMLP:
    return SparseMLP.from_mlp(mlp, layer_idx, config)


def sparse_mlps(model: nn.Module) -> list[SwappedMLP]:
    """Every swapped MLP that accepts observers (all methods installed by ``sparsify_``)."""
    return swapped_mlps(model, SwappedMLP)
