"""LaRoSA with its rotation folded into the model (``larosa_folded``, ``larosa_folded_wina``): no extra reads.

The frontier's ``larosa`` (:mod:`awq.methods.teal`) rotates each layer's MLP input ``x`` by its own PCA basis
``Q_l`` at run time and is charged one ``H x H`` read per layer (SmolLM2-135M: 0.125 of the MLP's weight
bytes, Qwen2.5-0.5B: 0.061).  That is also what the rotation costs when it is folded into the neighbouring
weights through computational invariance (SliceGPT): with a *different* basis per layer the residual stream
must be re-rotated between layers (SliceGPT's shortcut matrices ``Q_l^T Q_{l+1}``, one ``H x H`` per change of
basis); the released LaRoSA code applies ``Q`` and ``Q^T`` at run time.

With **one** basis ``Q`` for the whole residual stream (QuaRot/SpinQuant's choice) the rotation is free:
RMSNorm commutes with an orthogonal ``Q`` once its weight ``w`` is absorbed into the linear layers that read
its output (``n(r Q) = n(r) Q``, ``n`` the weightless RMS normalisation), so with ``E' = E Q``,
``W_in' = W_in diag(w) Q`` (q/k/v, gate/up; every norm weight set to 1), ``W_out' = Q^T W_out`` (o, down: as
rows ``W_out Q``), ``W_lm' = W_lm diag(w_final) Q`` the model computes the same function, and each MLP's input
is ``z = n(r) Q = (x / w_l) Q`` (:func:`fold_rotation` does it; ``tests/test_larosa.py`` checks both).
Sparsifying ``z`` then reads columns of ``W_in'`` exactly as TEAL reads columns of ``W_in``: no rotation is read
at run time.

This module evaluates that folded model without rewriting the model: :class:`LarosaFoldedConfig` keeps ``Q``
and each layer's norm scale ``s_l`` (the pre-MLP RMSNorm's effective weight, ``w`` or Gemma's ``1 + w``); the MLP
computes ``z = x (diag(1/s_l) Q)``, thresholds ``|z|`` and ``|h|`` (``larosa_folded``, LaRoSA's criterion) or
WINA's ``|z_i| ||W'_gu[:, i]||`` and ``|h_j| ||W_down[:, j]||`` (``larosa_folded_wina``), and multiplies by the folded ``W_g diag(s_l) Q`` / ``W_u diag(s_l) Q``: the folded
model's arithmetic, to float rounding.  ``Q`` is the PCA basis of ``z`` pooled over all layers (eigenvectors of
``sum_l Z_l^T Z_l``, ``Z_l = X_l / s_l``: rows of RMS 1, so every layer weighs the same).
Refused (one line): a norm weight with zero entries (not invertible), and models with norms after the MLP or
attention (Gemma 2/3 ``post_feedforward_layernorm``): a post-norm's weight cannot be absorbed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from awq.load.arch import decoder_layers
from awq.methods.base import MethodConfig
from awq.methods.common import MethodError, dense_h, keep_threshold, mlp_dims, mlp_of, token_density
from awq.methods.greedy import STEP, TOKENS, LayerTables, layer_path, split_at
from awq.methods.teal import InputSparseMLP, TealConfig, _check_layers, pca_rotation

log = logging.getLogger(__name__)

POST_NORMS = ("post_feedforward_layernorm", "pre_feedforward_layernorm")


def mlp_norm(layer: nn.Module) -> nn.Module:
    """The RMSNorm whose output a decoder layer's MLP reads."""
    for name in POST_NORMS:
        if hasattr(layer, name):
            raise MethodError(f"{type(layer).__name__} has a {name}: norms after a block cannot absorb a rotation "
                              "(larosa_folded needs a pre-norm-only model such as Llama / Qwen2 / Mistral)")
    norm = getattr(layer, "post_attention_layernorm", None)
    if norm is None:
        raise MethodError(f"{type(layer).__name__} has no post_attention_layernorm (the MLP's input norm)")
    return norm


@torch.no_grad()
def norm_scale(norm: nn.Module) -> torch.Tensor:
    """The effective per-channel weight of an RMSNorm (``w``, or ``1 + w`` for Gemma's), by value: its output
    on a vector of ones (RMS 1), float64 on the CPU."""
    w = next(norm.parameters())
    s = norm(torch.ones(1, w.numel(), dtype=w.dtype, device=w.device))[0].double().cpu()
    if bool((s.abs() < 1e-6).any()):
        raise MethodError("the MLP's input norm has (near) zero weights: absorbing it into the MLP is not invertible")
    return s


@dataclass
class LarosaFoldedConfig(TealConfig):
    """Thresholds on ``|z| (* x_scale)``, ``z = (x / norm_scales[l]) rotation``; one orthogonal rotation."""

    rotation: Optional[torch.Tensor] = None  # [H, H] float32, columns by decreasing variance
    norm_scales: list[torch.Tensor] = field(default_factory=list)  # [H] per layer
    wina: bool = False  # also scale |z_i| by the column norm of the folded [W_gate; W_up]

    def validate(self, model: nn.Module) -> None:
        super().validate(model)
        _check_layers(model, "LarosaFoldedConfig", norm_scales=self.norm_scales)
        for layer in decoder_layers(model):
            mlp_norm(layer)

    def extra_read(self, model: nn.Module) -> float:
        return 0.0  # folded: nothing read besides the (rotated) MLP weights

    def summary(self) -> dict:
        return {**super().summary(), "wina": self.wina, "rotation": "one global PCA basis, folded",
                **getattr(self, "info", {})}

    def build(self, mlp: nn.Module, i: int) -> "LarosaFoldedMLP":
        return LarosaFoldedMLP(mlp, i, self.x_thresholds[i], self.h_thresholds[i], self.rotation, self.norm_scales[i],
                               self.wina)


def folded_weights(mlp: nn.Module, s: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_gate diag(s) Q`` and ``W_up diag(s) Q`` (float64)."""
    sq = s.to(q.device)[:, None] * q
    return (mlp.gate_proj.weight.detach().double().to(q.device) @ sq,
            mlp.up_proj.weight.detach().double().to(q.device) @ sq)


class LarosaFoldedMLP(InputSparseMLP):
    """:class:`InputSparseMLP` whose input transform ``diag(1/s) Q`` and weights are the folded model's."""

    def __init__(self, base: nn.Module, layer_idx: int, t_x: float, t_h: float, q: torch.Tensor, s: torch.Tensor,
                 wina: bool) -> None:
        dt, dev = base.gate_proj.weight.dtype, base.gate_proj.weight.device
        qd = q.to(dev, torch.float64)
        wg, wu = folded_weights(base, s, qd)
        xs = (wg.square().sum(0) + wu.square().sum(0)).sqrt() if wina else None
        hs = base.down_proj.weight.detach().double().square().sum(0).sqrt() if wina else None  # Q^T keeps them
        super().__init__(base, layer_idx, t_x, t_h, x_scale=xs, h_scale=hs, rotation=(qd / s.to(dev)[:, None]))
        self.w_gate, self.w_up = wg.to(dt), wu.to(dt)

    @property
    def extra_bytes(self) -> int:
        return 0

    def decode_unsupported(self) -> Optional[str]:
        return ("evaluation module: the folded model runs TEAL's kernel on rotated weights, this one rotates at run "
                "time (use awq.methods.larosa.fold_rotation for a model to time)")

    def prepare_decode(self) -> bool:
        return False

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, larosa_folded, t_x={self.t_x:.4g}, t_h={self.t_h:.4g}"


@torch.no_grad()
def calibrate_larosa_folded(model: nn.Module, xs: list[torch.Tensor], density: float,
                            wina: bool = False) -> LarosaFoldedConfig:
    layers = decoder_layers(model)
    scales = [norm_scale(mlp_norm(layer)) for layer in layers]
    zs = [x.double() / s for x, s in zip(xs, scales)]
    cov = sum(z.T @ z for z in zs)
    evals, evecs = torch.linalg.eigh(cov)
    q = evecs[:, torch.argsort(evals, descending=True)]
    tx, th = [], []
    for i, (x, z) in enumerate(zip(xs, zs)):
        mlp = mlp_of(model, i)
        score = (z @ q).abs()
        if wina:
            wg, wu = folded_weights(mlp, scales[i], q)
            score = score * (wg.square().sum(0) + wu.square().sum(0)).sqrt().cpu()
        tx.append(keep_threshold(score.float(), density))
        a, u = dense_h(mlp, x)
        h = (a * u).abs().cpu()
        if wina:
            h = h * mlp.down_proj.weight.detach().float().square().sum(0).sqrt().cpu()
        th.append(keep_threshold(h, density))
    return LarosaFoldedConfig(tx, th, rotation=q.float(), norm_scales=[s.float() for s in scales], wina=wina)


class _FoldedView(nn.Module):
    """One layer's MLP as the folded model has it (input z, gate/up ``W diag(s) Q``; down unchanged)."""

    def __init__(self, mlp: nn.Module, s: torch.Tensor, q: torch.Tensor) -> None:
        super().__init__()
        wg, wu = folded_weights(mlp, s, q.double())
        dt = mlp.gate_proj.weight.dtype
        self.gate_proj = nn.Linear(wg.shape[1], wg.shape[0], bias=mlp.gate_proj.bias is not None).to(dt)
        self.up_proj = nn.Linear(wu.shape[1], wu.shape[0], bias=mlp.up_proj.bias is not None).to(dt)
        with torch.no_grad():
            self.gate_proj.weight.copy_(wg)
            self.up_proj.weight.copy_(wu)
            for a, b in ((self.gate_proj, mlp.gate_proj), (self.up_proj, mlp.up_proj)):
                if b.bias is not None:
                    a.bias.copy_(b.bias)
        self.down_proj, self.act_fn = mlp.down_proj, mlp.act_fn


@torch.no_grad()
def calibrate_larosa_folded_greedy(model: nn.Module, xs: list[torch.Tensor], density: float,
                                   cache: Optional[dict] = None, seed: int = 0) -> LarosaFoldedConfig:
    """``larosa_folded`` with each layer's (d_x, d_h) split by TEAL's block-wise greedy search
    (:mod:`awq.methods.greedy`) on the folded layer: the rotation is free, so the greedy allocation applies as to
    TEAL."""
    base = calibrate_larosa_folded(model, xs, 1.0)  # the rotation and norm scales (thresholds unused)
    q, scales = base.rotation.double(), [s.double() for s in base.norm_scales]
    views = [_FoldedView(mlp_of(model, i), scales[i], q) for i in range(len(xs))]
    zs = [((x.double() / s) @ q).float() for x, s in zip(xs, scales)]
    key = ("larosa_folded", STEP, TOKENS, seed)
    got = None if cache is None else cache.get(key)
    if got is None or got["until"] > density + 1e-12:
        got = {"until": density, "paths": [layer_path(v, z, "teal", density, STEP, TOKENS, seed)
                                           for v, z in zip(views, zs)]}
        if cache is not None:
            cache[key] = got
        log.info("larosa_folded greedy: x/h choices per layer down to density %.3f: %s", density,
                 " ".join(c for c, _ in got["paths"]))
    tx, th, dxs, dhs = [], [], [], []
    for i, (v, z) in enumerate(zip(views, zs)):
        d_x, d_h = split_at(got["paths"][i][0], density, STEP)
        t_x, t_h = LayerTables(v, z, "teal").thresholds(d_x, d_h)
        tx.append(t_x)
        th.append(t_h)
        dxs.append(d_x)
        dhs.append(d_h)
    cfg = LarosaFoldedConfig(tx, th, rotation=base.rotation, norm_scales=base.norm_scales)
    cfg.info = {"density_x": dxs, "density_h": dhs}  # type: ignore[attr-defined]
    return cfg


# ------------------------------------------------------------------------------------------------
# LaRoSA's own selection: top-k per token (the released code), per-layer rotation charged as ``larosa``
# ------------------------------------------------------------------------------------------------
@dataclass
class LarosaTopkConfig(MethodConfig):
    """Per layer ``l``: keep the ``round(density * H)`` largest ``|x Q_l|`` and the ``round(density * F)`` largest
    ``|h|`` of every token (LaRoSA's Top-K: the same density for every token, no calibrated threshold)."""

    density: float
    rotations: list[torch.Tensor] = field(default_factory=list)

    def validate(self, model: nn.Module) -> None:
        _check_layers(model, "LarosaTopkConfig", rotations=self.rotations)

    def extra_read(self, model: nn.Module) -> float:
        hidden, inter = mlp_dims(model)
        return hidden * hidden / (3.0 * hidden * inter)  # the per-layer rotation, read at run time

    def summary(self) -> dict:
        return {"density": self.density, "selection": "top-k per token on |x Q_l| and |h|"}

    def build(self, mlp: nn.Module, i: int) -> "LarosaTopkMLP":
        return LarosaTopkMLP(mlp, i, self.density, self.rotations[i])


class LarosaTopkMLP(InputSparseMLP):
    """LaRoSA with per-token top-k masks (masked dense; no batch-1 kernel: the C++ kernel thresholds)."""

    def __init__(self, base: nn.Module, layer_idx: int, density: float, q: torch.Tensor) -> None:
        super().__init__(base, layer_idx, 0.0, 0.0, rotation=q)
        self.kx = max(1, round(density * base.gate_proj.in_features))
        self.kh = max(1, round(density * base.gate_proj.out_features))

    @staticmethod
    def _topk_mask(v: torch.Tensor, k: int) -> torch.Tensor:
        idx = v.abs().topk(k, dim=-1).indices
        return torch.zeros_like(v, dtype=torch.bool).scatter_(-1, idx, True)

    def decode_unsupported(self) -> Optional[str]:
        return "top-k selection (the C++ input-sparse kernel takes thresholds)"

    def prepare_decode(self) -> bool:
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xr = x @ self.rotation
        keep_x = self._topk_mask(xr, self.kx)
        xs = xr * keep_x
        g = torch.nn.functional.linear(xs, self.w_gate, self.gate_proj.bias)
        u = torch.nn.functional.linear(xs, self.w_up, self.up_proj.bias)
        h = self.act_fn(g) * u
        keep_h = self._topk_mask(h, self.kh)
        y = self.down_proj(h * keep_h)
        if self.read_meter is not None:
            dx = token_density(keep_x)
            self.read_meter.add(self.layer_idx, dx.numel(), dx, dx, token_density(keep_h))
        return y

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, larosa_topk, k_x={self.kx}, k_h={self.kh}"


@torch.no_grad()
def calibrate_larosa_topk(model: nn.Module, xs: list[torch.Tensor], density: float) -> LarosaTopkConfig:
    return LarosaTopkConfig(density, [pca_rotation(x) for x in xs])


# ------------------------------------------------------------------------------------------------
# the real fold (what a deployment does once; here the proof that the evaluation module is that model)
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def fold_rotation(model: nn.Module, q: torch.Tensor) -> nn.Module:
    """Rotate a Llama / Qwen2 / Mistral-style model's residual stream by ``q`` in place (computational
    invariance): embeddings ``E Q``, every RMSNorm's weight absorbed into the q/k/v and gate/up layers after it
    (then set to 1) and those multiplied by ``Q``, o/down outputs rotated (``Q^T W``), the LM head ``W diag(w) Q``
    (untied from the embeddings).  The logits are unchanged; each MLP then reads ``z = n(r) Q``."""
    qd = q.double()
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    probe = inner.norm
    saved = probe.weight.detach().clone()
    probe.weight.data.fill_(1.0)
    unit = torch.allclose(norm_scale(probe), torch.ones(1, dtype=torch.float64), atol=1e-4)
    probe.weight.data.copy_(saved)
    if not unit:
        raise MethodError(f"{type(probe).__name__}: not a weight-times-x RMSNorm (fold_rotation handles Llama / "
                          "Qwen2 / Mistral norms)")
    if hasattr(model, "config"):
        model.config.tie_word_embeddings = False

    def absorb_in(norm: nn.Module, lins: list[nn.Linear]) -> None:
        s = norm_scale(norm)
        for lin in lins:
            lin.weight.data = (lin.weight.double() * s[None, :].to(lin.weight.device) @ qd.to(lin.weight.device)
                               ).to(lin.weight.dtype)
        norm.weight.data.fill_(1.0)

    def rotate_out(lin: nn.Linear) -> None:
        lin.weight.data = (qd.T.to(lin.weight.device) @ lin.weight.double()).to(lin.weight.dtype)
        if lin.bias is not None:
            lin.bias.data = (qd.T.to(lin.bias.device) @ lin.bias.double()).to(lin.bias.dtype)

    emb = inner.embed_tokens
    emb.weight = nn.Parameter((emb.weight.detach().double() @ qd.to(emb.weight.device)).to(emb.weight.dtype))
    for layer in decoder_layers(model):
        at, mlp = layer.self_attn, layer.mlp
        absorb_in(layer.input_layernorm, [at.q_proj, at.k_proj, at.v_proj])
        rotate_out(at.o_proj)
        absorb_in(mlp_norm(layer), [mlp.gate_proj, mlp.up_proj])
        rotate_out(mlp.down_proj)
    head = model.get_output_embeddings()
    w = head.weight.detach().double() * norm_scale(inner.norm)[None, :].to(head.weight.device)
    head.weight = nn.Parameter((w @ qd.to(head.weight.device)).to(head.weight.dtype))
    inner.norm.weight.data.fill_(1.0)
    return model
