"""Batch-1 MLP block latency of ``lowbit_rank``: the 4-bit copy's neuron scoring plus the row-gathered exact rows.

    python bench/bench_lowbit_rank.py --threads 2                  # SmolLM2-135M and Qwen2.5-0.5B shapes
    python bench/bench_lowbit_rank.py --shapes smollm2 --density 0.41 --bits 4 --repeats 30

Per shape (random weights, ``--blocks`` distinct MLP blocks called in turn so that weights come from DRAM
as in a decode step; time per block), interleaved round-robin, medians of ``--repeats`` rounds:

* ``dense``: the fused dense SwiGLU (one ``[2F, H]`` gate+up GEMV, one down GEMV; bench.common.FusedDenseMLP);
* ``dense-kernel``: the row-gathered kernel of awq.dynamic_sparse with every neuron (a second dense baseline);
* ``score``: ``csrc/lowbit_rank.cpp`` alone (every neuron scored from the packed copy, threshold, indices);
* ``gathered``: the row-gathered kernel on the same number of neurons ``lowbit_rank`` keeps, indices given;
* ``lowbit_rank``: score + gathered, what the module's decode step runs.

Ratios against the faster dense baseline, each beside its roofline (bytes: dense ``3 H F`` weights; the
score reads the copy, ``copy_bytes``; lowbit_rank reads ``k/F`` of the weights plus the copy).  A ratio above
its roofline is flagged as a measurement error (bench/common.py).  The threshold is set per block so that
``--density`` of the neurons pass for the bench's random input (random weights: no calibration data).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import FusedDenseMLP, Report, best_dense, interleaved, roofline_speedup, run_cli

SHAPES = {"smollm2": (576, 1536), "qwen2.5-0.5b": (896, 4864)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="smollm2,qwen2.5-0.5b", help="comma-separated of: " + ", ".join(SHAPES))
    p.add_argument("--density", type=float, default=0.41, help="share of neurons kept (default 0.41)")
    p.add_argument("--bits", type=int, default=4, choices=(2, 4, 8))
    p.add_argument("--blocks", type=int, default=8, help="distinct MLP blocks per round (default 8)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=None, help="JSON file for the figures")
    a = p.parse_args(argv)
    if not (0.0 < a.density <= 1.0):
        raise ValueError(f"--density must be in (0, 1], got {a.density}")
    unknown = [s for s in a.shapes.split(",") if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape {unknown[0]!r} (choose from {', '.join(SHAPES)})")
    torch.set_num_threads(a.threads)
    from awq.dynamic_sparse import NeuronSparseDecode
    from awq.methods.lowbit_rank import copy_bytes, lowbit_kernel, pack_codes, quantize_rows
    from awq.sparse_compute import MIN_BYTES_PER_THREAD, cpp_kernel

    if cpp_kernel() is None or lowbit_kernel() is None:
        raise ValueError("the C++ kernels are unavailable (no compiler?): nothing to time")
    rep = Report("bench_lowbit_rank", vars(a))
    kl = lowbit_kernel()
    for name in a.shapes.split(","):
        H, F = SHAPES[name]
        g = torch.Generator().manual_seed(0)
        blocks = []
        for _ in range(a.blocks):
            mlp = torch.nn.Module()
            mlp.gate_proj = torch.nn.Linear(H, F, bias=False)
            mlp.up_proj = torch.nn.Linear(H, F, bias=False)
            mlp.down_proj = torch.nn.Linear(F, H, bias=False)
            mlp.act_fn = torch.nn.SiLU()
            with torch.no_grad():
                for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5)
            codes = torch.cat([quantize_rows(mlp.gate_proj.weight, a.bits)[0], quantize_rows(mlp.up_proj.weight, a.bits)[0]])
            scales = torch.cat([quantize_rows(mlp.gate_proj.weight, a.bits)[1], quantize_rows(mlp.up_proj.weight, a.bits)[1]])
            x = torch.randn(H, generator=g)
            packed = pack_codes(codes, a.bits)
            sc = torch.empty(F)
            kl.lowbit_select(x, packed, scales, a.bits, torch.empty(0), torch.empty(0, dtype=torch.long), 0.0,
                             MIN_BYTES_PER_THREAD, sc)
            t = float(torch.kthvalue(sc, max(1, int(round((1 - a.density) * F)))).values)
            ker = NeuronSparseDecode(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
            idx = kl.lowbit_select(x, packed, scales, a.bits, torch.empty(0), torch.empty(0, dtype=torch.long), t,
                                   MIN_BYTES_PER_THREAD, torch.empty(0))
            blocks.append(dict(fused=FusedDenseMLP(mlp), x=x, x2=x[None], packed=packed, scales=scales, t=t, ker=ker,
                               idx=idx, all=torch.arange(F)))
        k = sum(b["idx"].numel() for b in blocks) / len(blocks)
        empty = torch.empty(0, dtype=torch.long)
        none = torch.empty(0)

        def run(fn):
            def f():
                for b in blocks:
                    fn(b)
            return f

        fns = {
            "dense": run(lambda b: b["fused"](b["x2"])),
            "dense-kernel": run(lambda b: b["ker"](b["x"], b["all"])),
            "score": run(lambda b: kl.lowbit_select(b["x"], b["packed"], b["scales"], a.bits, none, empty, b["t"],
                                                    MIN_BYTES_PER_THREAD, none)),
            "gathered": run(lambda b: b["ker"](b["x"], b["idx"])),
            "lowbit_rank": run(lambda b: b["ker"](b["x"], kl.lowbit_select(b["x"], b["packed"], b["scales"], a.bits,
                                                                         none, empty, b["t"], MIN_BYTES_PER_THREAD,
                                                                         none))),
        }
        with torch.no_grad():
            tm = interleaved(fns, a.repeats, warmup=2)
        per = {n: t.scaled(1.0 / len(blocks)) for n, t in tm.items()}
        dense_b = 3 * H * F * 4
        cb = copy_bytes(H, F, a.bits)
        sparse_b = 3 * H * k * 4
        rep.emit(f"## {name}: H={H} F={F}, {a.bits}-bit copy {cb / 1e6:.2f} MB vs fp32 MLP {dense_b / 1e6:.2f} MB "
                 f"({100 * cb / dense_b:.1f}%), kept {k:.0f} of {F} neurons ({100 * k / F:.1f}%)")
        nbytes = {"dense": dense_b, "dense-kernel": dense_b, "score": cb, "gathered": sparse_b,
                  "lowbit_rank": sparse_b + cb}
        for n, t in per.items():
            rep.timing(f"{name} {n}", t, nbytes[n])
        base = best_dense(per, ["dense", "dense-kernel"])
        rep.emit(f"{name}: dense baseline = {base}")
        for n in ("score", "gathered", "lowbit_rank"):
            rep.ratio(f"{name} {n} vs {base}", per[base], per[n], roofline_speedup(dense_b, nbytes[n]))
    rep.write(a.output)
    return rep.data


if __name__ == "__main__":
    sys.exit(run_cli(main))
