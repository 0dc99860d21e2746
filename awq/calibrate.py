"""``python -m awq.calibrate``: per-layer, per-projection thresholds for a target sparsity.

The threshold of (layer, proj) is the exact ``S``-quantile of ``|y|`` over every element of that
projection's output on the calibration windows, so that ``|y| >= t`` keeps a fraction ``1 - S``.
Exact and streamed, with bounded memory, in two passes per stage:

1. a histogram over the top 16 bits of the float32 bit pattern of ``|y|`` (monotone in the value
   for non-negative floats, so the buckets are exact value intervals) locates the bucket that holds
   the rank ``k = round(S * N)`` element;
2. a second pass keeps only the values falling in that bucket, and ``kthvalue`` picks the exact one.

Stage A calibrates gate_proj and up_proj on the dense model; stage B calibrates down_proj with the
gate/up thresholds of stage A active (the down output depends on them), as the thresholded model
will run.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import torch

from awq.sparse_mlp import PROJS, SparsityConfig, add_observer, remove_observer, save_thresholds, sparsify_

log = logging.getLogger("awq.calibrate")

_NBUCKETS = 1 << 15  # sign bit is 0 for |y|: top 16 bits of the pattern take 2**15 values


def _bucket(y: torch.Tensor) -> torch.Tensor:
    bits = y.detach().abs().float().reshape(-1).view(torch.int32)
    return bits >> 16


class _HistPass:
    def __init__(self, num_layers: int, projs: tuple[str, ...]) -> None:
        self.projs = projs
        self.hist = {p: torch.zeros(num_layers, _NBUCKETS, dtype=torch.int64) for p in projs}

    def __call__(self, layer: int, name: str, y: torch.Tensor) -> None:
        if name in self.projs:
            self.hist[name][layer] += torch.bincount(_bucket(y).cpu(), minlength=_NBUCKETS)


class _SelectPass:
    def __init__(self, targets: dict[str, list[tuple[int, int]]]) -> None:
        # targets[proj][layer] = (bucket, rank within bucket)
        self.targets = targets
        self.values: dict[str, list[list[torch.Tensor]]] = {p: [[] for _ in v] for p, v in targets.items()}

    def __call__(self, layer: int, name: str, y: torch.Tensor) -> None:
        if name in self.targets:
            b = self.targets[name][layer][0]
            flat = y.detach().abs().float().reshape(-1)
            sel = flat[(flat.view(torch.int32) >> 16) == b]
            self.values[name][layer].append(sel.cpu())


def _run(model, windows: torch.Tensor, observer, desc: str) -> None:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    add_observer(model, observer)
    try:
        with torch.no_grad():
            for i in tqdm(range(windows.size(0)), desc=desc, unit="win", disable=None):
                model(windows[i : i + 1].to(device))
    finally:
        remove_observer(model, observer)


def exact_quantile_thresholds(model, windows: torch.Tensor, sparsity: float, projs: tuple[str, ...],
                              num_layers: int, desc: str = "") -> dict[str, list[float]]:
    """Two streamed passes -> {proj: [exact S-quantile of |y| per layer]} for the sparsified ``model``."""
    hp = _HistPass(num_layers, projs)
    _run(model, windows, hp, f"calibrate {desc} histogram")
    targets: dict[str, list[tuple[int, int]]] = {}
    for p in projs:
        targets[p] = []
        for layer in range(num_layers):
            h = hp.hist[p][layer]
            n = int(h.sum())
            k = min(int(round(sparsity * n)), n - 1)  # 0-based rank: exactly k elements lie below it
            cum = torch.cumsum(h, 0)
            b = int(torch.searchsorted(cum, torch.tensor(k), right=True))
            below = int(cum[b - 1]) if b > 0 else 0
            targets[p].append((b, k - below))
    sp = _SelectPass(targets)
    _run(model, windows, sp, f"calibrate {desc} select")
    out: dict[str, list[float]] = {}
    for p in projs:
        out[p] = []
        for layer in range(num_layers):
            vals = torch.cat(sp.values[p][layer])
            r = targets[p][layer][1]
            out[p].append(float(torch.kthvalue(vals, r + 1).values))
    return out


def calibrate(model, windows: torch.Tensor, sparsity: float, num_layers: int) -> dict[str, list[float]]:
    """Thresholds for every projection (stage A gate/up dense, stage B down with gate/up applied)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {sparsity}")
    sparsify_(model, SparsityConfig(thresholds=None))
    gu = exact_quantile_thresholds(model, windows, sparsity, ("gate_proj", "up_proj"), num_layers, "gate/up")
    partial = {"gate_proj": gu["gate_proj"], "up_proj": gu["up_proj"], "down_proj": [0.0] * num_layers}
    sparsify_(model, SparsityConfig(thresholds=partial))
    dn = exact_quantile_thresholds(model, windows, sparsity, ("down_proj",), num_layers, "down")
    return {"gate_proj": gu["gate_proj"], "up_proj": gu["up_proj"], "down_proj": dn["down_proj"]}


def main(sparsity: float, output: Path, model_path: Optional[str] = None, nsamples: int = 16, seqlen: int = 2048,
         split: str = "train", data_path: Optional[str] = None, dtype: Optional[str] = None,
         device: Optional[str] = None) -> dict[str, list[float]]:
    from awq.data import load_corpus, tokenize_windows
    from awq.models import load_model

    if sparsity > 1.0:  # accept 50 as 50 %
        sparsity = sparsity / 100.0
    model, tok, info = load_model(model_path, dtype, device)
    corpus = load_corpus(split, data_path)
    windows = tokenize_windows(tok, corpus.text, seqlen)
    if nsamples > windows.size(0):
        raise ValueError(f"--nsamples {nsamples} exceeds the {windows.size(0)} available windows of {corpus.name} "
                         f"({split})")
    windows = windows[:nsamples]
    log.info("calibrating %s for %.0f%% sparsity on %d x %d tokens of %s (%s)", info.name, 100 * sparsity,
             windows.size(0), seqlen, corpus.name, split)
    thr = calibrate(model, windows, sparsity, info.num_layers)
    meta = {"model": info.name, "sparsity": sparsity, "nsamples": int(windows.size(0)), "seqlen": seqlen,
            "dataset": corpus.name, "split": split, "substitute": corpus.substitute, "method": "exact quantile of |y|",
            "dtype": info.dtype}
    save_thresholds(thr, output, extra=meta)
    log.info("thresholds written to %s", output)
    return thr


def cli(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m awq.calibrate",
                                description="Compute per-layer thresholds giving a target MLP sparsity (exact quantiles).")
    p.add_argument("--sparsity", type=float, required=True, help="target fraction of zeros, e.g. 0.5 (or 50)")
    p.add_argument("--output", type=Path, required=True, help="thresholds JSON to write (artifact format)")
    p.add_argument("--model_path", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seqlen", type=int, default=2048, help="window length (default 2048)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="corpus part (default train)")
    p.add_argument("--data_path", default=None, help="local corpus file/dir (see awq.entry --help)")
    p.add_argument("--dtype", default=None, help="model dtype (default float32 on CPU)")
    p.add_argument("--device", default=None, help="device (default auto)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main(a.sparsity, a.output, a.model_path, a.nsamples, a.seqlen, a.split, a.data_path, a.dtype, a.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
