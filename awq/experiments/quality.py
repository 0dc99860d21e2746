"""A second quality measure beside perplexity: divergence from the dense model on the same tokens.

For every scored prediction (the tokens perplexity scores, under the evaluation protocol of
:mod:`awq.methods.protocol`) with dense next-token distribution ``p`` and the sparsified model's ``q``:

* ``kl``: mean over the scored tokens of ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` (nats), and
* ``top1``: the share of scored tokens whose most likely next token under ``q`` is the dense one's,

as llama.cpp's perplexity tool reports them for a quantised model against the original.

**The dense reference** (:class:`DenseReference`) is computed once per window and cached on disk, never per
point: the dense log-softmax of every position as float16 ``[T-1, V]`` (the full distribution: KL needs
it; Qwen2.5: 151,936 x 2,047 x 2 bytes = 622 MB per 2048-token window, SmolLM2 201 MB), memory-mapped when
read, plus the dense top-1 token of each position taken from the float32 logits (so a rounding tie in
float16 never counts as a disagreement).  Read back, each row is renormalised (``log p - logsumexp(log p)``),
so the reference is a proper distribution and ``KL >= 0`` exactly; the float16 rounding itself costs a KL
of order 1e-6 nats (dense against its own reference, ``tests/test_quality.py``).  A window's entry is keyed
by ``sha256(weights id, dtype, token ids)``: ``<key>.logp.npy`` then ``<key>.json`` (top-1 list and the
key's parts), each written atomically, the JSON last (an entry without its JSON is not there).  The dense
model over a whole window is the same function under every protocol, so one reference serves all of them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from awq.load.arch import decoder_layers, is_swapped
from awq.methods.base import base_mlp
from awq.methods.protocol import Protocol, window_logits
from awq.util.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

ROWS = 256  # positions scored per chunk (bounds the float32 [rows, V] temporaries: Qwen2.5 ~155 MB)
FORMAT = "awq-dense-reference-v1"


class QualityError(ValueError):
    """A missing / mismatched dense reference or a bad evaluation setting (one line)."""


@contextlib.contextmanager
def dense_mlps(model: nn.Module) -> Iterator[None]:
    """Every decoder layer runs its original MLP inside the ``with`` block; the swapped modules come back after."""
    saved = [(layer, layer.mlp) for layer in decoder_layers(model) if is_swapped(layer.mlp)]
    for layer, mod in saved:
        layer.mlp = base_mlp(mod)
    try:
        yield
    finally:
        for layer, mod in saved:
            layer.mlp = mod


def weights_id(weights_sha256: str, dtype: str) -> str:
    """What a dense reference is keyed by besides the token ids."""
    return f"{weights_sha256}|{dtype}"


class DenseReference:
    """Cached dense next-token log-probabilities of token windows (see the module docstring)."""

    def __init__(self, folder: "str | Path", weights: str) -> None:
        self.folder = Path(folder)
        self.weights = str(weights)

    def key(self, ids: torch.Tensor) -> str:
        h = hashlib.sha256(f"{FORMAT}\n{self.weights}\n{ids.numel()}\n".encode())
        h.update(ids.detach().reshape(-1).to(torch.int64).cpu().numpy().astype("<i8").tobytes())
        return h.hexdigest()

    def _paths(self, ids: torch.Tensor) -> tuple[Path, Path]:
        k = self.key(ids)[:40]
        return self.folder / f"{k}.logp.npy", self.folder / f"{k}.json"

    def has(self, ids: torch.Tensor) -> bool:
        return self._paths(ids)[1].is_file()

    @torch.no_grad()
    def ensure(self, model: nn.Module, windows: torch.Tensor, desc: str = "dense reference") -> int:
        """Compute and store the entries of ``windows [N, T]`` not cached yet, with every MLP's original
        (dense) module (a sparsified model gets its swapped modules back afterwards); returns how many
        were computed."""
        todo = [i for i in range(windows.size(0)) if not self.has(windows[i])]
        if not todo:
            return 0
        self.folder.mkdir(parents=True, exist_ok=True)
        device = next(model.parameters()).device
        with dense_mlps(model):
            for i in tqdm(todo, desc=desc, unit="win", dynamic_ncols=True, disable=None):
                self._store(model, windows[i], device)
        log.info("dense reference: %d window(s) computed into %s", len(todo), self.folder)
        return len(todo)

    def _store(self, model: nn.Module, window: torch.Tensor, device) -> None:
        logits = model(window[None].to(device), use_cache=False).logits[0, :-1]  # [T-1, V]
        logp = np.empty(tuple(logits.shape), dtype=np.float16)
        top1 = torch.empty(logits.size(0), dtype=torch.int64)
        for a in range(0, logits.size(0), ROWS):
            chunk = logits[a : a + ROWS].float()
            logp[a : a + ROWS] = F.log_softmax(chunk, dim=-1).cpu().numpy().astype(np.float16)
            top1[a : a + ROWS] = chunk.argmax(-1).cpu()
        del logits
        npy, meta = self._paths(window)
        with atomic_path(npy, "dense reference") as tmp, open(tmp, "wb") as f:
            np.save(f, logp)
        atomic_write_json(meta, {"format": FORMAT, "key": self.key(window), "weights": self.weights,
                                 "tokens": int(window.numel()), "vocab": int(logp.shape[1]), "top1": top1.tolist()},
                          "dense reference", indent=None)

    def load(self, ids: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """``(log p [T-1, V] float16, memory-mapped; dense top-1 [T-1] int64)`` of one window ``ids [T]``."""
        npy, meta = self._paths(ids)
        if not meta.is_file():
            raise QualityError(f"no dense reference for this window in {self.folder} (DenseReference.ensure first)")
        try:
            m = json.loads(meta.read_text())
            logp = np.load(npy, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise QualityError(f"dense reference {npy} is unreadable ({e}); delete it to recompute") from None
        if m.get("format") != FORMAT or m.get("key") != self.key(ids) or logp.shape != (ids.numel() - 1, m["vocab"]):
            raise QualityError(f"dense reference {meta} does not match this window; delete it to recompute")
        return logp, torch.tensor(m["top1"], dtype=torch.int64)


@dataclass
class QualityResult:
    ppl: float
    nll_sum: float
    tokens: int  # scored targets (all windows)
    windows: int
    seconds: float
    tokens_per_s: float  # input tokens processed per second
    protocol: str
    kl: Optional[float] = None  # mean KL(dense || model) over the scored tokens, nats (None: no reference)
    top1: Optional[float] = None  # share of scored tokens whose argmax equals the dense argmax
    per_window_nll: list = field(default_factory=list)
    per_window_kl: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def score_chunk(logits: torch.Tensor, targets: torch.Tensor, ref_logp: Optional[np.ndarray] = None,
                ref_top1: Optional[torch.Tensor] = None) -> tuple[float, float, int]:
    """``(sum NLL, sum KL(ref || q), top-1 agreements)`` of rows ``logits [n, V]`` with ``targets [n]`` and
    the reference rows (``ref_logp [n, V]`` float16, ``ref_top1 [n]``; KL/top-1 are 0 without them)."""
    lq = F.log_softmax(logits.float(), dim=-1)
    nll = -float(lq.gather(-1, targets.reshape(-1, 1).to(lq.device)).double().sum())
    if ref_logp is None:
        return nll, 0.0, 0
    lp = torch.from_numpy(np.asarray(ref_logp, dtype=np.float32)).to(lq.device)
    lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
    kl = float((lp.exp() * (lp - lq)).double().sum(-1).clamp(min=0.0).sum())  # >= 0 (float32 rounding: -1e-9)
    hits = int((lq.argmax(-1).cpu() == ref_top1.reshape(-1)).sum())
    return nll, kl, hits


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, *, protocol: "Protocol | str | None" = None,
             reference: Optional[DenseReference] = None, batch_size: int = 1, desc: str = "quality") -> QualityResult:
    """Perplexity (and, with ``reference``, KL and top-1 agreement against dense) of ``model`` on
    ``windows [N, T]`` under ``protocol`` (:mod:`awq.methods.protocol`; default standard), on the same tokens."""
    proto = Protocol.parse(protocol).check(windows.size(1))
    device = next(model.parameters()).device
    s = proto.first_scored
    nll_sum = kl_sum = 0.0
    hits = n_tgt = processed = 0
    per_nll, per_kl = [], []
    t0 = time.perf_counter()
    bar = tqdm(total=windows.size(0), desc=desc, unit="win", dynamic_ncols=True, disable=None)
    for i in range(0, windows.size(0), batch_size):
        ids = windows[i : i + batch_size].to(device)
        logits = window_logits(model, ids, proto)  # [B, T-1-s, V]
        for b in range(ids.size(0)):
            tgt = ids[b, s + 1 :]
            ref = reference.load(windows[i + b]) if reference is not None else None
            w_nll = w_kl = 0.0
            for a in range(0, tgt.numel(), ROWS):
                rows = slice(a, a + ROWS)
                if ref is None:
                    n, k, h = score_chunk(logits[b, rows], tgt[rows])
                else:
                    n, k, h = score_chunk(logits[b, rows], tgt[rows], ref[0][s + a : s + a + ROWS],
                                          ref[1][s + a : s + a + ROWS])
                w_nll, w_kl, hits = w_nll + n, w_kl + k, hits + h
            per_nll.append(w_nll)
            per_kl.append(w_kl / tgt.numel() if ref is not None else None)
            nll_sum, kl_sum, n_tgt = nll_sum + w_nll, kl_sum + w_kl, n_tgt + tgt.numel()
        del logits
        processed += ids.numel()
        bar.update(ids.size(0))
        bar.set_postfix(ppl=f"{math.exp(nll_sum / max(n_tgt, 1)):.3f}")
    bar.close()
    secs = time.perf_counter() - t0
    with_ref = reference is not None and n_tgt > 0
    return QualityResult(ppl=math.exp(nll_sum / n_tgt) if n_tgt else float("nan"), nll_sum=nll_sum, tokens=n_tgt,
                         windows=windows.size(0), seconds=secs,
                         tokens_per_s=processed / secs if secs > 0 else float("nan"), protocol=proto.name,
                         kl=kl_sum / n_tgt if with_ref else None, top1=hits / n_tgt if with_ref else None,
                         per_window_nll=per_nll, per_window_kl=per_kl if reference is not None else [])
