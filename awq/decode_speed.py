"""Decode speed of the lean decoder: interleaved timed runs, weight bytes per token, frontier points.

* :func:`read_bytes`: weight bytes one decoded token reads (every matrix once; the input embedding
  is one row, unless tied to the LM head) and the MLP's part of it.
* :func:`timed_runs`: decode tok/s of several MLP settings of one :class:`LeanDecoder`, repeats
  interleaved (mode A, mode B, A, B, ... so background load hits all alike).
* :func:`measure_point`: what ``awq.frontier --speed`` adds to a point: the sparsified model's decode
  tok/s beside the same model's dense MLPs, the speedup and its roofline (weight bytes).  Only
  modules with a batch-1 kernel (a ``prepare_decode()`` that returns True) are timed: a point whose
  modules have none gets ``decode_status`` "no batch-1 kernel (...)" and its roofline, no speed (its
  masked dense path at batch 1 is not the method's speed).
"""
from __future__ import annotations

import contextlib
import logging
import statistics
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from awq.decode import LeanDecoder
from awq.sparsify import base_mlp, decoder_layers, is_swapped

log = logging.getLogger(__name__)

PROMPT_TEXT = ("The history of the city begins with a small settlement on the river, where traders met to "
               "exchange grain, salt and cloth. Over the centuries it grew into a market town, then a port. ")


def read_bytes(model: nn.Module) -> dict[str, int]:
    """``{"total": bytes, "mlp": bytes}`` of weights read per decoded token (dense)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is None or out.weight.data_ptr() != emb.data_ptr():
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    mlp = 0
    for layer in decoder_layers(model):
        b = base_mlp(layer.mlp)
        mlp += sum(getattr(b, p).weight.numel() * getattr(b, p).weight.element_size()
                   for p in ("gate_proj", "up_proj", "down_proj") if hasattr(b, p))
    return {"total": int(total), "mlp": int(mlp)}


def roofline(model: nn.Module, mlp_read_fraction: float) -> float:
    """Dense bytes / sparse bytes per token when the MLPs read ``mlp_read_fraction`` of their weights."""
    b = read_bytes(model)
    return b["total"] / (b["total"] - b["mlp"] * (1.0 - mlp_read_fraction))


def extra_bytes(mlps: Optional[Sequence[Optional[nn.Module]]]) -> int:
    """Weight bytes per token the MLP modules read besides the MLPs' (predictors, rotations)."""
    return sum(int(getattr(m, "extra_bytes", 0)) for m in (mlps or []) if m is not None)


@torch.inference_mode()
def decode_read_fraction(dec: LeanDecoder, ids: torch.Tensor, new_tokens: int,
                         mlps: Optional[Sequence[Optional[nn.Module]]]) -> Optional[float]:
    """Metered MLP weight-read fraction of the *decode* steps (prefill excluded) of ``mlps`` on
    ``dec`` (None when no module is metered), from the masks the modules actually apply."""
    from awq.cost import ReadMeter, mlp_weight_sizes
    from awq.sparsify import SwappedMLP

    mods = [m for m in (mlps or []) if isinstance(m, SwappedMLP)]
    if not mods:
        return None
    base = base_mlp(mods[0])
    meter = ReadMeter(len(dec.layers), mlp_weight_sizes(base))
    dec.set_mlps(mlps)
    logits = dec.prefill(ids)
    for m in mods:
        m.read_meter = meter
    try:
        for _ in range(new_tokens - 1):
            logits = dec.step(int(torch.argmax(logits)))
    finally:
        for m in mods:
            m.read_meter = None
    return meter.weight_read_fraction()


def prompt_ids(tok, n: int) -> torch.Tensor:
    """A fixed ``n``-token English prompt (the text repeated as needed)."""
    text = PROMPT_TEXT
    ids = tok(text, add_special_tokens=False).input_ids
    while len(ids) < n:
        text += PROMPT_TEXT
        ids = tok(text, add_special_tokens=False).input_ids
    return torch.tensor(ids[:n], dtype=torch.long)


def timed_runs(dec: LeanDecoder, ids: torch.Tensor, new_tokens: int,
               modes: Mapping[str, Optional[Sequence[Optional[nn.Module]]]], repeats: int = 3,
               warmup: int = 1) -> dict[str, dict]:
    """``{mode: {"tok_s": [per repeat], "median": m, "tokens": last run's tokens}}``; ``modes`` maps a
    name to :meth:`LeanDecoder.set_mlps` modules (None: dense).  Runs never stop at EOS."""
    res: dict[str, dict] = {k: {"tok_s": [], "tokens": None} for k in modes}
    for r in range(warmup + repeats):
        for name, mlps in modes.items():
            dec.set_mlps(mlps)
            toks = dec.generate(ids, new_tokens)
            if r >= warmup:
                res[name]["tok_s"].append(dec.stats.decode_tok_s)
                res[name]["tokens"] = toks
    for v in res.values():
        v["median"] = statistics.median(v["tok_s"])
    return res


NO_KERNEL = "no batch-1 kernel"


def class_path(obj) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def missing_kernel(mlps: Sequence[Optional[nn.Module]]) -> Optional[tuple[str, str]]:
    """``(status, module class path)`` for the first swapped module without a batch-1 kernel (its
    ``prepare_decode()`` is called here; LeanDecoder calls it again, a no-op), or None when all have one."""
    for m in mlps:
        if m is None:
            continue
        fn = getattr(m, "prepare_decode", None)
        name = type(m).__name__
        if not callable(fn):
            return f"{NO_KERNEL} ({name} has no prepare_decode)", class_path(m)
        if not fn():
            why_fn = getattr(m, "decode_unsupported", None)
            why = why_fn() if callable(why_fn) else None
            if why is None:  # the shared reason of the dynamic kernels (e.g. "activation is not SiLU")
                from awq.dynamic_sparse import unsupported

                with contextlib.suppress(AttributeError):
                    why = unsupported(base_mlp(m))
            return f"{NO_KERNEL} ({name}: {why or 'prepare_decode() declined, see the log'})", class_path(m)
    return None


def measure_point(model: nn.Module, tok, point: Optional[dict] = None, prompt_tokens: int = 128,
                  new_tokens: int = 32, repeats: int = 3) -> dict:
    """Decode speed of ``model`` as sparsified now against its own dense MLPs (same decoder, interleaved).

    Returns ``decode_tok_s``, ``dense_decode_tok_s``, ``decode_speedup``, ``decode_weight_read_fraction``
    (metered on the decode steps, predictor/rotation bytes added) and ``roofline`` from it.  Modules
    without a batch-1 kernel are not timed: ``decode_status`` "no batch-1 kernel (...)", speeds None,
    ``decode_module`` the class lacking it (``awq.frontier`` retries once that class has a kernel)."""
    sparse = [layer.mlp if is_swapped(layer.mlp) else None for layer in decoder_layers(model)]
    missing = missing_kernel(sparse)
    dec = LeanDecoder(model, capacity=prompt_tokens + new_tokens)
    ids = prompt_ids(tok, prompt_tokens)
    if missing is not None:
        frac = decode_read_fraction(dec, ids, new_tokens, sparse)
        if frac is not None:
            frac += extra_bytes(sparse) / read_bytes(model)["mlp"]
        log.warning("decode: %s: not timed", missing[0])
        return {"decode_tok_s": None, "dense_decode_tok_s": None, "decode_speedup": None,
                "decode_weight_read_fraction": frac, "roofline": roofline(model, float(frac)) if frac is not None
                else None, "decode_status": missing[0], "decode_module": missing[1],
                "decode_threads": torch.get_num_threads(), "decode_prompt_tokens": prompt_tokens,
                "decode_new_tokens": new_tokens}
    r = timed_runs(dec, ids, new_tokens, {"dense": None, "sparse": sparse}, repeats)
    # the roofline uses what the decode steps read (metered on this prompt, plus predictor/rotation
    # bytes); without a meter (no swapped module), the point's evaluation read fraction
    frac = decode_read_fraction(dec, ids, new_tokens, sparse)
    if frac is not None:
        frac += extra_bytes(sparse) / read_bytes(model)["mlp"]
    else:
        frac = (point or {}).get("weight_read_fraction")
    out = {"decode_tok_s": r["sparse"]["median"], "dense_decode_tok_s": r["dense"]["median"],
           "decode_speedup": r["sparse"]["median"] / r["dense"]["median"],
           "decode_weight_read_fraction": frac,
           "roofline": roofline(model, float(frac)) if frac is not None else None,
           "decode_threads": torch.get_num_threads(), "decode_prompt_tokens": prompt_tokens,
           "decode_new_tokens": new_tokens, "decode_status": None, "decode_module": None}
    if out["roofline"] is not None and out["decode_speedup"] > out["roofline"]:
        # above the bound set by the bytes read: a measurement error (load changed between runs), not a result
        log.warning("decode: measured %.2fx is ABOVE its roofline %.2fx: measurement error, not recorded",
                    out["decode_speedup"], out["roofline"])
        out["decode_measured_ratio"], out["decode_speedup"] = out["decode_speedup"], None
        out["decode_status"] = "above roofline: measurement error"
        return out
    log.info("decode: %.2f tok/s vs dense %.2f tok/s (%.2fx, roofline %s)", out["decode_tok_s"],
             out["dense_decode_tok_s"], out["decode_speedup"],
             "n/a" if out["roofline"] is None else f"{out['roofline']:.2f}x")
    return out
