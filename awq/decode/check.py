"""The decode-path check: a window's perplexity fed one token at a time through the lean decoder's step (its
kernels, its weight format) against the batched evaluation of the same point on exactly the weights the kernels
read (:class:`fake_quantized`: dequantised blocks, int8 activations, float16 KV cache).  A fast kernel that is
wrong fails here; ``bench/bench_decode.py --ppl_check`` runs it on a real model."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from awq.decode.quant import ATTN_PROJS, MLP_PROJS, QuantDecodeError, QWeights, fake_quant_, mlp_kind
from awq.decode.tcols import TCOLS_PROJS, TcolsProduct, sparse_layout
from awq.kernels.quant import quantize_act_ref
from awq.load.arch import decoder_layers
from awq.methods.base import base_mlp


@torch.inference_mode()
def teacher_forced_nll(dec, ids: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token NLL, tokens scored) of the window ``ids`` fed one token at a time through the
    decoder's own step (prefill of the first token, then :meth:`step` for each next one): the decode-path
    perplexity is ``exp(sum / tokens)``."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() < 2:
        raise QuantDecodeError("teacher forcing needs at least 2 tokens")
    dec._ensure(ids.numel())
    logits = dec.prefill(ids[:1])
    total = 0.0
    for t in range(1, ids.numel()):
        total -= float(torch.log_softmax(logits.double(), -1)[ids[t]])
        if t + 1 < ids.numel():
            logits = dec.step(int(ids[t]))
    return total, ids.numel() - 1


def ppl(nll: float, n: int) -> float:
    return math.exp(nll / max(1, n))


KV16_ATTENTION = "awq_kv16"  # transformers attention implementation: sdpa on float16-rounded keys and values


def _kv16_attention(module, query, key, value, *args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key.half().to(key.dtype), value.half().to(value.dtype), *args,
                                  **kwargs)


def _register_kv16() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(KV16_ATTENTION, _kv16_attention)


class fake_quantized:
    """``with fake_quantized(model, qw):`` the model computes what the quantised kernels compute: the
    dequantised weights of ``qw`` in every linear layer, LM head and embedding (swapped MLP modules share the
    projections, so they see them too), and -- ``act=True`` -- each linear layer's input quantised to int8
    blocks as the kernels do (a forward pre-hook), and -- ``kv16=True`` -- attention on float16-rounded keys
    (after RoPE) and values, as the kernels' float16 KV cache holds them (an attention implementation
    registered with transformers).  Everything is restored on exit."""

    def __init__(self, model: nn.Module, qw: Optional[QWeights], act: bool = True, kv16: bool = True) -> None:
        self.model, self.qw, self.act, self.kv16, self.saved, self.hooks = model, qw, act, kv16, [], []
        self.attn = None

    def __enter__(self) -> nn.Module:
        if self.qw is not None:
            lins = [lin for layer in decoder_layers(self.model)
                    for lin in ([getattr(layer.self_attn, p) for p in ATTN_PROJS]
                                + [getattr(base_mlp(layer.mlp), p) for p in MLP_PROJS])]
            params = [lin.weight for lin in lins] + [self.model.get_input_embeddings().weight]
            if not self.qw.tied:
                params.append(self.model.get_output_embeddings().weight)
            self.saved = [(p, p.detach().clone()) for p in params]
            fake_quant_(self.model, self.qw)
            if self.act:
                hook = lambda mod, args: (quantize_act_ref(args[0]),) + tuple(args[1:])  # noqa: E731
                for lin in lins + [self.model.get_output_embeddings()]:
                    self.hooks.append(lin.register_forward_pre_hook(hook))
            if self.kv16:
                _register_kv16()
                self.attn = self.model.config._attn_implementation
                self.model.set_attn_implementation(KV16_ATTENTION)
        return self.model

    def __exit__(self, *exc) -> None:
        if self.attn is not None:
            self.model.set_attn_implementation(self.attn)
            self.attn = None
        for h in self.hooks:
            h.remove()
        self.hooks = []
        with torch.no_grad():
            for p, v in self.saved:
                p.copy_(v)
        self.saved = []


class sparse_weights:
    """``with sparse_weights(model, qw, mlps):`` inside :class:`fake_quantized`, the MLP projections that each
    layer's quantised sparse kernel reads from the tcols copy (:mod:`awq.decode.tcols`, :data:`TCOLS_PROJS` by the
    kernel of the layer's module: ``mlps[i]`` or, None, the installed one) hold that copy's values, so a point is
    scored on exactly the weights its kernels read; with ``act=True`` those projections also compute what the
    kernel computes (:class:`awq.decode.tcols.TcolsProduct`: its int8 rounding of ``x_j d_jb``) from their raw
    input, in place of :class:`fake_quantized`'s per-32-input activation rounding.  Nothing changes for
    ``qw=None`` (F32), dense layers, modules without a quantised kernel, or ``AWQ_QUANT_SPARSE_LAYOUT=cols``.
    Restored on exit."""

    def __init__(self, model: nn.Module, qw: Optional[QWeights], mlps=None, act: bool = False) -> None:
        self.model, self.qw, self.mlps, self.act, self.saved, self.hooks = model, qw, mlps, act, [], []

    def __enter__(self) -> nn.Module:
        if self.qw is None or sparse_layout() != "tcols":
            return self.model
        layers = decoder_layers(self.model)
        mods = self.mlps if self.mlps is not None else [None] * len(layers)
        with torch.no_grad():
            for i, (layer, m) in enumerate(zip(layers, mods)):
                m = layer.mlp if m is None else m
                if base_mlp(m) is m:  # the model's own (dense) MLP
                    continue
                try:
                    kind = mlp_kind(m)[0]
                except QuantDecodeError:
                    continue
                for p in TCOLS_PROJS.get(kind, ()):
                    lin = getattr(base_mlp(m), p)
                    self.saved.append((lin.weight, lin.weight.detach().clone()))
                    lin.weight.copy_(self.qw.tcols_values(i, p).to(lin.weight.dtype))
                    if self.act:
                        self._emulate(lin, i, p)
        return self.model

    def _emulate(self, lin: nn.Module, i: int, p: str) -> None:
        f = self.qw.layers[i]["gate_proj"].shape[0]
        which = "down" if p == "down_proj" else "gu"
        out = None if p == "down_proj" else slice(0, f) if p == "gate_proj" else slice(f, 2 * f)
        prod = TcolsProduct(self.qw.transposed(i, which), out)
        raw = {}
        # first of the pre-hooks: the input before fake_quantized's activation rounding
        self.hooks.append(lin.register_forward_pre_hook(lambda mod, args: raw.update(x=args[0]), prepend=True))
        self.hooks.append(lin.register_forward_hook(lambda mod, args, y: prod(raw.pop("x")).to(y.dtype)))

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        with torch.no_grad():
            for w, v in reversed(self.saved):
                w.copy_(v)
        self.saved = []


@torch.inference_mode()
def batched_nll(model: nn.Module, ids: torch.Tensor, mlps=None) -> tuple[float, int]:
    """(sum of next-token NLL, tokens) of the window in one batched forward, with ``mlps`` (per-layer modules,
    None entries / None: the model's own) installed for the call."""
    layers = decoder_layers(model)
    old = [layer.mlp for layer in layers]
    try:
        if mlps is not None:
            for layer, m in zip(layers, mlps):
                if m is not None:
                    layer.mlp = m
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        logits = model(ids).logits[0].double()
    finally:
        for layer, m in zip(layers, old):
            layer.mlp = m
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
    return float(nll), ids.numel() - 1


def decode_path_check(model: nn.Module, dec, ids: torch.Tensor, mlps=None, sensitivity: bool = False) -> dict:
    """The decode-path check: perplexity of ``ids`` fed one token at a time through ``dec``'s step (its
    weight format, ``mlps`` set on it) vs the batched evaluation of the same point (for a quantised decoder:
    on the dequantised weights it reads, with its int8 activation quantisation, :class:`fake_quantized`).
    ``{"ppl_batched", "ppl_decode", "rel_diff", "tokens"}``; with ``sensitivity`` also ``"ppl_jittered"`` and
    ``"sensitivity"``: the batched evaluation again with every linear weight scaled by ``1 +- 2**-23`` (float32
    rounding; a fixed random sign per weight) and its relative change: how far float rounding alone moves this
    point's perplexity (thresholded methods flip entries that sit on a threshold, and the window's tokens
    after the flip follow another trajectory)."""
    q = getattr(dec, "_q", None)
    qw = q.qw if q is not None else None
    dec.set_mlps(mlps)
    try:
        nd, n = teacher_forced_nll(dec, ids)
    finally:
        dec.set_mlps(None)
    with fake_quantized(model, qw, kv16=q is not None and q.kv_dtype == torch.float16), sparse_weights(model, qw, mlps, act=True):
        nb, _ = batched_nll(model, ids, mlps)
        if sensitivity:
            with _jittered(model):
                nj, _ = batched_nll(model, ids, mlps)
    pb, pd = ppl(nb, n), ppl(nd, n)
    out = {"ppl_batched": pb, "ppl_decode": pd, "rel_diff": abs(pd - pb) / pb, "tokens": n}
    if sensitivity:
        pj = ppl(nj, n)
        out.update(ppl_jittered=pj, sensitivity=abs(pj - pb) / pb)
    return out


class _jittered:
    """Every linear weight of the decoder layers and the LM head scaled by ``1 +- 2**-23`` (seeded signs), restored
    on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.saved = model, []

    def __enter__(self) -> None:
        g = torch.Generator().manual_seed(0)
        lins = [m for layer in decoder_layers(self.model) for m in layer.modules() if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for w in {id(t): t for t in [lin.weight for lin in lins] + [self.model.get_output_embeddings().weight]}.values():
                self.saved.append((w, w.detach().clone()))
                sign = torch.randint(0, 2, w.shape, generator=g).to(w.dtype) * 2 - 1
                w.mul_(1 + sign * 2.0 ** -23)

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for w, v in self.saved:
                w.copy_(v)
        self.saved = []
