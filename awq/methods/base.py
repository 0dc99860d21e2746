"""The method contract: a config (:class:`MethodConfig`) that builds one swapped MLP per layer
(:class:`SwappedMLP`), and the one walker that installs it, ``sparsify_(model, config)`` (torchao's
``quantize_`` shape).

``sparsify_`` finds the model's decoder layers, checks that every MLP is a gated MLP (``gate_proj``,
``up_proj``, ``down_proj``, ``act_fn``: :mod:`awq.load.arch`), lets the config validate itself against the
model and replaces each layer's ``mlp`` by ``config.build(mlp, layer_idx)``.  This is the only place that
decides how MLPs are found and swapped.  Every swapped module keeps the original projections reachable
through :func:`base_mlp`, so a model can be re-sparsified with another config without reloading it.

Hooks, each with a default here (override what the method needs):

=============================  ===========================================================================
``MethodConfig.build``         required: the module of one layer
``MethodConfig.validate``      refuse a model the config does not fit (one-line ``ValueError``)
``MethodConfig.extra_read``    weights read besides the MLP's (predictor, rotation), as a fraction of the MLP's
``MethodConfig.summary``       what a results JSON records of the config (default: its JSON-able fields)
``SwappedMLP.forward``         required: the batched computation; feeds ``read_meter`` and ``observers``
``SwappedMLP.prepare_decode``  make the batch-1 kernel (``self._decode``); False when there is none
``SwappedMLP.decode_unsupported``  why there is no batch-1 kernel (None when there is one)
``SwappedMLP.extra_bytes``     weight bytes one decode step reads besides the MLP's
``SwappedMLP.is_decode_step``  the one guard: a prepared kernel, one token, nobody observing
``SwappedMLP.observe_prompt``  prompt -> continuation protocol (:mod:`awq.methods.protocol`): the dense prompt's
                               MLP input and ``h``; a method choosing its neurons from the prompt keeps its choice
``SwappedMLP.end_sequence``    the sequences are finished: drop per-sequence state
``SwappedMLP.needs_prompt``    True: refused under the standard protocol (nothing to choose from)
=============================  ===========================================================================
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from awq.load.arch import check_supported, decoder_layers, is_swapped


def base_mlp(mlp: nn.Module) -> nn.Module:
    """The original gated MLP behind a swapped module (itself when it was never swapped).

    A swapped module that does not hold the original projections as attributes exposes them as
    ``mlp.base`` (e.g. the gathered sparse-compute module, which rebuilds a view of its weights).
    """
    seen = 0
    while getattr(mlp, "base", None) is not None and seen < 8:
        mlp = mlp.base
        seen += 1
    return mlp


def _jsonable(v: Any) -> bool:
    if isinstance(v, bool) or isinstance(v, (int, str)) or v is None:
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return all(_jsonable(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _jsonable(x) for k, x in v.items())
    return False


@dataclasses.dataclass
class MethodConfig:
    """Base of every method's configuration (a dataclass); see the module docstring for the hooks."""

    def build(self, mlp: nn.Module, layer_idx: int) -> "SwappedMLP":
        raise NotImplementedError(f"{type(self).__name__}.build")

    def validate(self, model: nn.Module) -> None:
        return None

    def extra_read(self, model: nn.Module) -> float:
        return 0.0

    def summary(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if _jsonable(v):
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


class SwappedMLP(nn.Module):
    """Base of every module ``sparsify_`` installs.

    Keeps the original MLP as an *unregistered* reference (``base``: its projections are shared,
    never copied, and the state dict does not list them twice), the layer index, the observers
    (``fn(layer_idx, name, tensor)``, see :mod:`awq.methods.recording`) and an optional read meter
    (:class:`awq.methods.cost.ReadMeter`) that the module feeds with the share of each projection's weights
    it actually read per token.
    """

    is_sparsified = True

    def __init__(self, base: nn.Module, layer_idx: int) -> None:
        super().__init__()
        object.__setattr__(self, "_base", base)
        self.layer_idx = layer_idx
        self.observers: list[Callable[[int, str, Any], None]] = []
        self.read_meter = None  # awq.methods.cost.ReadMeter or None
        self._decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # the batch-1 kernel, once prepared

    @property
    def base(self) -> nn.Module:
        return self._base

    @property
    def extra_bytes(self) -> int:
        """Weight bytes one decode step reads besides the MLP's (a predictor, a rotation)."""
        return 0

    def decode_unsupported(self) -> Optional[str]:
        """Why this module has no batch-1 kernel here (None: it has one)."""
        return f"{type(self).__name__} has no batch-1 kernel"

    def prepare_decode(self) -> bool:
        """Make the batch-1 kernel used for single-token calls from now on (``self._decode``); False if
        there is none or it cannot run here (see :meth:`decode_unsupported`)."""
        return self._decode is not None

    def is_decode_step(self, x: torch.Tensor) -> bool:
        """A single token for a module whose kernel is prepared and that nobody is observing."""
        return self._decode is not None and not self.observers and x.numel() == x.shape[-1]

    def _notify(self, name: str, y: Any) -> None:
        for obs in self.observers:
            obs(self.layer_idx, name, y)

    # prompt -> continuation protocol (awq.methods.protocol): a method that chooses from the prompt overrides these
    needs_prompt = False  # True: cannot run under the standard protocol (no prompt to choose from)

    def observe_prompt(self, x: torch.Tensor, h: torch.Tensor) -> None:
        """The prompt ran dense: its MLP input ``x [B, P, H]`` and ``h = act(gate(x)) * up(x)`` ``[B, P, F]``
        (row b = sequence b; may be called more than once per sequence: accumulate).  Default: ignored."""

    def end_sequence(self) -> None:
        """The current sequences are finished: drop per-sequence state.  Default: nothing."""


def sparsify_(model: nn.Module, config: MethodConfig) -> nn.Module:
    """Swap every decoder layer's MLP for ``config.build(mlp, layer_idx)`` (in place; returns the model).

    Applying it to an already-swapped model re-configures from the original projections.
    """
    if not isinstance(config, MethodConfig):
        raise TypeError(f"{type(config).__name__} is not a method configuration (a subclass of "
                        "awq.methods.base.MethodConfig)")
    check_supported(model)
    config.validate(model)
    for i, layer in enumerate(decoder_layers(model)):
        layer.mlp = config.build(base_mlp(layer.mlp), i)
    return model


def swapped_mlps(model: nn.Module, cls: type = nn.Module) -> list[nn.Module]:
    """The swapped MLP modules of ``model`` (of type ``cls``), in layer order."""
    out = []
    for layer in decoder_layers(model):
        m = getattr(layer, "mlp", None)
        if m is not None and is_swapped(m) and isinstance(m, cls):
            out.append(m)
    return out


def unsparsify_(model: nn.Module) -> nn.Module:
    """Put the original MLPs back (where the swapped module kept them)."""
    for layer in decoder_layers(model):
        layer.mlp = base_mlp(layer.mlp) if is_swapped(layer.mlp) else layer.mlp
    return model
