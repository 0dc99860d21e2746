"""Perplexity over non-overlapping windows, measured sparsity, and the lm-eval path."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from awq.load.arch import PROJS
from awq.methods.recording import add_observer, remove_observer

log = logging.getLogger(__name__)


class SparsityMeter:
    """Observer counting exact zeros of every projection output, per layer (after thresholding)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.zeros = {p: torch.zeros(num_layers, dtype=torch.float64) for p in PROJS}
        self.total = {p: torch.zeros(num_layers, dtype=torch.float64) for p in PROJS}

    def __call__(self, layer: int, name: str, y: torch.Tensor) -> None:
        if name not in self.zeros:
            return
        self.zeros[name][layer] += y.numel() - int(torch.count_nonzero(y))
        self.total[name][layer] += y.numel()

    def add(self, other: dict) -> None:
        """Add counts saved by :meth:`counts` (e.g. from a resumed run)."""
        for p in PROJS:
            self.zeros[p] += torch.tensor(other["zeros"][p], dtype=torch.float64)
            self.total[p] += torch.tensor(other["total"][p], dtype=torch.float64)

    def counts(self) -> dict:
        return {"zeros": {p: self.zeros[p].tolist() for p in PROJS}, "total": {p: self.total[p].tolist() for p in PROJS}}

    def summary(self) -> dict:
        out = {}
        for p in PROJS:
            tot = self.total[p]
            if float(tot.sum()) == 0:
                continue
            per = (self.zeros[p] / tot.clamp(min=1)).tolist()
            out[p] = {"mean": float(self.zeros[p].sum() / tot.sum()), "per_layer": per}
        return out


@dataclass
class PPLResult:
    ppl: float
    nll_sum: float
    tokens: int  # scored targets
    windows: int
    seconds: float
    tokens_per_s: float  # input tokens processed per second
    per_window_nll: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def window_nll(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of each window of ``ids`` [B, T] and the number of targets."""
    logits = model(ids).logits
    shift = logits[:, :-1, :].float()
    tgt = ids[:, 1:].to(shift.device)
    nll = F.cross_entropy(shift.reshape(-1, shift.size(-1)), tgt.reshape(-1), reduction="none")
    return nll.view(ids.size(0), -1).sum(dim=1), tgt.size(1)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    start: int = 0,
    on_window_start: Optional[Callable[[int], None]] = None,
    on_window_end: Optional[Callable[[int, float, int], None]] = None,
    prior: tuple[float, int, list] = (0.0, 0, []),
    desc: str = "perplexity",
) -> PPLResult:
    """PPL = exp(sum of token cross-entropies / number of scored targets) over ``windows`` [N, T].

    Windows ``< start`` are taken as already scored (``prior`` = (nll_sum, targets, per-window nll)),
    which is how a resumed extraction run reports the perplexity of the whole stream.
    Callbacks are called per window (only with ``batch_size == 1`` for ``on_window_start``).
    """
    if on_window_start is not None and batch_size != 1:
        raise ValueError("per-window callbacks need batch_size 1")
    device = next(model.parameters()).device
    nll_sum, n_tgt, per_window = float(prior[0]), int(prior[1]), list(prior[2])
    n = windows.size(0)
    t0 = time.perf_counter()
    processed = 0
    bar = tqdm(total=n, initial=start, desc=desc, unit="win", dynamic_ncols=True, disable=None)
    for i in range(start, n, batch_size):
        ids = windows[i : i + batch_size].to(device)
        if on_window_start is not None:
            on_window_start(i)
        nll, tcount = window_nll(model, ids)
        for j, v in enumerate(nll.tolist()):
            per_window.append(v)
            nll_sum += v
            n_tgt += tcount
            if on_window_end is not None:
                on_window_end(i + j, v, tcount)
        processed += ids.numel()
        bar.update(ids.size(0))
        bar.set_postfix(ppl=f"{math.exp(nll_sum / max(n_tgt, 1)):.3f}")
    bar.close()
    secs = time.perf_counter() - t0
    ppl = math.exp(nll_sum / n_tgt) if n_tgt else float("nan")
    return PPLResult(ppl=ppl, nll_sum=nll_sum, tokens=n_tgt, windows=n, seconds=secs,
                     tokens_per_s=processed / secs if secs > 0 else float("nan"), per_window_nll=per_window)


class measure_sparsity:
    """Context manager attaching a :class:`SparsityMeter` to a sparsified model."""

    def __init__(self, model: torch.nn.Module, num_layers: int) -> None:
        self.model, self.meter = model, SparsityMeter(num_layers)

    def __enter__(self) -> SparsityMeter:
        add_observer(self.model, self.meter)
        return self.meter

    def __exit__(self, *exc) -> None:
        remove_observer(self.model, self.meter)


def run_lm_eval(model, tokenizer, tasks: list[str], *, batch_size: int = 1, num_fewshot: int = 0,
                limit: Optional[float] = None, include_path: Optional[str] = None) -> dict:
    """Evaluate the (patched) model with lm-eval 0.4 through ``HFLM(pretrained=<model instance>)``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    res = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                          log_samples=False)
    if res is None:
        raise RuntimeError("lm-eval returned no results")
    return {"results": res.get("results", {}), "versions": res.get("versions", {}),
            "n-shot": res.get("n-shot", {}), "configs_tasks": list(res.get("configs", {}).keys())}
