"""Batch-1 decode latency: best dense vs gathered sparse MLP (one MLP block and a whole next-token step).

For each shape set and active-neuron density it prints the timings (median [min, max], effective
GB/s) and each speedup beside its roofline, e.g.::

    mistral-7b mlp density=50%: speedup 1.93x [paired IQR 1.90-1.96, range 1.85-2.01] | roofline 2.00x = 97% of roofline

A speedup above its roofline is printed as ``ABOVE ROOFLINE: measurement error`` instead (see
bench/common.py).  The roofline is the ratio of bytes read per token (time ~ bytes for batch-1
decode): ``F/k`` for the MLP, ``(dense MLP + rest) / (sparse MLP + rest)`` for the step, where the
rest (attention weights, KV cache, LM head) stays dense.

What is timed (random weights, random active sets of the given density, fixed per layer):
* Dense candidates, all timed and the FASTEST used as the baseline of every ratio:
  ``hf`` = the HF ``LlamaMLP`` (three ``nn.Linear``); ``fused`` = ``F.linear`` on contiguous weights
  with one fused ``[2F, H]`` gate+up matmul (bench.common.FusedDenseMLP); ``kernel`` = the gathered
  sparse kernel with all neurons active.
* mlp: one SwiGLU block.  When one block fits in the last-level cache (SmolLM2: 10.6 MB fp32)
  several distinct blocks are called in turn and the time per block is reported, so that weights
  come from DRAM as in a real decode step.
* step: a random ``LlamaForCausalLM`` with the given shapes (attention + DynamicCache holding
  ``--ctx`` tokens, final norm, LM head), one decode step, the MLP variants swapped into the same
  model.  Mistral-7B does not fit in fp32 in 24 GB, so ``--mistral_layers`` layers are built and
  the 32-layer step is extrapolated per round: t = t_head + 32/L * (t_L - t_head), with t_head
  (embedding + final norm + LM head) timed in the same rounds.  The predictor is not included.
Timings: ``torch.set_num_threads(--threads)``, warm-up, all variants interleaved round-robin
(bench.common.interleaved), medians of ``--repeats`` rounds with their spread.
"""
from __future__ import annotations

import gc
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from awq.kernels.mlp import cpp_kernel_available
from awq.methods.gathered import GatheredSparseMLP  # noqa: E402
from awq.util.cli import opt  # noqa: E402
from bench.common import (  # noqa: E402
    FusedDenseMLP,
    Report,
    Timing,
    best_dense,
    interleaved,
    parse_bench,
    roofline_speedup,
    run_cli,
    stream_bandwidth_gbs,
    swiglu_bytes,
)

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
    "tiny": Shapes(128, 512, 2, 4, 2, 512, True),  # --quick: a smoke run, not a figure
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DENSE = ("dense_hf", "dense_fused", "dense_kernel")


def active_count(inter: int, density: float) -> int:
    return max(1, int(round(density * inter)))


def random_active(inter: int, density: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(inter, generator=gen)[:active_count(inter, density)].sort().values


def make_config(s: Shapes, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=s.hidden, intermediate_size=s.inter, num_hidden_layers=layers,
                       num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                       tie_word_embeddings=s.tie, max_position_embeddings=4096, use_cache=True)


def other_bytes_per_token(s: Shapes, nbytes: int, ctx: int) -> float:
    """Bytes a decode step reads besides the MLPs: attention weights and KV cache of every layer, LM head."""
    hd = s.hidden // s.heads
    kv = s.kv_heads * hd
    attn = (2 * s.hidden * s.hidden + 2 * s.hidden * kv) * nbytes
    kvc = 2 * ctx * kv * nbytes
    return s.layers * (attn + kvc) + s.vocab * s.hidden * nbytes


def variants(dense: Sequence[torch.nn.Module], densities: Sequence[float], kernel: str,
             gen: torch.Generator) -> dict[str, list[torch.nn.Module]]:
    """Every MLP variant, one module per layer: the dense candidates (DENSE) and one gathered sparse
    set per density ``s<d>``.  The gathered modules of a layer share one interleaved weight; each
    has a fixed random active set (indices prepared once, as a per-centroid cache would)."""
    gathered = [GatheredSparseMLP.from_mlp(m, i, kernel=kernel) for i, m in enumerate(dense)]

    def with_active(b: GatheredSparseMLP, idx: torch.Tensor) -> GatheredSparseMLP:
        m = GatheredSparseMLP(b.weight.data, b.act_fn, b.layer_idx, kernel=kernel)
        m.set_active(idx)
        return m

    out = {"dense_hf": list(dense), "dense_fused": [FusedDenseMLP(m) for m in dense],
           "dense_kernel": [with_active(b, torch.arange(b.intermediate_size)) for b in gathered]}
    for d in densities:
        out[f"s{d:g}"] = [with_active(b, random_active(b.intermediate_size, d, gen)) for b in gathered]
    return out


@torch.no_grad()
def bench_mlp(s: Shapes, dtype: torch.dtype, densities: Sequence[float], repeats: int, warmup: int,
              kernel: str, gen: torch.Generator) -> tuple[dict[str, Timing], int]:
    """Time per block of every variant (interleaved) and the number of distinct blocks cycled."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    block = swiglu_bytes(s.hidden, s.inter, torch.finfo(dtype).bits // 8)
    n = max(1, min(s.layers, math.ceil(256 * 2**20 / block)))  # enough distinct blocks to defeat the LLC
    cfg = make_config(s, 1)
    dense = [LlamaMLP(cfg).to(dtype).requires_grad_(False) for _ in range(n)]
    mods = variants(dense, densities, kernel, gen)
    x = torch.randn(1, 1, s.hidden, generator=gen).to(dtype)

    def run(ms):
        for m in ms:
            m(x)

    t = interleaved({k: (lambda ms=ms: run(ms)) for k, ms in mods.items()}, repeats, warmup)
    return {k: v.scaled(1.0 / n) for k, v in t.items()}, n


@torch.no_grad()
def bench_step(s: Shapes, dtype: torch.dtype, densities: Sequence[float], repeats: int, warmup: int,
               kernel: str, gen: torch.Generator, build_layers: int, ctx: int) -> dict[str, Timing]:
    from transformers import DynamicCache, LlamaForCausalLM

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = LlamaForCausalLM(make_config(s, build_layers)).to(dtype).eval().requires_grad_(False)
    log.info("built %d-layer model in %.1f s", build_layers, time.perf_counter() - t0)
    layers = model.model.layers
    mods = variants([layer.mlp for layer in layers], densities, kernel, gen)
    # the KV cache of a ctx-token context: random keys/values (a prefill would cost minutes for 7B
    # shapes and gives a cache of the same size; the decode step's cost does not depend on the values)
    cache = DynamicCache()
    hd = s.hidden // s.heads
    for i in range(build_layers):
        kv = torch.randn(2, 1, s.kv_heads, ctx, hd, generator=gen).to(dtype)
        cache.update(kv[0], kv[1], i)
    tok = torch.randint(0, s.vocab, (1, 1), generator=gen)

    def step(ms):
        for layer, m in zip(layers, ms):
            layer.mlp = m
        model(tok, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # back to ctx tokens: every timed step sees the same context length

    def head():
        model.lm_head(model.model.norm(model.model.embed_tokens(tok)))

    step(mods["dense_hf"])
    if cache.get_seq_length() != ctx:
        raise RuntimeError(f"KV cache holds {cache.get_seq_length()} tokens after a step, expected {ctx}")
    fns = {k: (lambda ms=ms: step(ms)) for k, ms in mods.items()} | {"head": head}
    t = interleaved(fns, repeats, warmup)
    del model, mods, cache
    gc.collect()
    h = t.pop("head")
    if build_layers == s.layers:
        return t
    scale = s.layers / build_layers
    return {k: Timing([hh + scale * (v - hh) for v, hh in zip(tv.samples, h.samples)]) for k, tv in t.items()}


def run_shape(rep: Report, name: str, s: Shapes, dt: torch.dtype, densities: Sequence[float], a) -> None:
    nbytes = torch.finfo(dt).bits // 8
    gen = torch.Generator().manual_seed(a.seed)
    build = min(s.layers, a.mistral_layers) if name == "mistral-7b" else s.layers
    t_mlp, blocks = bench_mlp(s, dt, densities, a.mlp_repeats, a.warmup, a.kernel, gen)
    t_step = (bench_step(s, dt, densities, a.step_repeats, a.warmup, a.kernel, gen, build, a.ctx)
              if not a.no_step else None)
    mlp_d = swiglu_bytes(s.hidden, s.inter, nbytes)
    rest = other_bytes_per_token(s, nbytes, a.ctx)
    step_d = s.layers * mlp_d + rest
    bw = rep.data["figures"]["stream_gbs"]
    note = f"{s.layers} layers" + ("" if build == s.layers else f", step extrapolated from {build} built")
    rep.emit(f"# {name}: hidden {s.hidden} intermediate {s.inter} {note}; mlp timed over {blocks} distinct "
             f"block(s); dense bytes/token: mlp {mlp_d / 1e6:.1f} MB, step {step_d / 1e6:.1f} MB -> at "
             f"{bw:.1f} GB/s: {mlp_d / bw / 1e6:.3f} ms / {step_d / bw / 1e6:.2f} ms")
    for what, t, nb in (("mlp", t_mlp, mlp_d), ("step", t_step, step_d)):
        if t is None:
            continue
        for k in DENSE:
            rep.timing(f"{name} {what} {k}", t[k], nbytes=nb)
        base = best_dense(t, DENSE)
        rep.figure(f"{name} {what} dense_baseline", base)
        rep.emit(f"{name} {what}: dense baseline = {base} (fastest median of {', '.join(DENSE)})")
        for d in densities:
            sb = swiglu_bytes(s.hidden, active_count(s.inter, d), nbytes)
            if what == "mlp":
                roof, nbs = roofline_speedup(mlp_d, sb), sb
            else:
                roof, nbs = roofline_speedup(s.layers * mlp_d, s.layers * sb, rest), s.layers * sb + rest
            rep.timing(f"{name} {what} density={d * 100:g}%", t[f"s{d:g}"], nbytes=nbs)
            rep.ratio(f"{name} {what} density={d * 100:g}%", t[base], t[f"s{d:g}"], roof,
                      note=f"vs {base}")


@dataclass
class SparseMlpBenchConfig:
    """Options of ``python bench/bench_sparse_mlp.py``."""

    shapes: list[str] = opt(default_factory=lambda: ["smollm2-135m", "mistral-7b"], choices=tuple(SHAPES),
                            help=f"comma list of {list(SHAPES)}")
    densities: list[float] = opt(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7], gt=0, max=1, kind="fraction",
                                 help="comma list of active-neuron densities, fractions in (0, 1] (0.5 = half the "
                                 "neurons; default 0.3,0.4,0.5,0.6,0.7)")
    dtype: str = opt("fp32", choices=tuple(DTYPES), help="weight and activation dtype")
    threads: int = opt(2, help="torch.set_num_threads (default 2)", min=1)
    ctx: int = opt(512, help="tokens in the KV cache for the decode step", min=1)
    mistral_layers: int = opt(4, help="decoder layers actually built for mistral-7b (the 32-layer step is "
                              "extrapolated)", min=1)
    repeats: Optional[int] = opt(None, help="timed rounds for both mlp and step (overrides the two below)", min=1)
    mlp_repeats: int = opt(21, help="timed rounds for the MLP block (median)", min=1)
    step_repeats: int = opt(9, help="timed rounds for the decode step (median)", min=1)
    warmup: int = opt(2, help="untimed rounds before timing (default 2)", min=0)
    no_step: bool = opt(False, help="time the MLP block only")
    kernel: str = opt("auto", choices=("auto", "cpp", "torch"), help="sparse kernel path")
    seed: int = opt(0, help="random seed for the active sets and inputs", kind="seed")
    bandwidth_mb: int = opt(1024, help="MiB summed to measure the read bandwidth", min=1)
    output: Optional[Path] = opt(None, help="also write the figures, config, machine info, notes and wall time as "
                                 "JSON (atomically)", kind="out_file")
    note: list[str] = opt(default_factory=list, metavar="TEXT", append=True,
                          help="a note stored in the JSON's notes, e.g. the machine's state (repeatable)")
    quick: bool = opt(False, help="smoke run: tiny shapes, density 0.5, 3 rounds, ctx 16 (checks the script, not the "
                      "machine)")


def main(argv: Optional[Sequence[str]] = None) -> Report:
    a = parse_bench(SparseMlpBenchConfig, argv, description=__doc__.split("\n\n")[0], shapes=["tiny"],
                    densities=[0.5], ctx=16, repeats=3, warmup=1, bandwidth_mb=64)  # --quick: new defaults; explicit options win
    if a.repeats is not None:
        a.mlp_repeats = a.step_repeats = a.repeats
    shapes, densities = list(a.shapes), list(a.densities)
    if a.output is not None:
        from awq.util.io import check_output_path

        check_output_path(a.output)
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    kpath = "cpp" if (a.kernel != "torch" and cpp_kernel_available()) else "torch"
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()} | {"kernel_path": kpath}
    rep = Report("bench_sparse_mlp", cfg)
    bw = stream_bandwidth_gbs(a.bandwidth_mb)
    rep.figure("stream_gbs", bw)
    rep.figure("shapes", {n: asdict(SHAPES[n]) for n in shapes})
    rep.emit(f"# dtype={a.dtype} kernel={kpath} ctx={a.ctx}; read bandwidth {bw:.1f} GB/s "
             f"(sum over a {a.bandwidth_mb} MiB tensor)")
    for name in shapes:
        run_shape(rep, name, SHAPES[name], DTYPES[a.dtype], densities, a)
    if rep.flagged():
        rep.emit(f"# {len(rep.flagged())} ratio(s) above their roofline: measurement error, not results")
    rep.data["notes"] = notes(rep.data["system"], a.note)
    rep.data["wall_s"] = round(time.perf_counter() - t_start, 1)
    rep.write(a.output)
    return rep


def notes(system: dict, given: Sequence[str]) -> list[str]:
    """The user's ``--note`` lines, then one on the machine's load (timings on a loaded machine are noisy)."""
    load, cpus = system.get("loadavg"), system.get("cpus") or 1
    auto = [] if load is None else [
        f"load average {load} at start on {cpus} cpus"
        + (": the machine was shared with other jobs, timings are noisy; ratios come from interleaved rounds"
           if load >= 0.5 * cpus else "")]
    return [*given, *auto]


def cli(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(main, argv, level=logging.INFO)


if __name__ == "__main__":
    sys.exit(cli())
