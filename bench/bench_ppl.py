"""Tokens/s of the perplexity run: dense vs thresholded vs centroid swap at K, on the same windows.

    python bench/bench_ppl.py [--model_path ...] [--nsamples 2] [--seqlen 2048] [--k 2048] [--threads 2]

The three configurations are built once (module lists swapped into the same model) and timed
interleaved round-robin (dense, thresholded, oracle, dense, ...; bench/common.py), one round = one
perplexity pass over the windows; medians of ``--repeats`` rounds with their spread.  Prints
tokens/s of each, the dense pass's effective GFLOP/s (2 x parameters x tokens) and weight GB/s, and
the throughput ratios beside their rooflines.  Thresholding and the centroid swap compute the dense
projections and then mask (they read every weight and add work), so neither can beat the
configuration below it: both rooflines are 1.0x, and a ratio above 1.0x is flagged as a
measurement error, not reported.  Targets (issues 2 and 5): thresholded >= 0.85x dense; oracle
centroid swap at K=2048 >= 0.5x threshold-only (CPU).  The centroid sets are random 0/1 matrices
at 60% density (only the cost is measured).
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

from awq.load.models import check_model_path  # noqa: E402
from awq.util.cli import opt  # noqa: E402
from bench.common import Report, interleaved, parse_bench, run_cli  # noqa: E402

log = logging.getLogger("bench_ppl")


@dataclass
class PplBenchConfig:
    """Options of ``python bench/bench_ppl.py``."""

    model_path: Optional[str] = opt(None, help="model (default: embedded SmolLM2-135M-Instruct)", kind="model",
                                    check=check_model_path)
    thresholds: Optional[str] = opt(None, help="thresholds JSON (default: the shipped 50%% file for the model)",
                                    kind="in_file", max_mb=64)
    data_path: Optional[str] = opt(None, help="local WikiText-2 data (default: hub if reachable, else the offline "
                                   "substitute)", kind="in_path")
    nsamples: int = opt(2, help="windows timed per configuration (default 2)", min=1)
    seqlen: int = opt(2048, help="window length (default 2048)", min=2)
    k: int = opt(2048, help="centroids per projection for the swap (default 2048)", min=1)
    repeats: int = opt(3, help="timed interleaved rounds, median reported (default 3)", min=1)
    warmup: int = opt(1, help="untimed rounds before timing (default 1)", min=0)
    threads: Optional[int] = opt(None, help="torch threads (default: torch's choice)", min=1)
    output: Optional[Path] = opt(None, help="also write the figures and config as JSON", kind="out_file")
    quick: bool = opt(False, help="smoke run: 1 window of 64 tokens, K=64, 2 rounds (checks the script, not the "
                      "machine)")


def main(argv: Optional[Sequence[str]] = None) -> Report:
    from awq.experiments.entry import EntryConfig, resolve_thresholds
    from awq.experiments.eval import perplexity
    from awq.load.arch import PROJS, decoder_layers
    from awq.load.data import load_corpus, tokenize_windows
    from awq.load.models import load_model
    from awq.methods.base import sparsify_
    from awq.methods.codebook import CentroidCodebook
    from awq.methods.paper_mlp import SparsityConfig

    a = parse_bench(PplBenchConfig, argv, description="Perplexity-run throughput: dense vs thresholded vs centroid "
                    "swap.", nsamples=1, seqlen=64, k=64, repeats=2, warmup=1)  # --quick: new defaults; explicit options win
    if a.output is not None:
        from awq.util.io import check_output_path

        check_output_path(a.output)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok, info = load_model(a.model_path)
    windows = tokenize_windows(tok, load_corpus("test", a.data_path).text, a.seqlen)[:a.nsamples]
    thr, path = resolve_thresholds(EntryConfig(model_path=a.model_path, thresholds=a.thresholds),
                                   info.name, info.num_layers)
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()} | {
        "model": info.name, "thresholds_file": str(path), "windows": windows.size(0)}
    rep = Report("bench_ppl", cfg)
    rep.emit(f"# model={info.name} windows={windows.size(0)}x{a.seqlen} thresholds={path} K={a.k}")

    layers = decoder_layers(model)
    dense = [layer.mlp for layer in layers]
    sparsify_(model, SparsityConfig(thresholds=thr))
    thresholded = [layer.mlp for layer in layers]
    widths = {"gate_proj": dense[0].gate_proj.out_features, "up_proj": dense[0].up_proj.out_features,
              "down_proj": dense[0].down_proj.out_features}
    g = torch.Generator().manual_seed(0)
    books = {p: CentroidCodebook((torch.rand(a.k, widths[p], generator=g) < 0.6).to(torch.uint8), p, info.num_layers)
             for p in PROJS}
    sparsify_(model, SparsityConfig(thresholds=thr, codebooks=books))
    oracle = [layer.mlp for layer in layers]
    configs = {"dense": dense, "thresholded": thresholded, f"oracle_k{a.k}": oracle}

    def run(mods):
        for layer, m in zip(layers, mods):
            layer.mlp = m
        perplexity(model, windows, desc="bench")

    t = interleaved({name: (lambda m=mods: run(m)) for name, mods in configs.items()}, a.repeats, a.warmup)
    for layer, m in zip(layers, dense):
        layer.mlp = m
    ntok = windows.numel()
    params = sum(p.numel() for p in model.parameters())
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters()) * windows.size(0)
    for name, tm in t.items():
        rep.timing(f"{name} pass", tm, nbytes=wbytes if name == "dense" else None)
        rep.figure(f"{name}_tok_s", ntok / tm.median)
        rep.emit(f"{name:>14}: {ntok / tm.median:8.1f} tok/s (median; best {ntok / tm.min:.1f})")
    rep.figure("dense_gflops", 2 * params * ntok / t["dense"].median / 1e9)
    rep.emit(f"dense pass: {rep.data['figures']['dense_gflops']:.1f} GFLOP/s effective (2 x {params / 1e6:.1f} M "
             f"parameters x {ntok} tokens)")
    r1 = rep.ratio("thresholded/dense", t["dense"], t["thresholded"], 1.0, note="target >= 0.85", what="throughput")
    r2 = rep.ratio(f"oracle K={a.k}/thresholded", t["thresholded"], t[f"oracle_k{a.k}"], 1.0,
                   note="target >= 0.5", what="throughput")
    rep.ratio(f"oracle K={a.k}/dense", t["dense"], t[f"oracle_k{a.k}"], 1.0, what="throughput")
    for r, target, name in ((r1, 0.85, "thresholded/dense"), (r2, 0.5, "oracle/thresholded")):
        rep.figure(f"{name} meets target", None if not r["valid"] else r["throughput"] >= target)
    rep.write(a.output)
    return rep


def cli(argv: Optional[Sequence[str]] = None) -> int:
    from awq.load.data import DataError
    from awq.store.thresholds import ThresholdsError

    return run_cli(main, argv, errors=(ValueError, OSError, DataError, ThresholdsError))


if __name__ == "__main__":
    sys.exit(cli())
