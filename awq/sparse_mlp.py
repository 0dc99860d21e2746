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
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

PROJS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
MLP_ATTRS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj", "act_fn")

Observer = Callable[[int, str, torch.Tensor], None]


class ThresholdsError(ValueError):
    """A thresholds file is missing, malformed or does not match the model."""


# --------------------------------------------------------------------------------------------
# thresholds files (the artifact's JSON format)
# --------------------------------------------------------------------------------------------
def load_thresholds(path: str | Path, num_layers: Optional[int] = None) -> dict[str, list[float]]:
    """Read ``{"gate_proj": {"layer_0": t, ...}, "up_proj": ..., "down_proj": ...}``.

    Returns ``{proj: [t_0, ..., t_{L-1}]}``.  An ``act_fn`` key is ignored.  Raises
    :class:`ThresholdsError` with a one-line message on any problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ThresholdsError(f"thresholds file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ThresholdsError(f"thresholds file {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ThresholdsError(f"thresholds file {path}: expected a JSON object with keys {list(PROJS)}")
    out: dict[str, list[float]] = {}
    for proj in PROJS:
        if proj not in raw:
            raise ThresholdsError(f"thresholds file {path} has no '{proj}' entry")
        per = raw[proj]
        if not isinstance(per, dict) or not per:
            raise ThresholdsError(f"thresholds file {path}: '{proj}' must map 'layer_<i>' to numbers")
        idx = {}
        for key, val in per.items():
            if not (isinstance(key, str) and key.startswith("layer_") and key[6:].isdigit()):
                raise ThresholdsError(f"thresholds file {path}: bad key '{key}' under '{proj}' (want layer_<i>)")
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0:
                raise ThresholdsError(f"thresholds file {path}: {proj}.{key} = {val!r} is not a non-negative number")
            idx[int(key[6:])] = float(val)
        n = len(idx)
        if sorted(idx) != list(range(n)):
            raise ThresholdsError(f"thresholds file {path}: '{proj}' layers are not 0..{n - 1}")
        out[proj] = [idx[i] for i in range(n)]
    counts = {p: len(v) for p, v in out.items()}
    if len(set(counts.values())) != 1:
        raise ThresholdsError(f"thresholds file {path}: projections disagree on the layer count {counts}")
    if num_layers is not None and counts["gate_proj"] != num_layers:
        raise ThresholdsError(
            f"thresholds file {path} has {counts['gate_proj']} layers but the model has {num_layers} decoder layers"
        )
    return out


def save_thresholds(thresholds: Mapping[str, Sequence[float]], path: str | Path, extra: Optional[dict] = None) -> None:
    """Write thresholds in the artifact's format (atomically)."""
    obj = {p: {f"layer_{i}": float(t) for i, t in enumerate(thresholds[p])} for p in PROJS}
    if extra:
        obj["_meta"] = extra
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


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
        if self.thresholds is not None:
            missing = [p for p in PROJS if p not in self.thresholds]
            if missing:
                raise ValueError(f"thresholds lack {missing}")


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


class SparseMLP(nn.Module):
    """Thresholded SwiGLU MLP; reuses the projections of the module it replaces."""

    def __init__(
        self,
        gate_proj: nn.Module,
        up_proj: nn.Module,
        down_proj: nn.Module,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        layer_idx: int,
        thresholds: Optional[Mapping[str, float]] = None,
        codebooks: Optional[Mapping[str, nn.Module]] = None,
    ) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn
        self.layer_idx = layer_idx
        self.thresholds = {p: float((thresholds or {}).get(p, 0.0)) for p in PROJS}
        # codebooks are shared between layers: keep them out of this module's state_dict/children
        self._codebooks: dict[str, nn.Module] = dict(codebooks or {})
        self.observers: list[Observer] = []

    @classmethod
    def from_mlp(cls, mlp: nn.Module, layer_idx: int, config: SparsityConfig) -> "SparseMLP":
        missing = [a for a in MLP_ATTRS if not hasattr(mlp, a)]
        if missing:
            raise UnsupportedModelError(
                f"layer {layer_idx} MLP is {type(mlp).__name__}, which lacks {missing}; "
                "only gate_proj/up_proj/down_proj/act_fn (SwiGLU) MLPs are supported"
            )
        thr = None if config.thresholds is None else {p: config.thresholds[p][layer_idx] for p in PROJS}
        return cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn, layer_idx, thr, config.codebooks)

    # -- observers ---------------------------------------------------------------------------
    def _notify(self, name: str, y: torch.Tensor) -> None:
        for obs in self.observers:
            obs(self.layer_idx, name, y)

    def _post(self, proj: str, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = _threshold(raw, self.thresholds[proj])
        if self.observers:
            self._notify(proj, y)
        cb = self._codebooks.get(proj)
        if cb is not None:
            y = cb(y, raw=raw, layer_idx=self.layer_idx, x=x)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observers:
            self._notify("input", x)
        g = self._post("gate_proj", self.gate_proj(x), x)
        u = self._post("up_proj", self.up_proj(x), x)
        return self._post("down_proj", self.down_proj(self.act_fn(g) * u), x)

    def extra_repr(self) -> str:
        t = ", ".join(f"{p}={self.thresholds[p]:.4g}" for p in PROJS)
        cbs = ",".join(self._codebooks) or "none"
        return f"layer={self.layer_idx}, thresholds=({t}), codebooks={cbs}"


class UnsupportedModelError(ValueError):
    """The model's decoder layers do not have a supported MLP."""


# --------------------------------------------------------------------------------------------
# the swap
# --------------------------------------------------------------------------------------------
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


def check_supported(model: nn.Module) -> int:
    """Raise UnsupportedModelError naming the offending module; return the number of layers."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            raise UnsupportedModelError(
                f"decoder layer {i} ({type(layer).__name__}) has no 'mlp' attribute; unsupported architecture"
            )
        if isinstance(mlp, SparseMLP):
            continue
        missing = [a for a in MLP_ATTRS if not hasattr(mlp, a)]
        if missing:
            raise UnsupportedModelError(
                f"decoder layer {i} MLP is {type(mlp).__name__}, which lacks {missing}; "
                "only gate_proj/up_proj/down_proj/act_fn (SwiGLU) MLPs are supported"
            )
    return len(layers)


def sparsify_(model: nn.Module, config: SparsityConfig) -> nn.Module:
    """Swap every decoder layer's MLP for a :class:`SparseMLP` (in place; returns the model).

    Applying it to an already-swapped model re-configures from the original projections.
    """
    n = check_supported(model)
    if config.thresholds is not None:
        have = len(config.thresholds["gate_proj"])
        if have != n:
            raise ThresholdsError(f"thresholds have {have} layers but the model has {n} decoder layers")
    for i, layer in enumerate(decoder_layers(model)):
        layer.mlp = SparseMLP.from_mlp(layer.mlp, i, config)
    return model


def sparse_mlps(model: nn.Module) -> list[SparseMLP]:
    return [m for m in model.modules() if isinstance(m, SparseMLP)]


def add_observer(model: nn.Module, fn: Observer) -> Iterator[SparseMLP]:
    mlps = sparse_mlps(model)
    if not mlps:
        raise RuntimeError("model has no SparseMLP modules: call sparsify_() first")
    for m in mlps:
        m.observers.append(fn)
    return iter(mlps)


def remove_observer(model: nn.Module, fn: Observer) -> None:
    for m in sparse_mlps(model):
        if fn in m.observers:
            m.observers.remove(fn)
