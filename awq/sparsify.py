"""One walker installs every sparsity method: ``sparsify_(model, config)`` (torchao's ``quantize_`` shape).

A *method* is a config dataclass. Its module builder is registered once with
:func:`register_method`; ``sparsify_`` finds the model's decoder layers, checks that every MLP is a
SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``), lets the config validate itself
against the model (``config.validate(model)``, optional) and replaces each layer's ``mlp`` by
``builder(mlp, layer_idx, config)``. This is the only place that decides how MLPs are found and
swapped.

Every swapped module keeps the original projections reachable through :func:`base_mlp` so that a
model can be re-sparsified with another config without reloading it.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import nn

PROJS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
MLP_ATTRS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj", "act_fn")

Builder = Callable[[nn.Module, int, Any], nn.Module]
_BUILDERS: dict[type, Builder] = {}
C = TypeVar("C", bound=type)


class UnsupportedModelError(ValueError):
    """The model's decoder layers do not have a supported MLP."""


def register_method(config_cls: type) -> Callable[[Builder], Builder]:
    """Decorator: ``@register_method(MyConfig) def build(mlp, layer_idx, cfg) -> nn.Module``."""

    def deco(builder: Builder) -> Builder:
        _BUILDERS[config_cls] = builder
        return builder

    return deco


def registered_methods() -> dict[str, type]:
    """``{config class name: config class}`` of every registered method."""
    return {c.__name__: c for c in _BUILDERS}


def _builder_for(config: Any) -> Builder:
    for cls in type(config).__mro__:
        if cls in _BUILDERS:
            return _BUILDERS[cls]
    known = ", ".join(sorted(c.__name__ for c in _BUILDERS)) or "none"
    raise TypeError(f"no sparsity method is registered for {type(config).__name__} (registered: {known})")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a HF causal LM (``model.model.layers`` and friends)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise UnsupportedModelError(f"cannot find decoder layers in {type(model).__name__}")


def base_mlp(mlp: nn.Module) -> nn.Module:
    """The original SwiGLU MLP behind a swapped module (itself when it was never swapped).

    A swapped module that does not hold the original projections as attributes exposes them as
    ``mlp.base`` (e.g. the gathered sparse-compute module, which rebuilds a view of its weights).
    """
    seen = 0
    while getattr(mlp, "base", None) is not None and seen < 8:
        mlp = mlp.base
        seen += 1
    return mlp


def is_swapped(mlp: nn.Module) -> bool:
    return getattr(mlp, "is_sparsified", False)


class SwappedMLP(nn.Module):
    """Base of every module ``sparsify_`` installs.

    Keeps the original MLP as an *unregistered* reference (``base``: its projections are shared,
    never copied, and the state dict does not list them twice), the layer index, the observers
    (``fn(layer_idx, name, tensor)``, see :mod:`awq.recording`) and an optional read meter
    (:class:`awq.cost.ReadMeter`) that the module feeds with the share of each projection's weights
    it actually read per token.
    """

    is_sparsified = True

    def __init__(self, base: nn.Module, layer_idx: int) -> None:
        super().__init__()
        object.__setattr__(self, "_base", base)
        self.layer_idx = layer_idx
        self.observers: list[Callable[[int, str, Any], None]] = []
        self.read_meter = None  # awq.cost.ReadMeter or None

    @property
    def base(self) -> nn.Module:
        return self._base

    def _notify(self, name: str, y: Any) -> None:
        for obs in self.observers:
            obs(self.layer_idx, name, y)

    # prompt -> continuation protocol (awq.protocol): a method that chooses from the prompt overrides these
    needs_prompt = False  # True: cannot run under the standard protocol (no prompt to choose from)

    def observe_prompt(self, x: Any, h: Any) -> None:
        """The prompt ran dense: its MLP input ``x [B, P, H]`` and ``h = act(gate(x)) * up(x)`` ``[B, P, F]``
        (row b = sequence b; may be called more than once per sequence: accumulate).  Default: ignored."""

    def end_sequence(self) -> None:
        """The current sequences are finished: drop per-sequence state.  Default: nothing."""


def check_supported(model: nn.Module) -> int:
    """Raise UnsupportedModelError naming the offending module; return the number of layers."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            raise UnsupportedModelError(
                f"decoder layer {i} ({type(layer).__name__}) has no 'mlp' attribute; unsupported architecture")
        if is_swapped(mlp):
            continue
        missing = [a for a in MLP_ATTRS if not hasattr(mlp, a)]
        if missing:
            raise UnsupportedModelError(
                f"decoder layer {i} MLP is {type(mlp).__name__}, which lacks {missing}; "
                "only gate_proj/up_proj/down_proj/act_fn (SwiGLU) MLPs are supported")
    return len(layers)


def sparsify_(model: nn.Module, config: Any) -> nn.Module:
    """Swap every decoder layer's MLP for the module of ``config``'s method (in place; returns the model).

    Applying it to an already-swapped model re-configures from the original projections.
    """
    builder = _builder_for(config)
    check_supported(model)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate(model)
    for i, layer in enumerate(decoder_layers(model)):
        layer.mlp = builder(base_mlp(layer.mlp), i, config)
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
