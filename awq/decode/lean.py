"""Lean batch-1 greedy decoding for HF Llama / Qwen2 / Mistral models (the gpt-fast shape).

:class:`LeanDecoder` reads the weights of a loaded Hugging Face causal LM once and runs generation
without the framework around it: a static KV cache (``[kv_heads, capacity, head_dim]`` per layer,
grown only when a longer run asks for it), the rotary table precomputed from the model's own
rotary module (so ``rope_theta``, ``rope_scaling`` and the attention scaling are the model's), and a
per-token step of about 18 tensor ops per layer (or two C++ calls, below):

* RMSNorm: ``F.rms_norm`` at prefill; at decode one dot product and two multiplies (``F.rms_norm``
  decomposes into ~10 ops on the CPU).
* q, k, v: one GEMV over the concatenated ``[q; k; v]`` weight (+ the concatenated biases of Qwen2).
  The rows of q and k are permuted within each head to the interleaved pair order (what llama.cpp
  does), so RoPE is one complex multiply; ``q . k`` is unchanged by the same permutation on both
  sides.  The softmax scale ``head_dim ** -0.5`` is folded into the q rows.
* GQA attention over the cache: ``q [kv, group, hd] @ K[:, :L]^T``, softmax, ``@ V[:, :L]``
  (no key/value repetition); Mistral/Qwen2 sliding windows are honoured.
* MLP: dense SwiGLU with one GEMV over ``[gate; up]`` and one over ``down``, **or the layer's
  swapped module** (anything ``awq.methods.base.sparsify_`` installed, e.g.
  :class:`awq.methods.gathered.GatheredSparseMLP` or a method of ``awq/methods/``), called on the
  ``[1, H]`` normed input at decode and on ``[1, T, H]`` at prefill.  A module with a
  ``prepare_decode()`` (the frontier's TEAL/WINA/LaRoSA/CATS/neuron-predictor modules) has it called
  here, so its decode steps run the batch-1 kernels of :mod:`awq.methods.dynamic_sparse`.  The choice is read from
  ``layer.mlp`` when the decoder is built; call :meth:`LeanDecoder.refresh_mlps` after re-sparsifying.

One-row products at decode (q/k/v, o, the dense MLP, the LM head) use torch's ``F.linear`` or the
C++ ``dense_gemv`` of ``csrc/sparse_mlp.cpp`` (four rows per pass over x, AVX-512 or AVX2), per weight
shape whichever :func:`awq.kernels.hw.choose` measured faster on this machine and thread count (cached in
the project cache, logged); ``LeanDecoder(gemv="torch"|"cpp")`` or ``AWQ_DECODE_GEMV`` overrides.

Where the C++ GEMV is the choice for the attention weights, a decode step runs each layer's attention
block as **one C++ call** (``attn_step`` of ``csrc/decode_step.cpp``: norm, q/k/v, RoPE, cache write,
GQA attention, o, residual, the MLP's norm) and the dense MLP as another (``dense_swiglu``), instead of
~20 eager ops per layer: on SmolLM2-135M (2 threads) that is most of the gap to llama.cpp
(``bench/bench_decode.py``).  A swapped MLP module is still called from Python on the normed row.
``LeanDecoder(fused=False)`` or ``AWQ_DECODE_FUSED=0`` keeps the eager step.

``LeanDecoder(weights="q8_0"|"q4_0"|"q4_1")`` runs every linear layer of a step on ggml's block-quantised weights
instead (one C++ call per token, prefill token by token; :mod:`awq.decode.quant`, docs/kernels.md).

The prompt is prefilled in one batched pass (``scaled_dot_product_attention``, causal, GQA).
Greedy tokens equal ``model.generate(do_sample=False)`` (tests/test_decode.py: tiny random Llama,
Qwen2, Mistral and the real default model); logits agree to float tolerance, not bit for bit
(fused GEMVs and the folded scale change the rounding order).

The decoder copies the attention and dense MLP weights once (fused/permuted; for SmolLM2-135M fp32
about 0.4 GB); embeddings, norms and the LM head are shared with the model.  ``torch.compile`` is
not used: the step is memory bound (each weight is read once per token by one GEMV) and the eager
overhead is ~20 small ops per layer; compiling was not measured to help (not tried on the shared
2-core machine, where a compile takes minutes).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from awq.decode.quant import QuantStep, model_qweights
from awq.kernels import hw
from awq.kernels.mlp import EMPTY, cpp_kernel, is_silu, min_bytes_per_thread
from awq.load.arch import decoder_layers, is_swapped, rope_pair_perm
from awq.load.quant_formats import WEIGHT_FORMATS
from awq.methods.base import SwappedMLP, base_mlp
from awq.methods.dynamic_sparse import bias_of as _bias
from awq.util import env

log = logging.getLogger(__name__)

SUPPORTED_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")
GEMVS: tuple[str, ...] = ("auto", "torch", "cpp")
WEIGHTS: tuple[str, ...] = WEIGHT_FORMATS  # f32: the model's weights; else awq.decode.quant
_DENSE_ATTRS = ("gate_proj", "up_proj", "down_proj", "act_fn")


class DecodeError(ValueError):
    """The model cannot be run by the lean decoder (one-line message)."""


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    wqkv: torch.Tensor
    bqkv: Optional[torch.Tensor]
    wo: torch.Tensor
    bo: Optional[torch.Tensor]
    mlp: Optional[nn.Module] = None  # a swapped module, or None: dense fast path below
    wgu: Optional[torch.Tensor] = None
    bgu: Optional[torch.Tensor] = None
    wd: Optional[torch.Tensor] = None
    bd: Optional[torch.Tensor] = None
    act: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    window: Optional[int] = None
    dense_src: Optional[nn.Module] = None  # the MLP the fused dense weights were made from
    k: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    v: torch.Tensor = field(default_factory=lambda: torch.empty(0))


@dataclass
class DecodeStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0  # one-token forward passes after the prefill
    decode_s: float = 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


def _cat_bias(lins: Sequence[nn.Module], sizes: Sequence[int], like: torch.Tensor) -> Optional[torch.Tensor]:
    bs = [_bias(lin) for lin in lins]
    if all(b is None for b in bs):
        return None
    return torch.cat([b if b is not None else like.new_zeros(n) for b, n in zip(bs, sizes)]).contiguous()


def _act(mlp: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return F.silu if is_silu(mlp.act_fn) else mlp.act_fn  # F.silu: skip the module call


def _prepared(mlp: nn.Module) -> nn.Module:
    """A swapped MLP with its batch-1 kernel made, if it has one (``awq.methods.dynamic_sparse``)."""
    if isinstance(mlp, SwappedMLP):
        mlp.prepare_decode()
    return mlp


class LeanDecoder:
    """Batch-1 greedy decoder over the weights of ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, capacity: int = 512, gemv: Optional[str] = None,
                 fused: Optional[bool] = None, weights: str = "f32", head_weights: Optional[str] = None,
                 weights_gguf=None) -> None:
        if str(weights).lower() not in WEIGHTS:
            raise DecodeError(f"weights must be one of {', '.join(WEIGHTS)}, got '{weights}'")
        self.gemv = (gemv or env.get("AWQ_DECODE_GEMV")).lower()
        if self.gemv not in GEMVS:
            raise DecodeError(f"gemv must be one of {', '.join(GEMVS)}, got '{self.gemv}'")
        if fused is None:
            fused = env.get("AWQ_DECODE_FUSED")
        self._want_fused = bool(fused)
        cfg = model.config
        mtype = getattr(cfg, "model_type", "?")
        if mtype not in SUPPORTED_TYPES:
            raise DecodeError(f"lean decoder supports {', '.join(SUPPORTED_TYPES)} models, not '{mtype}'")
        inner = model.model
        self.model = model
        self.H = int(cfg.hidden_size)
        self.nh = int(cfg.num_attention_heads)
        self.nkv = int(getattr(cfg, "num_key_value_heads", None) or self.nh)
        self.hd = int(getattr(cfg, "head_dim", None) or self.H // self.nh)
        self.eps = float(cfg.rms_norm_eps)
        self.max_pos = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.embed = inner.embed_tokens.weight.detach()
        self.norm = inner.norm.weight.detach()
        self.lm_head = model.lm_head.weight.detach()
        self._rotary = inner.rotary_emb
        self.layers: list[_Layer] = []
        perm_q, perm_k = rope_pair_perm(self.nh, self.hd), rope_pair_perm(self.nkv, self.hd)
        scale = self.hd ** -0.5
        with torch.no_grad():
            for layer in decoder_layers(model):
                at = layer.self_attn
                wq = at.q_proj.weight.detach()[perm_q] * scale
                wk = at.k_proj.weight.detach()[perm_k]
                wqkv = torch.cat([wq, wk, at.v_proj.weight.detach()]).contiguous()
                sizes = (self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd)
                bqkv = _cat_bias((at.q_proj, at.k_proj, at.v_proj), sizes, wqkv)
                if bqkv is not None:
                    q_end, k_end = sizes[0], sizes[0] + sizes[1]
                    bqkv = torch.cat([bqkv[:q_end][perm_q] * scale, bqkv[q_end:k_end][perm_k], bqkv[k_end:]])
                window = getattr(at, "sliding_window", None)
                if window is None and mtype == "mistral":
                    window = getattr(cfg, "sliding_window", None)
                self.layers.append(_Layer(
                    ln1=layer.input_layernorm.weight.detach(), ln2=layer.post_attention_layernorm.weight.detach(),
                    wqkv=wqkv, bqkv=bqkv, wo=at.o_proj.weight.detach(), bo=_bias(at.o_proj),
                    window=int(window) if window else None))
        self.refresh_mlps()
        self._pick_gemvs()
        self._pick_fused()
        self._zero = torch.zeros(1, self.H, dtype=self.dtype, device=self.device)
        self.capacity = 0
        self.weights = str(weights).lower()
        self._q = None  # awq.decode.quant.QuantStep: every linear of a step on block-quantised weights
        if self.weights != "f32":
            self._q = QuantStep(self, model_qweights(model, self.weights, head_weights, weights_gguf))
            for ly in self.layers:  # the fp32 copies are not used by the quantised step
                ly.wqkv = ly.wo = EMPTY
                ly.wgu = ly.wd = None
        self._ensure(capacity)
        self.pos = 0
        self.stats = DecodeStats()

    # -- setup ---------------------------------------------------------------------------------
    def refresh_mlps(self) -> None:
        """Re-read every layer's MLP: a swapped module (or any module without plain projections) is
        called as is; a plain SwiGLU MLP runs on the fused dense path.  The fused dense weights are
        made once per original MLP (from ``base_mlp``) and kept, so :meth:`set_mlps` can switch back."""
        with torch.no_grad():
            for ly, layer in zip(self.layers, decoder_layers(self.model)):
                mlp = layer.mlp
                base = base_mlp(mlp)
                if all(hasattr(base, a) for a in _DENSE_ATTRS) and ly.dense_src is not base:
                    wg, wu = base.gate_proj.weight.detach(), base.up_proj.weight.detach()
                    ly.wgu = torch.cat([wg, wu]).contiguous()
                    ly.bgu = _cat_bias((base.gate_proj, base.up_proj), (wg.shape[0], wu.shape[0]), ly.wgu)
                    ly.wd, ly.bd = base.down_proj.weight.detach(), _bias(base.down_proj)
                    ly.act, ly.dense_src = _act(base), base
                plain = not is_swapped(mlp) and all(hasattr(mlp, a) for a in _DENSE_ATTRS)
                quant = getattr(self, "_q", None) is not None  # its own kernels: no fp32 batch-1 kernel needed
                ly.mlp = None if plain else (mlp if quant else _prepared(mlp))
        if getattr(self, "_q", None) is not None:
            self._q.sync_mlps()

    def set_mlps(self, mlps: Optional[Sequence[Optional[nn.Module]]]) -> None:
        """Run these per-layer MLP modules (``None`` or a ``None`` entry: the fused dense MLP) without
        touching the model; e.g. dense and sparse timed in turn on one decoder."""
        if mlps is not None and len(mlps) != len(self.layers):
            raise DecodeError(f"{len(mlps)} MLP modules for {len(self.layers)} layers")
        for i, ly in enumerate(self.layers):
            m = None if mlps is None else mlps[i]
            if m is None and ly.wgu is None and self._q is None:
                raise DecodeError(f"layer {i} has no dense MLP weights (its module keeps no original projections)")
            ly.mlp = None if m is None else (m if self._q is not None else _prepared(m))
        if self._q is not None:
            self._q.sync_mlps()

    def _ensure(self, n: int) -> None:
        """Make the KV cache and the rotary table hold ``n`` positions (kept contents)."""
        if n <= self.capacity:
            return
        if self.max_pos and n > self.max_pos:
            raise DecodeError(f"{n} positions asked, the model supports {self.max_pos}")
        cap = max(n, 2 * self.capacity)
        if self.max_pos:
            cap = min(cap, self.max_pos)
        with torch.no_grad():
            pos = torch.arange(cap, device=self.device)[None]
            dummy = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = self._rotary(dummy, pos)  # [1, cap, hd], the model's rope (theta, scaling, attention scale)
            half = self.hd // 2
            self.freqs = torch.complex(cos[0, :, :half].float(), sin[0, :, :half].float()).contiguous()
            for ly in self.layers:
                k = torch.zeros(self.nkv, cap, self.hd, dtype=self.dtype, device=self.device)
                v = torch.zeros_like(k)
                if self.capacity:
                    k[:, :self.capacity] = ly.k
                    v[:, :self.capacity] = ly.v
                ly.k, ly.v = k, v
        self.capacity = cap
        if getattr(self, "_q", None) is not None:
            self._q.set_capacity()

    # -- compute -------------------------------------------------------------------------------
    def _rope(self, qk: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """qk [..., heads, hd] (interleaved pairs) times e^{i theta} -> same shape, new tensor."""
        c = torch.view_as_complex(qk.float().reshape(*qk.shape[:-1], self.hd // 2, 2))
        return torch.view_as_real(c * freqs).reshape(qk.shape).to(qk.dtype)

    def _rms1(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """RMSNorm of one row [1, H] in 3 cheap ops (``F.rms_norm`` is not fused on the CPU: ~10 ops)."""
        v = h.view(-1)
        s = 1.0 / math.sqrt(float(torch.dot(v, v)) / self.H + self.eps)
        return torch.addcmul(self._zero, h, w, value=s)  # 0 + s * h * w: a Scalar argument, no scalar tensor

    def _pick_gemvs(self) -> None:
        """For each weight shape of a decode step, the one-row product to use: torch's ``F.linear`` or
        the C++ ``dense_gemv`` (``csrc/sparse_mlp.cpp``); ``gemv="auto"`` asks :func:`awq.kernels.hw.choose`
        (a short timing, cached per machine and thread count, logged)."""
        self._cpp_gemv: dict = {}
        mats = [self.lm_head] + [w for ly in self.layers for w in (ly.wqkv, ly.wo, ly.wgu, ly.wd) if w is not None]
        kern = None
        if self.gemv != "torch" and self.dtype == torch.float32 and self.device.type == "cpu":
            kern = cpp_kernel()
            if kern is None and self.gemv == "cpp":
                raise DecodeError("gemv='cpp' asked but the C++ kernel is unavailable")
        self._kern = kern
        for w in mats:
            key = tuple(w.shape)
            if key in self._cpp_gemv:
                continue
            if kern is None or not w.is_contiguous():
                self._cpp_gemv[key] = False
            elif self.gemv == "cpp":
                self._cpp_gemv[key] = True
            else:
                x = torch.randn(1, w.shape[1])
                x1 = x.view(-1)
                reps = range(max(1, (8 << 20) // (w.numel() * w.element_size())))  # >= ~8 MB per timed call

                def probes(w=w, x=x, x1=x1, reps=reps):
                    return {"torch": lambda: [F.linear(x, w) for _ in reps],
                            "cpp": lambda: [kern.dense_gemv(x1, w, min_bytes_per_thread()) for _ in reps]}
                self._cpp_gemv[key] = hw.choose(f"decode_gemv_{key[0]}x{key[1]}", ("torch", "cpp"), probes) == "cpp"

    def _pick_fused(self) -> None:
        """Use the C++ layer step (``attn_step`` / ``dense_swiglu`` of ``csrc/decode_step.cpp``) where the
        C++ GEMV was chosen for the attention (and, for the dense MLP, the MLP) weight shapes: the
        fused step runs the same GEMV, without ~20 eager ops per layer around it."""
        k, ly0 = self._kern, self.layers[0] if self.layers else None
        ok = (self._want_fused and k is not None and hasattr(k, "attn_step") and ly0 is not None
              and self._cpp_gemv.get(tuple(ly0.wqkv.shape)) and self._cpp_gemv.get(tuple(ly0.wo.shape)))
        self.fused_attn = bool(ok)
        self.fused_mlp = bool(ok and ly0.wgu is not None and ly0.act is F.silu
                              and self._cpp_gemv.get(tuple(ly0.wgu.shape)) and self._cpp_gemv.get(tuple(ly0.wd.shape)))
        log.info("lean decoder step: %s attention, %s dense MLP", "C++ fused" if self.fused_attn else "eager",
                 "C++ fused" if self.fused_mlp else "eager")

    def _lin(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        """``F.linear(x, w, b)``; one row by the chosen GEMV (see :meth:`_pick_gemvs`)."""
        if x.shape[0] == 1 and x.dim() == 2 and self._cpp_gemv.get(tuple(w.shape)):
            y = self._kern.dense_gemv(x.reshape(-1), w, min_bytes_per_thread()).view(1, -1)
            return y if b is None else y + b
        return F.linear(x, w, b)

    def _mlp(self, ly: _Layer, n: torch.Tensor) -> torch.Tensor:
        if ly.mlp is not None:
            return ly.mlp(n)
        gu = self._lin(n, ly.wgu, ly.bgu)
        f = gu.shape[-1] // 2
        return self._lin(ly.act(gu[..., :f]) * gu[..., f:], ly.wd, ly.bd)

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Run the prompt from position 0 (resets the cache); returns the last position's logits [V]."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        T = ids.numel()
        if T == 0:
            raise DecodeError("empty prompt")
        self._ensure(T)
        if self._q is not None:  # token by token through the quantised step (its own cache)
            logits = self._q.prefill(ids)
            self.pos = T
            return logits
        nh, nkv, hd, H = self.nh, self.nkv, self.hd, self.H
        qk_end = (nh + nkv) * hd
        fr = self.freqs[:T, None, :]
        h = self.embed[ids]
        for ly in self.layers:
            n = F.rms_norm(h, (H,), ly.ln1, self.eps)
            qkv = F.linear(n, ly.wqkv, ly.bqkv)
            qk = self._rope(qkv[:, :qk_end].reshape(T, nh + nkv, hd), fr)
            q = qk[:, :nh].transpose(0, 1)
            k = qk[:, nh:].transpose(0, 1)
            v = qkv[:, qk_end:].reshape(T, nkv, hd).transpose(0, 1)
            ly.k[:, :T] = k
            ly.v[:, :T] = v
            mask = None
            if ly.window is not None and T > ly.window:
                i = torch.arange(T, device=self.device)
                mask = (i[None] <= i[:, None]) & (i[None] > i[:, None] - ly.window)
            a = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None,
                                               scale=1.0, enable_gqa=nkv != nh)
            h = h + F.linear(a[0].transpose(0, 1).reshape(T, nh * hd), ly.wo, ly.bo)
            n = F.rms_norm(h, (H,), ly.ln2, self.eps)
            h = h + (self._mlp(ly, n) if ly.mlp is None else ly.mlp(n[None]).reshape(T, H))
        self.pos = T
        return F.linear(F.rms_norm(h[-1:], (H,), self.norm, self.eps), self.lm_head)[0]

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Append one token at the current position; returns the next-token logits [V]."""
        p = self.pos
        if p == 0:
            raise DecodeError("call prefill() before step()")
        self._ensure(p + 1)
        if self._q is not None:
            logits = self._q.step(token, p)
            self.pos = p + 1
            return logits
        h = self.embed[token:token + 1].clone()
        if self.fused_attn:
            return self._fused_step(h, p)
        nh, nkv, hd = self.nh, self.nkv, self.hd
        g, qk_end = nh // nkv, (nh + nkv) * hd
        fr = self.freqs[p]
        L = p + 1
        for ly in self.layers:
            n = self._rms1(h, ly.ln1)
            qkv = self._lin(n, ly.wqkv, ly.bqkv)[0]
            qk = self._rope(qkv[:qk_end].view(nh + nkv, hd), fr)
            ly.k[:, p] = qk[nh:]
            ly.v[:, p] = qkv[qk_end:].view(nkv, hd)
            lo = 0 if ly.window is None else max(0, L - ly.window)
            s = torch.bmm(qk[:nh].view(nkv, g, hd), ly.k[:, lo:L].transpose(1, 2))
            a = torch.bmm(torch.softmax(s, dim=-1), ly.v[:, lo:L])
            h.add_(self._lin(a.view(1, nh * hd), ly.wo, ly.bo))
            h.add_(self._mlp(ly, self._rms1(h, ly.ln2)))
        self.pos = L
        return self._lin(self._rms1(h, self.norm), self.lm_head, None)[0]

    def _fused_step(self, h: torch.Tensor, p: int) -> torch.Tensor:
        """:meth:`step` by the C++ layer step: one ``attn_step`` per layer (norm, q/k/v, RoPE, cache,
        attention, o, residual, norm), then the dense ``dense_swiglu`` or the layer's swapped module."""
        k, e, mb = self._kern, EMPTY, min_bytes_per_thread()
        rope = torch.view_as_real(self.freqs[p]).contiguous()
        L = p + 1
        for ly in self.layers:
            lo = 0 if ly.window is None else max(0, L - ly.window)
            n = k.attn_step(h, ly.ln1, ly.ln2, self.eps, ly.wqkv, e if ly.bqkv is None else ly.bqkv, ly.wo,
                            e if ly.bo is None else ly.bo, ly.k, ly.v, p, lo, rope, self.nh, self.nkv, mb)
            if ly.mlp is None and self.fused_mlp:
                h.add_(k.dense_swiglu(n, ly.wgu, e if ly.bgu is None else ly.bgu, ly.wd,
                                      e if ly.bd is None else ly.bd, mb))
            else:
                h.add_(self._mlp(ly, n))
        self.pos = L
        return self._lin(self._rms1(h, self.norm), self.lm_head, None)[0]

    def generate(self, ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
                 eos_token_id: Optional[int | Sequence[int]] = None) -> list[int]:
        """Greedy continuation of ``ids`` (new tokens only; stops after an EOS token, which is kept,
        like ``model.generate``).  Timings go to ``self.stats``."""
        if max_new_tokens < 1:
            raise DecodeError("max_new_tokens must be >= 1")
        eos = set() if eos_token_id is None else {int(eos_token_id)} if isinstance(eos_token_id, int) \
            else {int(e) for e in eos_token_id}
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        self._ensure(ids.numel() + max_new_tokens)
        st = DecodeStats(prompt_tokens=ids.numel())
        t0 = time.perf_counter()
        logits = self.prefill(ids)
        st.prefill_s = time.perf_counter() - t0
        out: list[int] = []
        t0 = time.perf_counter()
        while True:
            tok = int(torch.argmax(logits))
            out.append(tok)
            if tok in eos or len(out) >= max_new_tokens:
                break
            logits = self.step(tok)
            st.decode_steps += 1
        st.decode_s = time.perf_counter() - t0
        st.new_tokens = len(out)
        self.stats = st
        return out
