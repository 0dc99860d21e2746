"""Tokens/s of the perplexity run: dense vs thresholded (vs centroid swap at K), on the same windows.

    python bench/bench_ppl.py [--model_path ...] [--nsamples 2] [--seqlen 2048] [--k 2048]

Prints one line per configuration and the ratio to dense / to threshold-only.  Targets (issues 2 and
5): thresholded >= 0.85x dense; oracle centroid swap at K=2048 >= 0.5x threshold-only (CPU).
The centroid sets used here are random 0/1 matrices at 60% density (only the cost is measured).
"""
from __future__ import annotations

import argparse
import logging
import time
from typing import Optional

import torch


def _time_ppl(model, windows, repeats: int) -> float:
    from awq.eval import perplexity

    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        perplexity(model, windows, desc="bench")
        best = min(best, time.perf_counter() - t)
    return windows.numel() / best


def main(model_path: Optional[str] = None, nsamples: int = 2, seqlen: int = 2048, k: int = 2048,
         repeats: int = 2, threads: Optional[int] = None) -> dict:
    from awq.codebook import CentroidCodebook
    from awq.data import load_corpus, tokenize_windows
    from awq.entry import resolve_thresholds, EntryConfig
    from awq.models import load_model
    from awq.sparse_mlp import PROJS, SparsityConfig, decoder_layers, sparsify_

    if threads:
        torch.set_num_threads(threads)
    model, tok, info = load_model(model_path)
    windows = tokenize_windows(tok, load_corpus("test").text, seqlen)[:nsamples]
    thr, path = resolve_thresholds(EntryConfig(model_path=model_path), info.name, info.num_layers)
    print(f"model={info.name} threads={torch.get_num_threads()} windows={windows.size(0)}x{seqlen} "
          f"thresholds={path}")
    _time_ppl(model, windows[:1], 1)  # warm-up
    out = {}
    out["dense"] = _time_ppl(model, windows, repeats)
    sparsify_(model, SparsityConfig(thresholds=thr))
    out["thresholded"] = _time_ppl(model, windows, repeats)
    mlp = decoder_layers(model)[0].mlp
    widths = {"gate_proj": mlp.gate_proj.out_features, "up_proj": mlp.up_proj.out_features,
              "down_proj": mlp.down_proj.out_features}
    g = torch.Generator().manual_seed(0)
    books = {p: CentroidCodebook((torch.rand(k, widths[p], generator=g) < 0.6).to(torch.uint8), p, info.num_layers)
             for p in PROJS}
    sparsify_(model, SparsityConfig(thresholds=thr, codebooks=books))
    out[f"oracle_k{k}"] = _time_ppl(model, windows, repeats)
    for name, tps in out.items():
        line = f"{name:>14}: {tps:8.1f} tok/s  {tps / out['dense']:.3f}x dense"
        if name.startswith("oracle"):
            line += f"  {tps / out['thresholded']:.3f}x thresholded"
        print(line)
    print(f"thresholded/dense = {out['thresholded'] / out['dense']:.3f} (target >= 0.85); "
          f"oracle K={k}/thresholded = {out[f'oracle_k{k}'] / out['thresholded']:.3f} (target >= 0.5)")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Perplexity-run throughput: dense vs thresholded vs centroid swap.")
    p.add_argument("--model_path", default=None, help="model (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--nsamples", type=int, default=2, help="windows timed per configuration (default 2)")
    p.add_argument("--seqlen", type=int, default=2048, help="window length (default 2048)")
    p.add_argument("--k", type=int, default=2048, help="centroids per projection for the swap (default 2048)")
    p.add_argument("--repeats", type=int, default=2, help="repeats, best is reported (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    main(a.model_path, a.nsamples, a.seqlen, a.k, a.repeats, a.threads)
