"""The thresholded (and optionally centroid-masked) MLP, installed by a module swap.

``sparsify_(model, config)`` walks the decoder layers and replaces each layer's ``mlp`` by a
:class:`SparseMLP` that reuses the original ``gate_proj``/``up_proj``/``down_proj``/``act_fn``
(same weight objects, nothing copied).  Per layer ``l`` it computes::

    g = gate_proj(x) * [|g| >= T_gate[l]]
    u = up_proj(x)   * [|u| >= T_up[l]]
    d = down_proj(act_fn(g) * u) * [|d| >= T_down[l]]

and, when a codebook is attached to a projection, masks that projection's thresholded output
with the centroid chosen for each token (see :mod:`awq.store.centroids`).

Observers (recording masks or MLP inputs) are plain callables attached to the modules; they see
``(layer_idx, name, tensor)`` with ``name`` in ``{"input", "gate_proj", "up_proj", "down_proj"}``
and the tensor after thresholding and *before* any centroid mask.

Batch-1 decode: :meth:`SparseMLP.prepare_decode` (called by :class:`awq.decode.lean.LeanDecoder`) makes
the kernel of :mod:`awq.methods.paper_decode`; from then on a single unobserved token reads ``[gate; up]``
in full and only the rows of ``W_down^T`` of the nonzero ``h`` (same outputs and metered cost as the
masked path, to float tolerance).  Several tokens, observers or codebooks keep the masked path.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from awq.kernels.threshold import threshold
from awq.load.arch import PROJS, decoder_layers
from awq.methods.base import MethodConfig, SwappedMLP, swapped_mlps
from awq.methods.paper_decode import PaperDecode, log_once, unsupported
from awq.store.thresholds import check_thresholds

log = logging.getLogger(__name__)

Observer = Callable[[int, str, torch.Tensor], None]


# --------------------------------------------------------------------------------------------
# config and module
# --------------------------------------------------------------------------------------------
@dataclass
class SparsityConfig(MethodConfig):
    """What ``sparsify_`` installs.

    thresholds: ``{proj: [t per layer]}`` or None for no thresholding (dense, but still swapped so
        that recording and centroid masks work).
    codebooks: ``{proj: module}``; ``module(y, raw=, layer_idx=, x=)`` maps the thresholded output
        ``y`` of a projection (``raw``: before thresholding, ``x``: the MLP input) to the
        centroid-masked output.  One codebook per projection, shared by every layer.
    """

    thresholds: Optional[dict[str, list[float]]] = None
    codebooks: dict[str, nn.Module] = field(default_factory=dict)
    source: Optional[str] = None  # where the thresholds came from (a shipped file, or calibrated)

    def __post_init__(self) -> None:
        for proj in self.codebooks:
            if proj not in PROJS:
                raise ValueError(f"unknown projection '{proj}' (want one of {PROJS})")
        check_thresholds(self.thresholds)

    def validate(self, model: nn.Module) -> None:
        check_thresholds(self.thresholds, len(decoder_layers(model)))

    def build(self, mlp: nn.Module, layer_idx: int) -> "SparseMLP":
        return SparseMLP.from_mlp(mlp, layer_idx, self)


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

    def decode_unsupported(self) -> Optional[str]:
        """Why this module has no batch-1 kernel (None: it has one)."""
        if self._codebooks:
            return "centroid codebooks (no batch-1 kernel for the codebook masks)"
        if type(self)._account is not SparseMLP._account:
            return f"{type(self).__name__} meters its own reads (no batch-1 kernel for them)"

        return unsupported(self.base)

    def prepare_decode(self) -> bool:
        """Make the batch-1 kernel (:mod:`awq.methods.paper_decode`; copies ``[gate; up]`` and ``W_down^T``
        once) used for single-token calls from now on.  False (reason logged once) if it cannot run."""
        if self._decode is None:
            why = self.decode_unsupported()
            if why is not None:
                log_once(why)
                return False

            self._decode = PaperDecode(self.base, self.thresholds, self.act_fn)
        return True

    @classmethod
    def from_mlp(cls, mlp: nn.Module, layer_idx: int, config: SparsityConfig) -> "SparseMLP":
        thr = None if config.thresholds is None else {p: config.thresholds[p][layer_idx] for p in PROJS}
        return cls(mlp, layer_idx, thr, config.codebooks)

    def _post(self, proj: str, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = threshold(raw, self.thresholds[proj])
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
        if self.is_decode_step(x):
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


def sparse_mlps(model: nn.Module) -> list[SwappedMLP]:
    """Every swapped MLP that accepts observers (all methods installed by ``sparsify_``)."""
    return swapped_mlps(model, SwappedMLP)
