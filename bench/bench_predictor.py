"""Cost of the cluster predictor against the MLP it gates: analytic MACs/params and measured latency.

For each (K, trunk) the default rank (largest within the budget) is used; random weights.  Prints
one line per configuration, e.g.::

    smollm2-135m K=2048 trunk=separate rank=16 macs=4.75% params=4.79% | batch-1: mlp 0.210 ms predictor 0.012 ms (5.7%)

Run: ``python bench/bench_predictor.py [--hidden 576 --intermediate 1536] [--ks 256,1024,2048]``.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from awq.predictor import ClusterPredictor, auto_rank, predictor_cost
from awq.sparse_mlp import PROJS


def _time(fn, reps: int) -> float:
    for _ in range(max(3, reps // 10)):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def random_predictor(hidden: int, inter: int, k: int, rank: int, trunk: str) -> ClusterPredictor:
    ks = {p: k for p in PROJS}
    r_total = rank if trunk == "shared" else 3 * rank
    t = {"layers.0.w1": torch.randn(r_total, hidden) / hidden ** 0.5, "layers.0.b1": torch.zeros(r_total)}
    for p in PROJS:
        t[f"layers.0.{p}.w2"] = torch.randn(k, rank)
        t[f"layers.0.{p}.b2"] = torch.zeros(k)
        t[f"layers.0.{p}.counts"] = torch.zeros(k, dtype=torch.int64)
    meta = {"hidden": hidden, "intermediate": inter, "num_layers": 1, "rank": rank, "trunk": trunk, "act": "none",
            "k": ks, "widths": {"gate_proj": inter, "up_proj": inter, "down_proj": hidden}}
    return ClusterPredictor(t, meta)


def main(name: str, hidden: int, inter: int, ks: list[int], budget: float, reps: int, tokens: int) -> None:
    torch.manual_seed(0)
    wg, wu, wd = torch.randn(inter, hidden), torch.randn(inter, hidden), torch.randn(hidden, inter)

    def mlp(x):
        return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    for k in ks:
        for trunk in ("separate", "shared"):
            rank = auto_rank(hidden, inter, {p: k for p in PROJS}, trunk, budget)
            cost = predictor_cost(hidden, inter, {p: k for p in PROJS}, rank, trunk)
            pred = random_predictor(hidden, inter, k, rank, trunk)
            x = torch.randn(tokens, hidden)

            def run_pred():
                xx = x.clone()  # a new tensor per call, as in a forward pass (the trunk cache is per tensor)
                for p in PROJS:
                    pred.labels(xx, 0, p)

            with torch.no_grad():
                t_mlp, t_pred = _time(lambda: mlp(x), reps), _time(run_pred, reps)
            print(f"{name} K={k} trunk={trunk} rank={rank} macs={100 * cost['flop_fraction']:.2f}% "
                  f"params={100 * cost['param_fraction']:.2f}% | batch-{tokens}: mlp {1e3 * t_mlp:.3f} ms "
                  f"predictor {1e3 * t_pred:.3f} ms ({100 * t_pred / t_mlp:.1f}%)", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="smollm2-135m", help="label printed on each line")
    ap.add_argument("--hidden", type=int, default=576, help="hidden size (default 576, SmolLM2-135M)")
    ap.add_argument("--intermediate", type=int, default=1536, help="MLP intermediate size (default 1536)")
    ap.add_argument("--ks", default="256,1024,2048", help="comma-separated cluster counts K (default 256,1024,2048)")
    ap.add_argument("--budget", type=float, default=0.05, help="cost budget for the rank (default 0.05)")
    ap.add_argument("--reps", type=int, default=200, help="timed repetitions (default 200)")
    ap.add_argument("--tokens", type=int, default=1, help="tokens per call (default 1: decode)")
    a = ap.parse_args()
    main(a.name, a.hidden, a.intermediate, [int(v) for v in a.ks.split(",")], a.budget, a.reps, a.tokens)
