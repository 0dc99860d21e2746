"""Batch-1 decode latency: dense vs gathered sparse MLP (one MLP block and a whole next-token step).

For each shape set and centroid density it prints one line such as::

    mistral-7b density=50% mlp 2.05x step 1.62x | mlp 27.10 -> 13.20 ms | step 1102.3 -> 680.4 ms ...

plus the roofline: weight (and KV) bytes read per token, dense vs sparse, the measured memory
bandwidth and the latency that bandwidth allows.

What is timed (random weights, random active sets of the given density, fixed per layer):
* mlp: one SwiGLU block, dense = the HF ``LlamaMLP`` (three ``nn.Linear``), sparse =
  :class:`awq.sparse_compute.GatheredSparseMLP` with the active indices set.  When one block fits
  in the last-level cache (SmolLM2: 10.6 MB fp32) several distinct blocks are called in turn and
  the time per block is reported, so that weights come from DRAM as in a real decode step.
* step: a random ``LlamaForCausalLM`` with the given shapes (attention + DynamicCache holding
  ``--ctx`` tokens, final norm, LM head), one decode step, dense MLPs vs sparse MLPs swapped in
  the same model.  Mistral-7B does not fit in fp32 in 24 GB, so ``--mistral_layers`` layers are
  built (default 4) and the full 32-layer step is extrapolated: t = t_head + 32/L * (t_L - t_head),
  with t_head (embedding + final norm + LM head) timed separately.  The predictor's cost is not
  included (it is < 5% of the MLP's FLOPs by design, issue 6).
Timings: ``torch.set_num_threads(--threads)``, warm-up, modes timed round-robin (so that
background load hits all alike), median of ``--repeats``.
"""
from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from awq.sparse_compute import GatheredSparseMLP, cpp_kernel_available

log = logging.getLogger("bench_sparse_mlp")


@dataclass(frozen=True)
class Shapes:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie: bool


SHAPES = {
    "smollm2-135m": Shapes(576, 1536, 30, 9, 3, 49152, True),
    "mistral-7b": Shapes(4096, 14336, 32, 32, 8, 32000, False),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn, calling them in turn; the minimum under key 'min:<name>'."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()} | {f"min:{k}": min(v) for k, v in times.items()}


def bandwidth_gbs(mb: int = 1024, repeats: int = 7) -> float:
    """Read bandwidth from summing a tensor much larger than the caches."""
    a = torch.ones(mb * 2**20 // 4)
    t = round_robin({"sum": lambda: a.sum()}, repeats)["sum"]
    return a.numel() * 4 / t / 1e9


def random_active(inter: int, density: float, gen: torch.Generator) -> torch.Tensor:
    k = int(round(density * inter))
    return torch.randperm(inter, generator=gen)[:k].sort().values


def make_config(s: Shapes, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=s.hidden, intermediate_size=s.inter, num_hidden_layers=layers,
                       num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                       tie_word_embeddings=s.tie, max_position_embeddings=4096, use_cache=True)


def bytes_per_token(s: Shapes, nbytes: int, ctx: int, active: float) -> dict[str, float]:
    """Bytes read per decode token: MLP weights (dense or `active` neurons), attention weights, KV cache, head."""
    hd = s.hidden // s.heads
    kv = s.kv_heads * hd
    attn = (2 * s.hidden * s.hidden + 2 * s.hidden * kv) * nbytes
    kvc = 2 * ctx * kv * nbytes
    mlp = 3 * s.hidden * active * nbytes
    head = s.vocab * s.hidden * nbytes
    return {"mlp": mlp, "step": s.layers * (attn + kvc + mlp) + head}


def per_density_modules(dense, densities, kernel, gen) -> dict[float, list[GatheredSparseMLP]]:
    """Sparse twins of the dense MLPs, one set per density, sharing one interleaved weight per layer;
    each has a fixed random active set (indices prepared once, as a per-centroid cache would)."""
    base = [GatheredSparseMLP.from_mlp(m, kernel=kernel) for m in dense]
    out = {}
    for d in densities:
        mods = []
        for b in base:
            m = GatheredSparseMLP(b.weight.data, b.act_fn, b.layer_idx, kernel=kernel)
            m.set_active(random_active(b.intermediate_size, d, gen))
            mods.append(m)
        out[d] = mods
    return out


@torch.no_grad()
def bench_mlp(s: Shapes, dtype: torch.dtype, densities: Sequence[float], repeats: int, kernel: str,
              gen: torch.Generator) -> dict[str, float]:
    from transformers.models.llama.modeling_llama import LlamaMLP

    block = 3 * s.hidden * s.inter * torch.finfo(dtype).bits // 8
    n = max(1, min(s.layers, math.ceil(256 * 2**20 / block)))  # enough distinct blocks to defeat the LLC
    cfg = make_config(s, 1)
    dense = [LlamaMLP(cfg).to(dtype).requires_grad_(False) for _ in range(n)]
    sparse = per_density_modules(dense, densities, kernel, gen)
    x = torch.randn(1, 1, s.hidden, generator=gen).to(dtype)

    def run_dense():
        for m in dense:
            m(x)

    def run_sparse(d):
        for m in sparse[d]:
            m(x)

    fns = {"dense": run_dense} | {f"{d}": (lambda d=d: run_sparse(d)) for d in densities}
    t = round_robin(fns, repeats)
    return {k: v / n for k, v in t.items()} | {"blocks": n}


@torch.no_grad()
def bench_step(s: Shapes, dtype: torch.dtype, densities: Sequence[float], repeats: int, kernel: str,
               gen: torch.Generator, build_layers: int, ctx: int) -> dict[str, float]:
    from transformers import DynamicCache, LlamaForCausalLM

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = LlamaForCausalLM(make_config(s, build_layers)).to(dtype).eval().requires_grad_(False)
    log.info("built %d-layer model in %.1f s", build_layers, time.perf_counter() - t0)
    layers = model.model.layers
    dense = [layer.mlp for layer in layers]
    sparse = per_density_modules(dense, densities, kernel, gen)
    # the KV cache of a ctx-token context: random keys/values (a prefill would cost minutes for 7B shapes
    # and gives a cache of the same size; the decode step's cost does not depend on the values)
    cache = DynamicCache()
    hd = s.hidden // s.heads
    for i in range(build_layers):
        kv = torch.randn(2, 1, s.kv_heads, ctx, hd, generator=gen).to(dtype)
        cache.update(kv[0], kv[1], i)
    tok = torch.randint(0, s.vocab, (1, 1), generator=gen)

    def step():
        model(tok, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # back to ctx tokens: every timed step sees the same context length

    def use_dense():
        for layer, m in zip(layers, dense):
            layer.mlp = m
        step()

    def use_sparse(d):
        for layer, m in zip(layers, sparse[d]):
            layer.mlp = m
        step()

    def head():
        h = model.model.embed_tokens(tok)
        model.lm_head(model.model.norm(h))

    use_dense()
    if cache.get_seq_length() != ctx:
        raise RuntimeError(f"KV cache holds {cache.get_seq_length()} tokens after a step, expected {ctx}")
    fns = {"dense": use_dense} | {f"{d}": (lambda d=d: use_sparse(d)) for d in densities} | {"head": head}
    t = round_robin(fns, repeats, warmup=1)
    del model, dense, sparse, cache
    gc.collect()
    if build_layers == s.layers:
        return t
    scale = s.layers / build_layers
    return {k: t[h] + scale * (v - t[h]) for k, v in t.items() if "head" not in k
            for h in ["min:head" if k.startswith("min:") else "head"]}


def main(shapes: Sequence[str], densities: Sequence[float], dtype: str = "fp32", threads: int = 2, ctx: int = 512,
         mistral_layers: int = 4, mlp_repeats: int = 21, step_repeats: int = 9, kernel: str = "auto",
         seed: int = 0) -> list[str]:
    unknown = [n for n in shapes if n not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shapes {unknown} (want some of {list(SHAPES)})")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype} (want one of {list(DTYPES)})")
    if not densities or any(not 0 < d <= 1 for d in densities):
        raise ValueError("densities must be in (0, 1]")
    torch.set_num_threads(threads)
    dt = DTYPES[dtype]
    nbytes = torch.finfo(dt).bits // 8
    gen = torch.Generator().manual_seed(seed)
    bw = bandwidth_gbs()
    kpath = "cpp" if (kernel != "torch" and cpp_kernel_available()) else "torch"
    print(f"# threads={threads} dtype={dtype} kernel={kpath} ctx={ctx} measured read bandwidth {bw:.1f} GB/s "
          f"(sum over a 1 GiB tensor); load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")
    lines = []
    for name in shapes:
        s = SHAPES[name]
        build = min(s.layers, mistral_layers) if name == "mistral-7b" else s.layers
        t_mlp = bench_mlp(s, dt, densities, mlp_repeats, kernel, gen)
        t_step = bench_step(s, dt, densities, step_repeats, kernel, gen, build, ctx)
        note = f"{s.layers} layers" + ("" if build == s.layers else f", extrapolated from {build} built")
        bd = bytes_per_token(s, nbytes, ctx, s.inter)
        print(f"# {name}: hidden {s.hidden} intermediate {s.inter} {note}; mlp timed over {t_mlp['blocks']} "
              f"distinct block(s); dense bytes/token: mlp {bd['mlp'] / 1e6:.1f} MB, step {bd['step'] / 1e6:.1f} MB "
              f"-> roofline {bd['mlp'] / bw / 1e6:.2f} ms / {bd['step'] / bw / 1e6:.1f} ms; measured dense "
              f"mlp {t_mlp['dense'] * 1e3:.2f} ms ({bd['mlp'] / t_mlp['dense'] / 1e9:.1f} GB/s), step "
              f"{t_step['dense'] * 1e3:.1f} ms ({bd['step'] / t_step['dense'] / 1e9:.1f} GB/s)")
        for d in densities:
            k = int(round(d * s.inter))
            bs = bytes_per_token(s, nbytes, ctx, k)
            ms, ss = t_mlp[f"{d}"], t_step[f"{d}"]
            line = (f"{name} density={d * 100:.0f}% mlp {t_mlp['dense'] / ms:.2f}x step {t_step['dense'] / ss:.2f}x"
                    f" | mlp {t_mlp['dense'] * 1e3:.2f} -> {ms * 1e3:.2f} ms, step {t_step['dense'] * 1e3:.1f} -> "
                    f"{ss * 1e3:.1f} ms | roofline: bytes/token mlp {bs['mlp'] / 1e6:.1f} MB step "
                    f"{bs['step'] / 1e6:.1f} MB -> {bs['mlp'] / bw / 1e6:.2f} / {bs['step'] / bw / 1e6:.1f} ms, "
                    f"allows mlp {bd['mlp'] / bs['mlp']:.2f}x step {bd['step'] / bs['step']:.2f}x; sparse runs at "
                    f"{bs['mlp'] / ms / 1e9:.1f} GB/s (mlp) {bs['step'] / ss / 1e9:.1f} GB/s (step) | best-of-repeats: "
                    f"mlp {t_mlp['min:dense'] / t_mlp[f'min:{d}']:.2f}x step {t_step['min:dense'] / t_step[f'min:{d}']:.2f}x")
            print(line, flush=True)
            lines.append(line)
    print(f"# load average at end {os.getloadavg()[0]:.2f}")
    return lines


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="smollm2-135m,mistral-7b", help=f"comma list of {list(SHAPES)}")
    p.add_argument("--densities", default="30,40,50,60,70", help="comma list of active-neuron densities in percent")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weight and activation dtype")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--ctx", type=int, default=512, help="tokens in the KV cache for the decode step")
    p.add_argument("--mistral_layers", type=int, default=4,
                   help="decoder layers actually built for mistral-7b (the 32-layer step is extrapolated)")
    p.add_argument("--mlp_repeats", type=int, default=21, help="timed rounds for the MLP block (median)")
    p.add_argument("--step_repeats", type=int, default=9, help="timed rounds for the decode step (median)")
    p.add_argument("--kernel", default="auto", choices=["auto", "cpp", "torch"], help="sparse kernel path")
    p.add_argument("--seed", type=int, default=0, help="random seed for the active sets and inputs")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        main(a.shapes.split(","), [float(d) / 100 for d in a.densities.split(",")], a.dtype, a.threads, a.ctx,
             a.mistral_layers, a.mlp_repeats, a.step_repeats, a.kernel, a.seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
