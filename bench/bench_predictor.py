"""Cost of the cluster predictor against the MLP it gates: analytic MACs/params and measured latency.

For each (K, trunk) the default rank (largest within the budget) is used; random weights.  The MLP
is the best dense SwiGLU available (the faster of three ``F.linear`` and one fused ``[2F, H]``
gate+up ``F.linear``, bench/common.py); MLP and predictor are timed interleaved round-robin over
``--layers`` distinct layer copies (so that weights come from memory, not from a cache that one
hot layer would sit in), medians with their spread.  The predictor reads ``param_fraction`` of the
MLP's weight bytes, so MLP time / predictor time has the roofline ``1 / param_fraction``; a ratio
above it is flagged as a measurement error.  Prints e.g.::

    smollm2-135m K=2048 trunk=separate rank=16 macs=4.75% params=4.79% | batch-1: mlp 0.210 ms predictor 0.012 ms (5.7%)

Run: ``python bench/bench_predictor.py [--hidden 576 --intermediate 1536] [--ks 256,1024,2048] [--threads 1]``.
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from awq.load.arch import PROJS  # noqa: E402
from awq.methods.label_predictor import ClusterPredictor, auto_rank, predictor_cost  # noqa: E402
from awq.util.cli import opt  # noqa: E402
from bench.common import Report, best_dense, interleaved, parse_bench, run_cli, swiglu_bytes  # noqa: E402

log = logging.getLogger("bench_predictor")


def random_predictor(hidden: int, inter: int, k: int, rank: int, trunk: str, layers: int = 1) -> ClusterPredictor:
    ks = {p: k for p in PROJS}
    r_total = rank if trunk == "shared" else 3 * rank
    t = {}
    for layer in range(layers):
        t[f"layers.{layer}.w1"] = torch.randn(r_total, hidden) / hidden ** 0.5
        t[f"layers.{layer}.b1"] = torch.zeros(r_total)
        for p in PROJS:
            t[f"layers.{layer}.{p}.w2"] = torch.randn(k, rank)
            t[f"layers.{layer}.{p}.b2"] = torch.zeros(k)
            t[f"layers.{layer}.{p}.counts"] = torch.zeros(k, dtype=torch.int64)
    meta = {"hidden": hidden, "intermediate": inter, "num_layers": layers, "rank": rank, "trunk": trunk, "act": "none",
            "k": ks, "widths": {"gate_proj": inter, "up_proj": inter, "down_proj": hidden}}
    return ClusterPredictor(t, meta)


@dataclass
class PredictorBenchConfig:
    """Options of ``python bench/bench_predictor.py``."""

    name: str = opt("smollm2-135m", help="label printed on each line")
    hidden: int = opt(576, help="hidden size (default 576, SmolLM2-135M)", min=1)
    intermediate: int = opt(1536, help="MLP intermediate size (default 1536)", min=1)
    ks: list[int] = opt(default_factory=lambda: [256, 1024, 2048], help="comma-separated cluster counts K (default "
                        "256,1024,2048)", min=1)
    budget: float = opt(0.05, help="cost budget for the rank, a fraction in (0, 1) (default 0.05)", gt=0, lt=1,
                        kind="fraction")
    repeats: int = opt(25, help="timed interleaved rounds, medians reported (default 25; --reps is the old name)",
                       min=1, aliases=("--reps",))
    warmup: int = opt(3, help="untimed rounds before timing (default 3)", min=0)
    layers: Optional[int] = opt(None, help="distinct layer copies cycled per round (default: enough MLPs for 256 MiB "
                                "of weights)", min=1)
    tokens: int = opt(1, help="tokens per call (default 1: decode)", min=1)
    threads: Optional[int] = opt(None, help="torch threads (default: torch's choice)", min=1)
    output: Optional[Path] = opt(None, help="also write the figures and config as JSON", kind="out_file")
    quick: bool = opt(False, help="smoke run: hidden 64, intermediate 256, K=64, 2 layers, 3 rounds (checks the "
                      "script)")


def main(argv: Optional[Sequence[str]] = None) -> Report:
    a = parse_bench(PredictorBenchConfig, argv, description=__doc__.splitlines()[0], name="tiny", hidden=64,
                    intermediate=256, ks=[64], layers=2, repeats=3, warmup=1)  # --quick: new defaults; explicit options win
    ks = list(a.ks)
    if a.output is not None:
        from awq.util.io import check_output_path

        check_output_path(a.output)
    if a.threads:
        torch.set_num_threads(a.threads)
    hidden, inter = a.hidden, a.intermediate
    mlp_bytes = swiglu_bytes(hidden, inter, 4)
    n = a.layers or max(1, math.ceil(256 * 2**20 / mlp_bytes))
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()} | {"layers_cycled": n}
    rep = Report("bench_predictor", cfg)
    rep.emit(f"# {a.name}: hidden {hidden} intermediate {inter}; {n} distinct layer(s) cycled per round, "
             f"batch-{a.tokens}, fp32; times per layer")
    torch.manual_seed(0)
    w = [(torch.randn(inter, hidden), torch.randn(inter, hidden), torch.randn(hidden, inter)) for _ in range(n)]
    w_gu = [torch.cat([g, u]).contiguous() for g, u, _ in w]
    x = torch.randn(a.tokens, hidden)

    def mlp_three():
        for wg, wu, wd in w:
            F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    def mlp_fused():
        for gu, (_, _, wd) in zip(w_gu, w):
            y = F.linear(x, gu)
            F.linear(F.silu(y[:, :inter]) * y[:, inter:], wd)

    for k in ks:
        for trunk in ("separate", "shared"):
            rank = auto_rank(hidden, inter, {p: k for p in PROJS}, trunk, a.budget)
            cost = predictor_cost(hidden, inter, {p: k for p in PROJS}, rank, trunk)
            pred = random_predictor(hidden, inter, k, rank, trunk, n)

            def run_pred():
                for layer in range(n):
                    xx = x.clone()  # a new tensor per call, as in a forward pass (the trunk cache is per tensor)
                    for p in PROJS:
                        pred.labels(xx, layer, p)

            with torch.no_grad():
                t = interleaved({"mlp_three": mlp_three, "mlp_fused": mlp_fused, "predictor": run_pred},
                                a.repeats, a.warmup)
            t = {name: tm.scaled(1.0 / n) for name, tm in t.items()}
            tag = f"{a.name} K={k} trunk={trunk}"
            base = best_dense(t, ("mlp_three", "mlp_fused"))
            rep.timing(f"{tag} {base}", t[base], nbytes=mlp_bytes, echo=False)
            rep.timing(f"{tag} predictor", t["predictor"], nbytes=cost["params"] * 4, echo=False)
            tm, tp = t[base].median, t["predictor"].median
            rep.emit(f"{tag} rank={rank} macs={100 * cost['flop_fraction']:.2f}% "
                     f"params={100 * cost['param_fraction']:.2f}% | batch-{a.tokens}: mlp ({base}) {1e3 * tm:.3f} ms "
                     f"[{mlp_bytes / tm / 1e9:.1f} GB/s] predictor {1e3 * tp:.3f} ms ({100 * tp / tm:.1f}%)")
            rep.ratio(f"{tag} mlp/predictor time", t[base], t["predictor"], 1.0 / cost["param_fraction"],
                      what="ratio", note="roofline = MLP bytes / predictor bytes")
    rep.write(a.output)
    return rep


def cli(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
