"""Batch-1 decode on block-quantised weights (Q8_0 / Q4_0 / Q4_1) for :class:`awq.decode.lean.LeanDecoder`.

``LeanDecoder(model, weights="q8_0")`` (or ``"q4_0"``, ``"q4_1"``; ``head_weights`` for the LM head, default
the same format) runs every linear layer of a step -- q/k/v, o, gate/up, down and the LM head -- on
quantised weights, as llama.cpp does: one C++ call per token (``csrc/quant_decode.cpp``: one OpenMP
region, quantised GEMVs of ``csrc/quant_simd.h`` on int8-quantised activations, a float16 KV cache).

**Weights.**  :func:`model_qweights` gives every linear weight of the model as a :class:`QTensor` of
ggml's blocks: taken raw from a GGUF file when one is given and holds that tensor in that format (no
dequantise / requantise round trip; e.g. the shipped SmolLM2 Q4_1 file), else quantised from the
model's float weights by ``gguf.quants.quantize`` (ggml's reference quantiser, so a GGUF written by
:func:`awq.load.quant_gguf.write_quant_gguf` from the same floats holds bit-identical blocks).  The token
embedding is the dequantised LM head (tied models) or its own quantised copy, as llama.cpp reads it.

**Perplexity on the same weights.**  :func:`fake_quant_` writes the dequantised weights into the model
(the values the kernels read), so the batched evaluation of a quantised point scores exactly the
decoder's weights.  The kernels differ from it only by llama.cpp-style int8 activation quantisation and
the float16 KV cache; :func:`awq.decode.check.teacher_forced_nll` measures that difference (the decode-path check).

**Sparse MLPs at a format** (the modules of ``awq/methods`` and :mod:`awq.methods.gathered`, read from the
decoder's layers as the fp32 path does):

=======================  ====================================================================
module                   quantised kernel (``kind`` of csrc/quant_decode.cpp)
=======================  ====================================================================
dense                    rows GEMVs ``[gate; up]``, ``down``
TEAL / WINA              input rows of the cols (input-major) layout of ``[gate; up]`` for kept
                         ``x_i``, then of ``down`` for kept ``h_n``
CATS                     all gate rows, up rows and down input rows of the kept neurons
paper (``SparseMLP``)    ``[gate; up]`` rows, thresholds, down input rows of nonzero ``h``
gathered (fixed set)     gate/up rows and down input rows of the set
=======================  ====================================================================

The input-major copy the sparse kernels read is, by default, the **tcols** layout (:mod:`awq.decode.tcols`):
``W^T`` requantised in the same format with its blocks along the outputs, so a token reads exactly the quants
and scales of its active inputs (the format's bits per weight times the active inputs); such a point is scored
on exactly those weights (:func:`awq.decode.check.sparse_weights`).  ``AWQ_QUANT_SPARSE_LAYOUT=cols`` keeps the
GGUF's own blocks stored input-major instead (no requantisation; a sparse kernel then reads the scales of every
32-input block with one active input).  :meth:`QuantStep.read_stats` counts either into the bytes per token.
LaRoSA (rotated weights), the neuron predictor and the cluster methods have no quantised kernel yet (a one-line
error).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from awq.decode.tcols import LAYOUTS, dequant_t, requant_t, sparse_layout
from awq.kernels import quant as qk
from awq.kernels.mlp import EMPTY, is_silu, min_bytes_per_thread
from awq.kernels.quant import KERNEL_CODE
from awq.load.arch import decoder_layers, rope_pair_perm
from awq.load.quant_formats import QTensor, bits_per_weight, get_format, gguf_qtensor, quantize
from awq.methods.active_sets import PreparedIndices
from awq.methods.base import base_mlp
from awq.methods.cats import CatsMLP
from awq.methods.gathered import GatheredSparseMLP
from awq.methods.paper_mlp import SparseMLP
from awq.methods.teal import InputSparseMLP

log = logging.getLogger(__name__)

MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
_GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


class QuantDecodeError(ValueError):
    """A model / module / format the quantised decoder cannot run (one-line message)."""


@dataclass
class QWeights:
    """Every linear weight of a model in one block format, HF row order."""

    fmt: str
    head_fmt: str
    layers: list[dict[str, QTensor]]
    head: QTensor
    embed: QTensor  # the head for a tied model
    tied: bool
    sources: dict[str, int] = field(default_factory=dict)  # "gguf raw" / "gguf requantised" / "quantised": counts
    _t: dict = field(default_factory=dict, repr=False, compare=False)  # (layer, "gu" | "down") -> tcols QTensor

    def transposed(self, i: int, which: str) -> QTensor:
        """Layer i's ``[gate; up]`` (``which="gu"``) or down weight as the tcols copy (:mod:`awq.decode.tcols`):
        ``W^T`` requantised with blocks along the outputs (made once, shared by the kernels and the scoring)."""
        key = (i, which)
        if key not in self._t:
            d = self.layers[i]
            self._t[key] = requant_t(QTensor.cat([d["gate_proj"], d["up_proj"]]) if which == "gu" else d["down_proj"])
        return self._t[key]

    def tcols_values(self, i: int, proj: str) -> torch.Tensor:
        """The values ``[R, C]`` the tcols kernels read for layer i's ``proj``."""
        if proj == "down_proj":
            return dequant_t(self.transposed(i, "down"))
        w = dequant_t(self.transposed(i, "gu"))
        f = self.layers[i]["gate_proj"].shape[0]
        return w[:f] if proj == "gate_proj" else w[f:]

    def nbytes(self) -> dict[str, int]:
        """Storage bytes: attention, MLP, head (and the embedding when not tied)."""
        attn = sum(q.nbytes for ly in self.layers for k, q in ly.items() if k in ATTN_PROJS)
        mlp = sum(q.nbytes for ly in self.layers for k, q in ly.items() if k in MLP_PROJS)
        return {"attn": attn, "mlp": mlp, "head": self.head.nbytes, "embed": 0 if self.tied else self.embed.nbytes}


def step_bytes(model: nn.Module, fmt: str) -> dict[str, float]:
    """Storage bytes a dense batch-1 step reads per token with every linear layer in ``fmt`` (``f32``: 4 bytes per
    weight; a block format: its bits per weight): ``{"attn", "mlp", "head", "total"}`` (q/k/v/o of every layer,
    gate/up/down, the LM head; the embedding's one row and the norms are left out). The frontier's bytes per
    token is ``attn + head + mlp * (MLP read fraction + extra)``."""
    bpw = bits_per_weight(fmt) / 8.0
    attn = mlp = 0.0
    for layer in decoder_layers(model):
        attn += sum(getattr(layer.self_attn, p).weight.numel() for p in ATTN_PROJS) * bpw
        b = base_mlp(layer.mlp)
        mlp += sum(getattr(b, p).weight.numel() for p in MLP_PROJS) * bpw
    head = model.get_output_embeddings().weight.numel() * bpw
    return {"attn": attn, "mlp": mlp, "head": head, "total": attn + mlp + head}


def _is_tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def model_qweights(model: nn.Module, fmt: str, head_fmt: Optional[str] = None,
                   gguf_path: Optional[str | Path] = None) -> QWeights:
    """The model's linear weights as ``fmt`` blocks (LM head / embedding as ``head_fmt``, default ``fmt``);
    from ``gguf_path``'s raw blocks where that file holds the tensor in that format (see the module docstring)."""
    fmt = get_format(fmt).name
    head_fmt = get_format(head_fmt or fmt).name
    cfg = model.config
    nh = int(cfg.num_attention_heads)
    nkv = int(getattr(cfg, "num_key_value_heads", None) or nh)
    hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // nh)
    tensors = {}
    if gguf_path is not None:
        import gguf

        tensors = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    sources: dict[str, int] = {}

    def get(w: torch.Tensor, name: Optional[str], f: str, heads: int = 0) -> QTensor:
        t = tensors.get(name) if name else None
        if t is None or tuple(int(x) for x in reversed(list(t.shape))) != tuple(w.shape):
            sources["quantised from the model"] = sources.get("quantised from the model", 0) + 1
            return quantize(w.detach(), f)
        qt = gguf_qtensor(t, f)
        raw = t.tensor_type == get_format(f).ggml_type
        key = "gguf raw blocks" if raw else "gguf requantised"
        sources[key] = sources.get(key, 0) + 1
        if heads:  # llama's GGUF converter stores q/k rows in interleaved pair order: back to HF order
            perm = rope_pair_perm(heads, hd)
            deq = qt.dequantize()
            w32 = w.detach().float()
            if (deq[torch.argsort(perm)] - w32).abs().max() < (deq - w32).abs().max():
                qt = qt.rows(torch.argsort(perm))
        return qt

    layers = []
    for i, layer in enumerate(decoder_layers(model)):
        at, mlp = layer.self_attn, base_mlp(layer.mlp)
        d = {}
        for p in ATTN_PROJS:
            heads = nh if p == "q_proj" else nkv if p == "k_proj" else 0
            d[p] = get(getattr(at, p).weight, f"blk.{i}.{_GGUF_NAMES[p]}.weight", fmt, heads)
        for p in MLP_PROJS:
            if not hasattr(mlp, p):
                raise QuantDecodeError(f"layer {i}: MLP without {p} (SwiGLU gate/up/down needed)")
            d[p] = get(getattr(mlp, p).weight, f"blk.{i}.{_GGUF_NAMES[p]}.weight", fmt)
        layers.append(d)
    tied = _is_tied(model)
    emb = model.get_input_embeddings().weight
    if tied:
        head = get(emb, "output.weight" if "output.weight" in tensors else "token_embd.weight", head_fmt)
        embed = head
    else:
        head = get(model.get_output_embeddings().weight, "output.weight", head_fmt)
        embed = get(emb, "token_embd.weight", head_fmt)
    log.info("quantised weights %s (head %s): %s", fmt, head_fmt,
             ", ".join(f"{n} {k}" for k, n in sorted(sources.items())))
    return QWeights(fmt, head_fmt, layers, head, embed, tied, sources)


@torch.no_grad()
def fake_quant_(model: nn.Module, qw: QWeights) -> nn.Module:
    """Write the dequantised weights of ``qw`` into ``model`` (in place; returns it): every linear layer of
    the decoder layers, the LM head and the embedding.  Norms and biases are kept."""
    for layer, d in zip(decoder_layers(model), qw.layers):
        at, mlp = layer.self_attn, base_mlp(layer.mlp)
        for p in ATTN_PROJS:
            w = getattr(at, p).weight
            w.copy_(d[p].dequantize().to(w.dtype))
        for p in MLP_PROJS:
            w = getattr(mlp, p).weight
            w.copy_(d[p].dequantize().to(w.dtype))
    emb = model.get_input_embeddings().weight
    emb.copy_(qw.embed.dequantize().to(emb.dtype))
    if not qw.tied:
        out = model.get_output_embeddings().weight
        out.copy_(qw.head.dequantize().to(out.dtype))
    return model


def _planes(qt: QTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qt.qs.contiguous(), qt.d.contiguous(), qt.m.contiguous() if qt.m is not None else EMPTY


def _kern():
    k = qk.kernel()
    if k is None:
        raise QuantDecodeError("the quantised decode C++ kernel could not be built here (see the log)")
    return k


class QuantStep:
    """The C++ quantised step of one :class:`awq.decode.lean.LeanDecoder` (its layers' MLP choice, its rope)."""

    def __init__(self, dec, qw: QWeights, kv_dtype: torch.dtype = torch.float16) -> None:
        self.k = _kern()
        self.dec, self.qw = dec, qw
        H, F = dec.H, int(qw.layers[0]["gate_proj"].shape[0])
        self.H, self.F = H, F
        code = KERNEL_CODE
        self._rows: dict = {}
        head_p = self._pack_rows(qw.head)
        embed_p = head_p if qw.embed is qw.head else self._pack_rows(qw.embed)
        self.c = self.k.QDecoder(H, dec.nh, dec.nkv, dec.hd, F, dec.eps, dec.norm.float().contiguous(), head_p,
                                 code[qw.head_fmt], embed_p, code[qw.embed.fmt])
        self.c.set_min_bytes(min_bytes_per_thread())  # threads only from this many weight bytes per thread and layer
        perm_q, perm_k = rope_pair_perm(dec.nh, dec.hd), rope_pair_perm(dec.nkv, dec.hd)
        self._gu: list[torch.Tensor] = []
        self._cols: dict = {}
        for i, (ly, d) in enumerate(zip(dec.layers, qw.layers)):
            qkv = QTensor.cat([d["q_proj"].rows(perm_q), d["k_proj"].rows(perm_k), d["v_proj"]])
            bqkv = EMPTY
            if ly.bqkv is not None:  # the decoder's fused bias has q's rows scaled by hd**-0.5: undo that here
                nq = dec.nh * dec.hd
                bqkv = ly.bqkv.float().clone()
                bqkv[:nq] /= dec.hd ** -0.5
                bqkv = bqkv.contiguous()
            self.c.add_layer(ly.ln1.float().contiguous(), ly.ln2.float().contiguous(), self._pack_rows(qkv),
                             code[qw.fmt], bqkv, self._pack_rows(d["o_proj"]), code[qw.fmt],
                             EMPTY if ly.bo is None else ly.bo.float().contiguous(), int(ly.window or 0))
            gu = QTensor.cat([d["gate_proj"], d["up_proj"]])
            self._gu.append(self._pack_rows(gu))
        self.capacity = 0
        self.kv_dtype = kv_dtype
        self.kind: list[str] = []
        self.sync_mlps()

    # -- layouts ----------------------------------------------------------------------------------
    def _pack_rows(self, qt: QTensor) -> torch.Tensor:
        qs, d, m = _planes(qt)
        return self.k.pack_rows(qs, d, m, KERNEL_CODE[qt.fmt], qt.shape[1])

    def _cols_of(self, i: int, which: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input-major layout (``self.layout``: tcols or cols) of layer i's ``gu`` ([gate; up]) or ``down``
        weight (made once)."""
        key = (i, which, self.layout)
        if key not in self._cols:
            d = self.qw.layers[i]
            qt = QTensor.cat([d["gate_proj"], d["up_proj"]]) if which == "gu" else d["down_proj"]
            if self.layout == "tcols":
                qs, dd, m = _planes(self.qw.transposed(i, which))
                self._cols[key] = tuple(self.k.pack_tcols(qs, dd, m, KERNEL_CODE[qt.fmt], qt.shape[0]))
            else:
                qs, dd, m = _planes(qt)
                self._cols[key] = tuple(self.k.pack_cols(qs, dd, m, KERNEL_CODE[qt.fmt], qt.shape[1]))
        return self._cols[key]

    def _down_rows(self, i: int) -> torch.Tensor:
        if i not in self._rows:
            self._rows[i] = self._pack_rows(self.qw.layers[i]["down_proj"])
        return self._rows[i]

    # -- state ------------------------------------------------------------------------------------
    def set_capacity(self) -> None:
        """Caches and rope table for the decoder's capacity (contents kept)."""
        dec = self.dec
        cap = dec.capacity
        if cap == self.capacity:
            return
        self.c.set_rope(torch.view_as_real(dec.freqs).float().contiguous())
        old = getattr(self, "_caches", None)
        self._caches = []
        for i in range(len(dec.layers)):
            k = torch.zeros(dec.nkv, cap, dec.hd, dtype=self.kv_dtype)
            v = torch.zeros_like(k)
            if old is not None:
                n = old[i][0].shape[1]
                k[:, :n] = old[i][0]
                v[:, :n] = old[i][1]
            self._caches.append((k, v))
            self.c.set_cache(i, k, v)
        self.capacity = cap

    def sync_mlps(self) -> None:
        """Give every layer the kernel of the decoder's current MLP choice (None: dense)."""
        self.kind = []
        code = KERNEL_CODE
        self.layout = sparse_layout()
        lay = LAYOUTS[self.layout]
        for i, ly in enumerate(self.dec.layers):
            m = ly.mlp
            fmt = code[self.qw.fmt]
            kind, args = mlp_kind(m)
            if kind == "dense":
                self.c.mlp_dense(i, self._gu[i], self._down_rows(i), fmt, fmt)
            elif kind == "input":
                g, dn = self._cols_of(i, "gu"), self._cols_of(i, "down")
                self.c.mlp_input(i, *g, *dn, fmt, args["t_x"], args["t_h"], args["xs"], args["hs"], lay)
            else:
                dn = self._cols_of(i, "down")
                kc = {"cats": 2, "paper": 3, "fixed": 4}[kind]
                self.c.mlp_neuron(i, kc, self._gu[i], fmt, *dn, fmt, args.get("t_a", 0.0), args.get("t_g", 0.0),
                                  args.get("t_u", 0.0), args.get("t_d", 0.0), args.get("idx", EMPTY), lay)
            self.kind.append(kind)

    # -- compute ----------------------------------------------------------------------------------
    def step(self, token: int, pos: int) -> torch.Tensor:
        return self.c.step(int(token), int(pos))

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return self.c.prefill(ids.to(torch.long).contiguous(), 0)

    # -- bytes ------------------------------------------------------------------------------------
    def dense_bytes(self) -> dict[str, int]:
        b = self.qw.nbytes()
        return {"attn": b["attn"], "mlp": b["mlp"], "head": b["head"],
                "total": b["attn"] + b["mlp"] + b["head"]}

    def read_stats(self, steps: int) -> dict[str, float]:
        """Weight bytes one step read on average over ``steps`` steps counted since the caller's
        ``self.c.reset_counts()``: ``mlp_bytes``, ``mlp_fraction`` (of the dense MLP's bytes, block scales of
        the cols layout included), ``mlp_weight_fraction`` (of the MLP's weights), ``total_bytes`` (attention,
        MLP, LM head)."""
        cnt = self.c.counts().double()
        f = get_format(self.qw.fmt)
        H, F = self.H, self.F
        qb = f.quant_bytes / 32.0  # quant bytes per weight
        sb = f.block_bytes - f.quant_bytes  # scale (+ min) bytes per block
        row_gu = H * qb + (H // 32) * sb  # one gate or up row (rows layout)
        gu_out, d_out = -(-2 * F // 64) * 64, -(-H // 64) * 64  # input-major layouts' outputs (padded to 64)
        tc = self.layout == "tcols"  # an active input reads its row's quants and its own Rp/32 scales
        mlp_b = mlp_w = 0.0
        for i, d in enumerate(self.qw.layers):
            kx, bx, kh, bh, gr, ur = cnt[i].tolist()
            if self.kind[i] == "dense":
                mlp_b += gr / F * sum(d[p].nbytes for p in MLP_PROJS)
                mlp_w += gr / F * 3 * H * F
                continue
            if self.kind[i] == "input":
                mlp_b += kx * gu_out * qb + (kx * gu_out / 32 if tc else bx * gu_out) * sb
                mlp_w += kx * 2 * F
            else:
                mlp_b += (gr + ur) * row_gu
                mlp_w += (gr + ur) * H
            mlp_b += kh * d_out * qb + (kh * d_out / 32 if tc else bh * d_out) * sb
            mlp_w += kh * H
        steps = max(1, steps)
        dense = self.dense_bytes()
        mlp_b, mlp_w = mlp_b / steps, mlp_w / steps
        return {"mlp_bytes": mlp_b, "mlp_fraction": mlp_b / dense["mlp"],
                "mlp_weight_fraction": mlp_w / (3 * H * F * len(self.qw.layers)),
                "total_bytes": dense["attn"] + dense["head"] + mlp_b}


def mlp_kind(m: Optional[nn.Module]) -> tuple[str, dict]:
    """The quantised kernel of a layer's MLP choice: ``("dense"|"input"|"cats"|"paper"|"fixed", args)``;
    a module without one raises :class:`QuantDecodeError`."""
    if m is None:
        return "dense", {}
    name = type(m).__name__
    base = getattr(m, "base", None)
    if base is not None and hasattr(base, "act_fn") and not is_silu(base.act_fn):
        raise QuantDecodeError(f"{name}: activation is not SiLU (the quantised kernels implement SwiGLU)")
    for p in MLP_PROJS:
        lin = getattr(base, p, None) if base is not None else None
        if lin is not None and getattr(lin, "bias", None) is not None:
            raise QuantDecodeError(f"{name}: MLP biases are not supported by the quantised kernels")
    if isinstance(m, InputSparseMLP):
        if m.rotation is not None:
            raise QuantDecodeError("larosa: no quantised decode kernel (its rotated weights would need requantising)")
        f32 = lambda t: EMPTY if t is None else t.detach().float().contiguous().view(-1)  # noqa: E731
        return "input", {"t_x": m.t_x, "t_h": m.t_h, "xs": f32(m.x_scale), "hs": f32(m.h_scale)}
    if isinstance(m, CatsMLP):
        return "cats", {"t_a": m.t}
    if type(m) is SparseMLP:
        if m._codebooks:
            raise QuantDecodeError("SparseMLP with centroid codebooks: no quantised decode kernel")
        t = m.thresholds
        return "paper", {"t_g": t["gate_proj"], "t_u": t["up_proj"], "t_d": t["down_proj"]}
    if isinstance(m, GatheredSparseMLP):
        if not isinstance(m._fixed, PreparedIndices) or m.bias_down is not None:
            raise QuantDecodeError("gathered MLP: only a fixed neuron set (set_active) has a quantised kernel")
        return "fixed", {"idx": m._fixed.idx.detach().to(torch.long).contiguous(), "t_g": m.thresholds["gate_proj"],
                         "t_u": m.thresholds["up_proj"]}
    raise QuantDecodeError(f"{name}: no quantised decode kernel (dense, TEAL, WINA, CATS, paper and gathered have one)")
