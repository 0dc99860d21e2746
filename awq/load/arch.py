"""Model structure: where a causal LM keeps its decoder layers and what a supported (gated) MLP looks like.

Every layer above finds decoder layers and checks MLPs through here, so one place decides which
architectures are supported: an MLP with ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn``
(SwiGLU and other gated MLPs: Llama, Mistral, Qwen2, ...).
"""
from __future__ import annotations

import torch
from torch import nn

PROJS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
MLP_ATTRS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj", "act_fn")

class UnsupportedModelError(ValueError):
    """The model's decoder layers do not have a supported MLP."""


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


def is_swapped(mlp: nn.Module) -> bool:
    """True for a module installed by :func:`awq.methods.base.sparsify_` (it keeps the original MLP)."""
    return getattr(mlp, "is_sparsified", False)


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


def rope_pair_perm(heads: int, hd: int) -> torch.Tensor:
    """Row order of a q/k projection taking HF's half-split rotary layout to interleaved ``(x1_i, x2_i)`` pairs
    per head (the lean decoder's rotary order, and the order llama's GGUF converter stores q/k rows in)."""
    half = torch.arange(hd // 2)
    one = torch.stack([half, half + hd // 2], dim=1).flatten()
    return (torch.arange(heads)[:, None] * hd + one[None]).flatten()
