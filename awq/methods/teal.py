"""Input sparsity of the MLP (TEAL-style) and its two variants, WINA and LaRoSA.

One module, :class:`InputSparseMLP`, per layer ``l``::

    x' = x Q_l                           (LaRoSA only; Q_l orthogonal, W Q_l precomputed)
    keep_x = |x'| * s_x >= t_x[l]        (s_x = 1 for TEAL/LaRoSA; WINA: column norms of [W_gate; W_up])
    h = act(gate(x' * keep_x)) * up(x' * keep_x)
    keep_h = |h| * s_h >= t_h[l]         (s_h = 1; WINA: column norms of W_down)
    y = down(h * keep_h)

Only the columns of gate/up where ``keep_x`` is set and the columns of down where ``keep_h`` is
set are needed, so a token reads ``gate = up = density(keep_x)`` and ``down = density(keep_h)``
(fed to the read meter from these masks). LaRoSA also reads its ``H x H`` rotation every decode
step (it cannot be folded into the previous layer's RMSNorm output in general): its share of the
MLP's weight bytes is the config's :meth:`LarosaConfig.extra_read`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from awq.load.arch import decoder_layers
from awq.methods.base import MethodConfig, SwappedMLP
from awq.methods.common import MethodError, dense_h, keep_threshold, mlp_dims, mlp_of, token_density
from awq.methods.dynamic_sparse import input_decode_for, unsupported


def _check_layers(model: nn.Module, name: str, **lists) -> None:
    n = len(decoder_layers(model))
    for k, v in lists.items():
        if len(v) != n:
            raise MethodError(f"{name}: {k} has {len(v)} layers but the model has {n} decoder layers")


@dataclass
class TealConfig(MethodConfig):
    """Per-layer thresholds on ``|x|`` (MLP input) and on ``|h|``, ``h = act(gate(x)) * up(x)``."""

    x_thresholds: list[float]
    h_thresholds: list[float]

    def validate(self, model: nn.Module) -> None:
        _check_layers(model, type(self).__name__, x_thresholds=self.x_thresholds, h_thresholds=self.h_thresholds)

    def extra_read(self, model: nn.Module) -> float:
        return 0.0

    def summary(self) -> dict:
        return {"x_thresholds": list(self.x_thresholds), "h_thresholds": list(self.h_thresholds)}

    def build(self, mlp: nn.Module, i: int) -> "InputSparseMLP":
        return InputSparseMLP(mlp, i, self.x_thresholds[i], self.h_thresholds[i])


@dataclass
class WinaConfig(TealConfig):
    """As TEAL, thresholds on ``|x_i| * ||[W_gate; W_up][:, i]||_2`` and ``|h_j| * ||W_down[:, j]||_2``."""

    def build(self, mlp: nn.Module, i: int) -> "InputSparseMLP":
        sx, sh = wina_scales(mlp)
        return InputSparseMLP(mlp, i, self.x_thresholds[i], self.h_thresholds[i], x_scale=sx, h_scale=sh)


@dataclass
class LarosaConfig(TealConfig):
    """As TEAL on ``x Q_l`` (``rotations[l]`` = Q_l, orthogonal ``[H, H]``); thresholds on ``|x Q_l|``."""

    rotations: list[torch.Tensor] = field(default_factory=list)

    def validate(self, model: nn.Module) -> None:
        super().validate(model)
        _check_layers(model, "LarosaConfig", rotations=self.rotations)
        hidden, _ = mlp_dims(model)
        for i, q in enumerate(self.rotations):
            if tuple(q.shape) != (hidden, hidden):
                raise MethodError(f"LarosaConfig: rotation {i} is {tuple(q.shape)}, want ({hidden}, {hidden})")

    def extra_read(self, model: nn.Module) -> float:
        hidden, inter = mlp_dims(model)
        return hidden * hidden / (3.0 * hidden * inter)  # one H x H matrix per layer vs gate+up+down

    def build(self, mlp: nn.Module, i: int) -> "InputSparseMLP":
        return InputSparseMLP(mlp, i, self.x_thresholds[i], self.h_thresholds[i], rotation=self.rotations[i])


def wina_scales(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Column norms: ``[H]`` of gate and up stacked, ``[F]`` of down."""
    wg, wu, wd = (getattr(mlp, p).weight.detach().float() for p in ("gate_proj", "up_proj", "down_proj"))
    return (wg.square().sum(0) + wu.square().sum(0)).sqrt(), wd.square().sum(0).sqrt()


class InputSparseMLP(SwappedMLP):
    """TEAL / WINA / LaRoSA MLP; reuses the projections of ``base`` (rotated copies for LaRoSA)."""

    def __init__(self, base: nn.Module, layer_idx: int, t_x: float, t_h: float,
                 x_scale: Optional[torch.Tensor] = None, h_scale: Optional[torch.Tensor] = None,
                 rotation: Optional[torch.Tensor] = None) -> None:
        super().__init__(base, layer_idx)
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = base.gate_proj, base.up_proj, base.down_proj, base.act_fn
        self.t_x, self.t_h = float(t_x), float(t_h)
        dt, dev = base.gate_proj.weight.dtype, base.gate_proj.weight.device
        self.x_scale = None if x_scale is None else x_scale.to(dev, dt)
        self.h_scale = None if h_scale is None else h_scale.to(dev, dt)
        self.rotation = None
        if rotation is not None:
            q = rotation.to(dev, torch.float64)
            self.rotation = q.to(dt)
            # y = x W^T = (x Q)(W Q)^T for orthogonal Q: fold Q into the weights once
            self.w_gate = (base.gate_proj.weight.detach().double() @ q).to(dt)
            self.w_up = (base.up_proj.weight.detach().double() @ q).to(dt)

    @property
    def extra_bytes(self) -> int:
        """Weight bytes read per token besides the MLP's (LaRoSA's rotation)."""
        return 0 if self.rotation is None else self.rotation.numel() * self.rotation.element_size()

    def decode_unsupported(self) -> Optional[str]:
        return unsupported(self.base)

    def prepare_decode(self) -> bool:
        """Make the batch-1 column-gathered kernel (:mod:`awq.methods.dynamic_sparse`; a transposed copy of the
        MLP's weights) used for single-token calls from now on.  False if it cannot run here."""
        if self._decode is None:
            rot = self.rotation is not None
            self._decode = input_decode_for(self, self.w_gate if rot else self.gate_proj.weight,
                                            self.w_up if rot else self.up_proj.weight, self.t_x, self.t_h,
                                            self.x_scale, self.h_scale)
        return self._decode is not None

    def _decode_step(self, x: torch.Tensor) -> torch.Tensor:
        xr = x if self.rotation is None else x @ self.rotation
        y = self._decode(xr)
        if self.read_meter is not None:
            dx, dh = self._decode.densities()
            self.read_meter.add(self.layer_idx, 1, dx, dx, dh)
        return y.to(x.dtype).view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_decode_step(x):
            return self._decode_step(x)
        if self.observers:
            self._notify("input", x)
        xr = x if self.rotation is None else x @ self.rotation
        sx = xr.abs() if self.x_scale is None else xr.abs() * self.x_scale
        keep_x = sx >= self.t_x
        xs = xr * keep_x
        if self.rotation is None:
            g, u = self.gate_proj(xs), self.up_proj(xs)
        else:
            g = F.linear(xs, self.w_gate, self.gate_proj.bias)
            u = F.linear(xs, self.w_up, self.up_proj.bias)
        h = self.act_fn(g) * u
        sh = h.abs() if self.h_scale is None else h.abs() * self.h_scale
        keep_h = sh >= self.t_h
        y = self.down_proj(h * keep_h)
        if self.observers:
            self._notify("gate_proj", g)
            self._notify("up_proj", u)
            self._notify("down_proj", y)
        if self.read_meter is not None:
            dx = token_density(keep_x)
            self.read_meter.add(self.layer_idx, dx.numel(), dx, dx, token_density(keep_h))
        return y

    def extra_repr(self) -> str:
        kind = "larosa" if self.rotation is not None else ("wina" if self.x_scale is not None else "teal")
        return f"layer={self.layer_idx}, {kind}, t_x={self.t_x:.4g}, t_h={self.t_h:.4g}"


# ------------------------------------------------------------------------------------------------
# calibration (dense MLP inputs of the train part, see awq.methods.common.collect_mlp_inputs)
# ------------------------------------------------------------------------------------------------
def pca_rotation(x: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of ``x^T x`` (float64), columns by decreasing eigenvalue: an orthogonal ``[H, H]``."""
    xd = x.double()
    evals, evecs = torch.linalg.eigh(xd.T @ xd)
    return evecs[:, torch.argsort(evals, descending=True)].float()


@torch.no_grad()
def calibrate_teal(model: nn.Module, xs: list[torch.Tensor], density: float, kind: str = "teal") -> TealConfig:
    """Thresholds keeping a fraction ``density`` of the (scored) calibration entries of x and of h per layer."""

    tx, th, rots = [], [], []
    for i, x in enumerate(xs):
        mlp = mlp_of(model, i)
        a, u = dense_h(mlp, x)
        h = (a * u).abs().cpu()
        if kind == "wina":
            sx, sh = wina_scales(mlp)
            tx.append(keep_threshold(x.abs() * sx.cpu(), density))
            th.append(keep_threshold(h * sh.cpu(), density))
        elif kind == "larosa":
            q = pca_rotation(x)
            rots.append(q)
            tx.append(keep_threshold((x @ q).abs(), density))
            th.append(keep_threshold(h, density))
        else:
            tx.append(keep_threshold(x.abs(), density))
            th.append(keep_threshold(h, density))
    if kind == "wina":
        return WinaConfig(tx, th)
    if kind == "larosa":
        return LarosaConfig(tx, th, rotations=rots)
    return TealConfig(tx, th)


def calibrate_wina(model: nn.Module, xs: list[torch.Tensor], density: float) -> WinaConfig:
    return calibrate_teal(model, xs, density, kind="wina")


def calibrate_larosa(model: nn.Module, xs: list[torch.Tensor], density: float) -> LarosaConfig:
    return calibrate_teal(model, xs, density, kind="larosa")
