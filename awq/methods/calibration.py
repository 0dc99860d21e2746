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

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from awq.load.data import load_corpus, tokenize_windows
from awq.load.models import check_model_path, load_model
from awq.methods.base import sparsify_
from awq.methods.paper_mlp import SparsityConfig
from awq.methods.recording import add_observer, remove_observer
from awq.store.thresholds import save_thresholds
from awq.util.cli import check_config, opt, run_cli
from awq.util.io import check_not_input, check_output_path, output_lock

log = logging.getLogger("awq.methods.calibration")

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
    def __init__(self, targets: dict[str, list[set[int]]]) -> None:
        # targets[proj][layer] = the buckets whose values must be kept (one per requested sparsity)
        self.targets = {p: [torch.tensor(sorted(b), dtype=torch.int32) for b in v] for p, v in targets.items()}
        self.values: dict[str, list[list[torch.Tensor]]] = {p: [[] for _ in v] for p, v in targets.items()}

    def __call__(self, layer: int, name: str, y: torch.Tensor) -> None:
        if name in self.targets:
            flat = y.detach().abs().float().reshape(-1)
            sel = flat[torch.isin(flat.view(torch.int32) >> 16, self.targets[name][layer].to(flat.device))]
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


def exact_quantile_thresholds(model, windows: torch.Tensor, sparsity: float | list[float], projs: tuple[str, ...],
                              num_layers: int, desc: str = "") -> dict[str, list[float]] | list[dict[str, list[float]]]:
    """Two streamed passes -> {proj: [exact S-quantile of |y| per layer]} for the sparsified ``model``.

    ``sparsity`` may be a list: the same two passes then serve every level (a list of dicts is returned).
    """
    levels = list(sparsity) if isinstance(sparsity, (list, tuple)) else [sparsity]
    hp = _HistPass(num_layers, projs)
    _run(model, windows, hp, f"calibrate {desc} histogram")
    # where[s][proj][layer] = (bucket, rank of the wanted element among the values in that bucket)
    where: list[dict[str, list[tuple[int, int]]]] = []
    for s in levels:
        w: dict[str, list[tuple[int, int]]] = {}
        for p in projs:
            w[p] = []
            for layer in range(num_layers):
                h = hp.hist[p][layer]
                n = int(h.sum())
                k = min(int(round(s * n)), n - 1)  # 0-based rank: exactly k elements lie below it
                cum = torch.cumsum(h, 0)
                b = int(torch.searchsorted(cum, torch.tensor(k), right=True))
                below = int(cum[b - 1]) if b > 0 else 0
                w[p].append((b, k - below))
        where.append(w)
    targets = {p: [{w[p][layer][0] for w in where} for layer in range(num_layers)] for p in projs}
    sp = _SelectPass(targets)
    _run(model, windows, sp, f"calibrate {desc} select")
    results: list[dict[str, list[float]]] = []
    for w in where:
        out: dict[str, list[float]] = {}
        for p in projs:
            out[p] = []
            for layer in range(num_layers):
                vals = torch.cat(sp.values[p][layer])
                b, r = w[p][layer]
                inb = vals[(vals.view(torch.int32) >> 16) == b]
                out[p].append(float(torch.kthvalue(inb, r + 1).values))
        results.append(out)
    return results if isinstance(sparsity, (list, tuple)) else results[0]


def calibrate(model, windows: torch.Tensor, sparsity: float | list[float],
              num_layers: int) -> dict[str, list[float]] | list[dict[str, list[float]]]:
    """Thresholds for every projection (stage A gate/up dense, stage B down with gate/up applied).

    A list of sparsities shares stage A's two passes; stage B needs two passes per level.
    """
    levels = list(sparsity) if isinstance(sparsity, (list, tuple)) else [sparsity]
    for s in levels:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"--sparsity must be in [0, 1), got {s}")
    sparsify_(model, SparsityConfig(thresholds=None))
    gus = exact_quantile_thresholds(model, windows, levels, ("gate_proj", "up_proj"), num_layers, "gate/up")
    out = []
    for s, gu in zip(levels, gus):
        partial = {"gate_proj": gu["gate_proj"], "up_proj": gu["up_proj"], "down_proj": [0.0] * num_layers}
        sparsify_(model, SparsityConfig(thresholds=partial))
        dn = exact_quantile_thresholds(model, windows, s, ("down_proj",), num_layers, f"down {100 * s:.0f}%")
        out.append({"gate_proj": gu["gate_proj"], "up_proj": gu["up_proj"], "down_proj": dn["down_proj"]})
    return out if isinstance(sparsity, (list, tuple)) else out[0]


@dataclass
class CalibrateConfig:
    """Options of ``python -m awq.calibrate`` (each field is one command-line option, see awq.util.cli)."""

    sparsity: list[float] = opt(help="target fraction of zeros in [0, 1), e.g. 0.5 for 50%% (a fraction: 50 or 1.5 "
                                "is refused); comma-separated for several levels", min=0.0, lt=1.0, kind="fraction")
    output: Path = opt(help="thresholds JSON to write (artifact format); '{pct}' in the name is replaced by the "
                       "level in percent", kind="out_file")
    model_path: Optional[str] = opt(None, help="model (default: the embedded SmolLM2-135M-Instruct)", kind="model",
                                    check=check_model_path)
    nsamples: int = opt(16, help="calibration windows (default 16)", min=1)
    seqlen: int = opt(2048, help="window length (default 2048)", min=2)
    split: str = opt("train", help="corpus part (default train)", choices=["train", "test"])
    data_path: Optional[str] = opt(None, help="local corpus file/dir (see awq.entry --help)", kind="in_path")
    dtype: Optional[str] = opt(None, help="model dtype (default float32 on CPU)",
                               choices=["float32", "float16", "bfloat16", "auto"])
    device: Optional[str] = opt(None, help="device (default auto)", kind="device", words=("auto",))

    def levels(self) -> list[float]:
        """The sparsity levels (fractions, checked by their declaration: never reinterpreted as percents)."""
        return [float(s) for s in (self.sparsity if isinstance(self.sparsity, (list, tuple)) else [self.sparsity])]


def main(cfg: CalibrateConfig) -> dict[str, list[float]] | list[dict[str, list[float]]]:
    """Calibrate and write one thresholds file per level; returns the thresholds (a list for several levels)."""
    check_config(cfg)
    levels = cfg.levels()
    output = cfg.output
    if len(levels) > 1 and "{pct}" not in str(output):
        raise ValueError("several --sparsity levels need an --output containing {pct}")
    paths = [Path(str(output).replace("{pct}", f"{round(100 * s)}")) for s in levels]
    with contextlib.ExitStack() as stack:
        for path in paths:  # fail before the work: unwritable, an input, or being written by another run
            check_output_path(path, "thresholds file")
            check_not_input(path, [cfg.model_path, cfg.data_path], "thresholds file")
            stack.enter_context(output_lock(path, "thresholds file", folder=False))
        return _calibrate_to(cfg, levels, paths)


def _calibrate_to(cfg: CalibrateConfig, levels: list[float], paths: list[Path]):
    seqlen, split = cfg.seqlen, cfg.split
    model, tok, info = load_model(cfg.model_path, cfg.dtype, cfg.device)
    corpus = load_corpus(split, cfg.data_path)
    windows = tokenize_windows(tok, corpus.text, seqlen, max_windows=cfg.nsamples)
    if cfg.nsamples > windows.size(0):
        raise ValueError(f"--nsamples {cfg.nsamples} exceeds the {windows.size(0)} available windows of {corpus.name} "
                         f"({split})")
    windows = windows[: cfg.nsamples]
    log.info("calibrating %s for %s sparsity on %d x %d tokens of %s (%s)", info.name,
             ", ".join(f"{100 * s:.0f}%" for s in levels), windows.size(0), seqlen, corpus.name, split)
    thrs = calibrate(model, windows, levels, info.num_layers)
    for s, thr, path in zip(levels, thrs, paths):
        meta = {"model": info.name, "sparsity": s, "nsamples": int(windows.size(0)), "seqlen": seqlen,
                "dataset": corpus.name, "split": split, "substitute": corpus.substitute,
                "method": "exact quantile of |y|", "dtype": info.dtype}
        save_thresholds(thr, path, extra=meta)
        log.info("thresholds written to %s", path)
    return thrs[0] if len(thrs) == 1 else thrs


def cli(argv: Optional[list[str]] = None) -> int:
    return run_cli(CalibrateConfig, main, argv, prog="python -m awq.calibrate",
                   description="Compute per-layer thresholds giving a target MLP sparsity (exact quantiles).",
                   errors=(ValueError, OSError))


if __name__ == "__main__":
    sys.exit(cli())
