"""Batch-1 MLP block latency of ``lowbit_rank``: the 4-bit copy's neuron scoring plus the row-gathered exact rows.

    python bench/bench_lowbit_rank.py --threads 2                  # SmolLM2-135M and Qwen2.5-0.5B shapes
    python bench/bench_lowbit_rank.py --shapes smollm2 --density 0.41 --bits 4 --repeats 30

Per shape (random weights, ``--blocks`` distinct MLP blocks called in turn so that weights come from DRAM
as in a decode step; time per block), interleaved round-robin, medians of ``--repeats`` rounds:

* ``dense``: the fused dense SwiGLU (one ``[2F, H]`` gate+up GEMV, one down GEMV; bench.common.FusedDenseMLP);
* ``dense-kernel``: the row-gathered kernel of awq.methods.dynamic_sparse with every neuron (a second dense baseline);
* ``score``: ``csrc/lowbit_rank.cpp`` alone (every neuron scored from the packed copy, threshold, indices);
* ``gathered``: the row-gathered kernel on the same number of neurons ``lowbit_rank`` keeps, indices given;
* ``lowbit_rank``: score + gathered, what the module's decode step runs.

Ratios against the faster dense baseline, each beside its roofline (bytes: dense ``3 H F`` weights; the
score reads the copy, ``copy_bytes``; lowbit_rank reads ``k/F`` of the weights plus the copy).  A ratio above
its roofline is flagged as a measurement error (bench/common.py).  The threshold is set per block so that
``--density`` of the neurons pass for the bench's random input (random weights: no calibration data).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from awq.kernels.lowbit import BITS, lowbit_kernel, pack_codes  # noqa: E402
from awq.kernels.mlp import cpp_kernel, min_bytes_per_thread  # noqa: E402
from awq.methods.dynamic_sparse import NeuronSparseDecode  # noqa: E402
from awq.methods.lowbit_rank import copy_bytes, quantize_rows  # noqa: E402
from awq.util.cli import opt  # noqa: E402
from awq.util.io import check_output_path  # noqa: E402
from bench.common import FusedDenseMLP, Report, best_dense, interleaved, parse_bench, roofline_speedup, run_cli  # noqa: E402

SHAPES = {"smollm2": (576, 1536), "qwen2.5-0.5b": (896, 4864), "tiny": (67, 131)}  # tiny: --quick only


@dataclass
class LowbitBenchConfig:
    """Options of ``python bench/bench_lowbit_rank.py``."""

    shapes: list[str] = opt(default_factory=lambda: ["smollm2", "qwen2.5-0.5b"], choices=tuple(SHAPES),
                            help="comma list of " + ", ".join(SHAPES))
    density: float = opt(0.41, help="share of neurons kept, a fraction in (0, 1] (default 0.41)", gt=0, max=1,
                         kind="fraction")
    bits: int = opt(4, choices=BITS, help="bits of the copy (default 4)")
    blocks: int = opt(8, help="distinct MLP blocks per round (default 8)", min=1)
    repeats: int = opt(20, help="timed rounds, medians (default 20)", min=1)
    threads: int = opt(2, help="torch.set_num_threads (default 2)", min=1)
    output: Optional[Path] = opt(None, help="also write the figures as JSON (atomically)", kind="out_file")
    quick: bool = opt(False, help="smoke run: a tiny odd shape, 2 blocks, 3 rounds (checks the script, not the "
                      "machine)")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    a = parse_bench(LowbitBenchConfig, argv, description=__doc__.split("\n\n")[0], shapes=["tiny"], blocks=2,
                    repeats=3)  # --quick: new defaults; explicit options win
    if a.output is not None:
        check_output_path(a.output)
    torch.set_num_threads(a.threads)
    if cpp_kernel() is None or lowbit_kernel() is None:
        raise ValueError("the C++ kernels are unavailable (no compiler?): nothing to time")
    rep = Report("bench_lowbit_rank", {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()})
    kl = lowbit_kernel()
    for name in a.shapes:
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
                             min_bytes_per_thread(), sc)
            t = float(torch.kthvalue(sc, max(1, int(round((1 - a.density) * F)))).values)
            ker = NeuronSparseDecode(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
            idx = kl.lowbit_select(x, packed, scales, a.bits, torch.empty(0), torch.empty(0, dtype=torch.long), t,
                                   min_bytes_per_thread(), torch.empty(0))
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
                                                    min_bytes_per_thread(), none)),
            "gathered": run(lambda b: b["ker"](b["x"], b["idx"])),
            "lowbit_rank": run(lambda b: b["ker"](b["x"], kl.lowbit_select(b["x"], b["packed"], b["scales"], a.bits,
                                                                         none, empty, b["t"], min_bytes_per_thread(),
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


def cli(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(main, argv, level=logging.INFO)


if __name__ == "__main__":
    sys.exit(cli())
