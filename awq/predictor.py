"""Cluster predictor: choose each token's centroid from the MLP input, before the MLP runs (issue 6).

Per decoder layer a small network maps the MLP input ``x`` (the post-attention-norm hidden state,
recorded in a pattern store with ``--dump_inputs``) to one of the ``K`` centroids of each
projection.  The target is the oracle label of the paper: the nearest centroid of the token's true
mask ``A`` under the active-only distance (= largest overlap ``|A & C_k|``, ties to the lowest
index, :func:`awq.centroids.assign_active_only`).

Architecture (per layer), a low-rank head over the standardised input::

    z = act(W1 x + b1)                 W1: [R, H]   (R = r with a shared trunk, 3r with separate ones)
    logits_p = W2_p z[slice_p] + b2_p  W2_p: [K_p, r]

``trunk="separate"`` gives every projection its own ``x -> r -> K`` head (its own slice of
``W1``); ``trunk="shared"`` shares one ``x -> r`` trunk.  The input standardisation (mean/std of
the training rows) is folded into ``W1``/``b1`` when saving, so inference is two small GEMMs.
The cost per token and layer is ``R*H + r*sum(K_p)`` multiply-accumulates against ``3*H*I`` for
the MLP (:func:`predictor_cost`); ``--rank`` defaults to the largest rank within ``--budget``
(5%) of the MLP's MACs and parameters.

Files are safetensors: tensors ``layers.<l>.w1/b1`` and ``layers.<l>.<proj>.w2/b2/counts``
(``counts``: training label frequencies, which give the majority-class baseline) and the JSON
metadata under the key ``awq_predictor`` (model, hidden, num_layers, widths, K, rank, trunk,
activation, the centroid files and their sha256, the training store, the training config and
per-layer validation metrics).

CLI::

    python -m awq.predictor train --masks TRAIN_STORE --centroids gate=F,up=F,down=F --output P.safetensors
    python -m awq.predictor evaluate --masks TEST_STORE --predictor P.safetensors [--output eval.json]

In :mod:`awq.entry`, ``--predictor FILE`` runs the codebooks in mode ``predicted`` with the label
functions of :func:`load_predictor`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from awq.centroids import load_centroids
from awq.sparse_mlp import PROJS, decoder_layers
from awq.thresholds import file_sha256

log = logging.getLogger("awq.predictor")

FORMAT = "awq-cluster-predictor"
FORMAT_VERSION = 1
TRUNKS = ("separate", "shared")
ACTS = ("none", "relu", "gelu")
LOSSES = ("ce", "coverage")
LabelFn = Callable[[torch.Tensor, int], torch.Tensor]
_ACT_FN = {"none": lambda z: z, "relu": F.relu, "gelu": F.gelu}


class PredictorError(ValueError):
    """A predictor file is missing, malformed, or does not fit the model / centroids / store."""


# --------------------------------------------------------------------------------------------
# cost model
# --------------------------------------------------------------------------------------------
def mlp_cost(hidden: int, intermediate: int) -> int:
    """MACs (= weights) of one SwiGLU MLP per token: gate and up ``H x I``, down ``I x H``."""
    return 3 * hidden * intermediate


def predictor_cost(hidden: int, intermediate: int, ks: dict[str, int], rank: int, trunk: str) -> dict:
    """MACs and parameters of one layer's predictor per token, absolute and as a fraction of the MLP's."""
    r_total = rank if trunk == "shared" else rank * len(ks)
    macs = r_total * hidden + rank * sum(ks.values())
    params = macs + r_total + sum(ks.values())
    mlp = mlp_cost(hidden, intermediate)
    return {"macs": macs, "params": params, "mlp_macs": mlp, "mlp_params": mlp,
            "flop_fraction": macs / mlp, "param_fraction": params / mlp}


def auto_rank(hidden: int, intermediate: int, ks: dict[str, int], trunk: str, budget: float) -> int:
    """Largest rank whose MAC and parameter fractions both stay within ``budget``."""
    per = predictor_cost(hidden, intermediate, ks, 1, trunk)
    fixed = sum(ks.values())  # output biases
    r = int((budget * per["mlp_params"] - fixed) // (per["params"] - fixed))
    while r > 0 and max(predictor_cost(hidden, intermediate, ks, r, trunk)[f] for f in
                        ("flop_fraction", "param_fraction")) > budget:
        r -= 1
    if r < 1:
        raise PredictorError(f"a predictor for K={ks} does not fit a budget of {budget:.1%} of the MLP even at rank 1")
    return min(r, hidden)


# --------------------------------------------------------------------------------------------
# the runtime predictor (file format)
# --------------------------------------------------------------------------------------------
class ClusterPredictor:
    """Per-layer low-rank cluster heads; ``labels(x, layer, proj)`` -> centroid ids."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.meta = meta
        try:
            self.hidden, self.num_layers = int(meta["hidden"]), int(meta["num_layers"])
            self.rank, self.trunk, self.act = int(meta["rank"]), str(meta["trunk"]), str(meta["act"])
            self.ks = {p: int(k) for p, k in meta["k"].items()}
            self.widths = {p: int(w) for p, w in meta["widths"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise PredictorError(f"predictor metadata is incomplete: {type(e).__name__} {e}") from None
        if self.trunk not in TRUNKS or self.act not in ACTS or not self.ks or any(p not in PROJS for p in self.ks):
            raise PredictorError(f"predictor metadata has bad trunk/act/projections: {self.trunk}, {self.act}, "
                                 f"{sorted(self.ks)}")
        self.projs = [p for p in PROJS if p in self.ks]
        r_total = self.rank if self.trunk == "shared" else self.rank * len(self.projs)
        self.slices = {p: slice(0, self.rank) if self.trunk == "shared" else slice(i * self.rank, (i + 1) * self.rank)
                       for i, p in enumerate(self.projs)}
        want = {}
        for l in range(self.num_layers):
            want[f"layers.{l}.w1"] = (r_total, self.hidden)
            want[f"layers.{l}.b1"] = (r_total,)
            for p in self.projs:
                want[f"layers.{l}.{p}.w2"] = (self.ks[p], self.rank)
                want[f"layers.{l}.{p}.b2"] = (self.ks[p],)
                want[f"layers.{l}.{p}.counts"] = (self.ks[p],)
        for name, shape in want.items():
            if name not in tensors:
                raise PredictorError(f"predictor file lacks tensor '{name}'")
            if tuple(tensors[name].shape) != shape:
                raise PredictorError(f"predictor tensor '{name}' has shape {tuple(tensors[name].shape)}, "
                                     f"metadata implies {shape}")
        extra = sorted(set(tensors) - set(want))
        if extra:
            raise PredictorError(f"predictor file holds unexpected tensors, e.g. '{extra[0]}'")
        self.tensors = {n: t.contiguous() for n, t in tensors.items()}
        self._cache: Optional[tuple] = None

    # -- io -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "ClusterPredictor":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise PredictorError(f"predictor file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                md = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise PredictorError(f"predictor file {path} is not a readable safetensors file: {e}") from None
        if md.get("format") != FORMAT:
            raise PredictorError(f"{path} is not a cluster predictor file (metadata format={md.get('format')!r})")
        try:
            meta = json.loads(md.get("awq_predictor", ""))
        except json.JSONDecodeError as e:
            raise PredictorError(f"{path}: predictor metadata is not valid JSON: {e}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise PredictorError(f"{path}: unsupported predictor format_version {meta.get('format_version')!r}")
        return cls(tensors, meta)

    def save(self, path: str | Path) -> None:
        save_tensors(path, {n: t.cpu() for n, t in self.tensors.items()}, self.meta)

    def to(self, device) -> "ClusterPredictor":
        self.tensors = {n: t.to(device) for n, t in self.tensors.items()}
        self._cache = None
        return self

    # -- inference ----------------------------------------------------------------------------
    def trunk_out(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """``act(W1 x + b1)`` for ``x [..., H]`` -> ``[n, R]`` (fp32); reused across projections of one call."""
        c = self._cache
        if c is not None and c[0] == layer and c[1]() is x and c[2] == x._version:
            return c[3]
        w1, b1 = self.tensors[f"layers.{layer}.w1"], self.tensors[f"layers.{layer}.b1"]
        z = _ACT_FN[self.act](torch.addmm(b1, x.reshape(-1, x.shape[-1]).to(w1.device, w1.dtype), w1.T))
        self._cache = (layer, weakref.ref(x), x._version, z)
        return z

    def logits(self, x: torch.Tensor, layer: int, proj: str) -> torch.Tensor:
        if x.shape[-1] != self.hidden:
            raise PredictorError(f"predictor expects inputs of width {self.hidden}, got {x.shape[-1]}")
        if not 0 <= layer < self.num_layers:
            raise PredictorError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        z = self.trunk_out(x, layer)[:, self.slices[proj]]
        return torch.addmm(self.tensors[f"layers.{layer}.{proj}.b2"], z, self.tensors[f"layers.{layer}.{proj}.w2"].T)

    @torch.no_grad()
    def labels(self, x: torch.Tensor, layer: int, proj: str) -> torch.Tensor:
        return torch.argmax(self.logits(x, layer, proj), dim=1).reshape(x.shape[:-1]).to(x.device)

    def label_fn(self, proj: str) -> LabelFn:
        if proj not in self.ks:
            raise PredictorError(f"predictor has no head for {proj} (it has {self.projs})")
        return lambda x, layer_idx: self.labels(x, layer_idx, proj)

    def majority(self, layer: int, proj: str, k: int = 1) -> torch.Tensor:
        """The ``k`` most frequent training labels (ties -> lowest index)."""
        return _most_frequent(self.tensors[f"layers.{layer}.{proj}.counts"], k)

    def cost(self) -> dict:
        return predictor_cost(self.hidden, int(self.meta["intermediate"]), self.ks, self.rank, self.trunk)


def _most_frequent(counts: torch.Tensor, k: int) -> torch.Tensor:
    return torch.argsort(-counts.cpu().double(), stable=True)[:k]


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a predictor file atomically (tmp file + os.replace)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({n: t.contiguous() for n, t in tensors.items()}, tmp,
                  metadata={"format": FORMAT, "awq_predictor": json.dumps(meta, default=str)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# model-side loading (used by awq.entry --predictor)
# --------------------------------------------------------------------------------------------
def check_centroids(pred: ClusterPredictor, spec: str) -> dict:
    """Check the centroid sets named by ``spec`` are the ones the predictor was trained with."""
    from awq.codebook import parse_centroid_spec

    out = {}
    for proj, path in parse_centroid_spec(spec).items():
        if proj not in pred.ks:
            raise PredictorError(f"--centroids names {proj} but the predictor has no head for it (has {pred.projs})")
        c, _ = load_centroids(path, pred.widths[proj])
        if c.shape[0] != pred.ks[proj]:
            raise PredictorError(f"predictor {proj} head has K={pred.ks[proj]} but centroid file {path} has "
                                 f"K={c.shape[0]}")
        sha, want = file_sha256(path), pred.meta["centroids"][proj]["sha256"]
        if sha != want:
            raise PredictorError(f"centroid file {path} (sha256 {sha[:12]}) is not the {proj} set the predictor "
                                 f"was trained with (sha256 {want[:12]}, {pred.meta['centroids'][proj]['path']})")
        out[proj] = {"path": str(path), "sha256": sha, "k": int(c.shape[0])}
    return out


def load_predictor(path: str | Path, model: nn.Module, centroids: Optional[str] = None
                   ) -> tuple[dict[str, LabelFn], dict]:
    """-> (``{proj: fn(x, layer_idx) -> labels}``, info for the results JSON).

    Raises :class:`PredictorError` when the file does not fit the model (hidden size, layer count,
    projection widths) or, with ``centroids`` (a ``--centroids`` spec), when a centroid set's K or
    sha256 differs from the training one.  ``info["centroids_spec"]`` names the training
    centroid files (a default for ``--centroids``).
    """
    pred = ClusterPredictor.load(path)
    layers = decoder_layers(model)
    mlp = layers[0].mlp
    hidden = mlp.gate_proj.in_features
    name = pred.meta.get("model")
    if pred.hidden != hidden:
        raise PredictorError(f"predictor {path} is for hidden size {pred.hidden} (model {name}) but the model has "
                             f"hidden size {hidden}")
    if pred.num_layers != len(layers):
        raise PredictorError(f"predictor {path} has {pred.num_layers} layers (model {name}) but the model has "
                             f"{len(layers)} decoder layers")
    for p in pred.projs:
        w = getattr(mlp, p).out_features
        if pred.widths[p] != w:
            raise PredictorError(f"predictor {path} {p} width {pred.widths[p]} != model's {w}")
    spec = ",".join(f"{p.split('_')[0]}={pred.meta['centroids'][p]['path']}" for p in pred.projs)
    checked = check_centroids(pred, centroids) if centroids else None
    device = next(model.parameters()).device
    pred.to(device)
    info = {"path": str(path), "sha256": file_sha256(path), "model": name, "rank": pred.rank, "trunk": pred.trunk,
            "act": pred.act, "k": pred.ks, "cost": pred.cost(), "centroids": pred.meta["centroids"],
            "centroids_spec": spec, "centroids_checked": checked, "train": pred.meta.get("train")}
    log.info("predictor %s: rank %d (%s trunk), K=%s, %.2f%% of the MLP's MACs", path, pred.rank, pred.trunk,
             pred.ks, 100 * info["cost"]["flop_fraction"])
    return {p: pred.label_fn(p) for p in pred.projs}, info


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    rank: Optional[int] = None
    trunk: str = "separate"
    act: str = "none"
    loss: str = "ce"
    epochs: int = 8
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_rows: Optional[int] = 65536
    val_fraction: float = 0.05
    top_m: int = 32
    budget: float = 0.05
    seed: int = 0
    block_rows: int = 8192

    def __post_init__(self) -> None:
        if self.trunk not in TRUNKS:
            raise PredictorError(f"--trunk must be one of {TRUNKS}, got {self.trunk!r}")
        if self.act not in ACTS:
            raise PredictorError(f"--act must be one of {ACTS}, got {self.act!r}")
        if self.loss not in LOSSES:
            raise PredictorError(f"--loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("epochs", "batch_size", "top_m", "block_rows"):
            if getattr(self, name) < 1:
                raise PredictorError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.rank is not None and self.rank < 1:
            raise PredictorError(f"--rank must be >= 1, got {self.rank}")
        if self.max_rows is not None and self.max_rows < 2:
            raise PredictorError(f"--max_rows must be >= 2, got {self.max_rows}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise PredictorError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if not (self.lr > 0 and self.budget > 0):
            raise PredictorError("--lr and --budget must be positive")


class _LayerNet(nn.Module):
    def __init__(self, hidden: int, rank: int, ks: dict[str, int], trunk: str, act: str) -> None:
        super().__init__()
        projs = list(ks)
        self.w1 = nn.Linear(hidden, rank if trunk == "shared" else rank * len(projs))
        self.heads = nn.ModuleDict({p: nn.Linear(rank, ks[p]) for p in projs})
        self.slices = {p: slice(0, rank) if trunk == "shared" else slice(i * rank, (i + 1) * rank)
                       for i, p in enumerate(projs)}
        self.act = _ACT_FN[act]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.act(self.w1(x))
        return {p: h(z[:, self.slices[p]]) for p, h in self.heads.items()}


def _rows(store, layer: int, ids: np.ndarray) -> torch.Tensor:
    """fp32 MLP inputs of the sorted token ids of one layer."""
    arr = store.inputs(layer)
    x = arr[ids[0]: ids[-1] + 1] if len(ids) and ids[-1] - ids[0] + 1 == len(ids) else arr[ids]
    return torch.from_numpy(np.array(x, dtype=np.float32))


def _overlaps(packed: np.ndarray, width: int, cf: torch.Tensor, block: int):
    """Yield ``(a, b, A [b-a, F] float, ov [b-a, K])`` with ``ov = A @ C.T`` for blocks of packed rows."""
    from awq.masks import unpack

    for a in range(0, packed.shape[0], block):
        A = unpack(packed[a: a + block], width)
        yield a, a + A.shape[0], A, A @ cf.T


def _layer_targets(store, layer: int, ids: np.ndarray, cents: dict[str, torch.Tensor], cfg: TrainConfig) -> dict:
    """Oracle labels (and top-m overlap fractions for the coverage loss) of the sampled rows."""
    out = {}
    for p, c in cents.items():
        cf = c.float()
        packed = store.read_rows(p, ids, layer=layer)
        n, m = len(ids), min(cfg.top_m, c.shape[0])
        lab = torch.empty(n, dtype=torch.long)
        topv = torch.empty(n, m) if cfg.loss == "coverage" else None
        topi = torch.empty(n, m, dtype=torch.long) if cfg.loss == "coverage" else None
        for a, b, A, ov in _overlaps(packed, store.widths[p], cf, cfg.block_rows):
            lab[a:b] = torch.argmax(ov, dim=1)
            if topv is not None:
                v, i = ov.topk(m, dim=1)
                topv[a:b], topi[a:b] = v / A.sum(1, keepdim=True).clamp(min=1), i
        out[p] = {"labels": lab, "packed": packed, "topv": topv, "topi": topi}
    return out


class _Counts:
    """Accumulates the evaluation sums of one (layer, projection)."""

    KEYS = ("rows", "active", "top1", "top1_optimal", "topk", "cov_pred", "cov_topk", "cov_oracle", "cov_majority",
            "cov_majority_topk", "top1_majority", "pred_density", "cells")

    def __init__(self) -> None:
        self.s = dict.fromkeys(self.KEYS, 0.0)

    def add(self, A: torch.Tensor, cf: torch.Tensor, ov: Optional[torch.Tensor], logits: torch.Tensor,
            maj: torch.Tensor, k: int) -> None:
        """``ov`` = A @ C.T (computed here when None); ``maj``: the k most frequent training labels."""
        if ov is None:
            ov = A @ cf.T
        k = min(k, ov.shape[1])
        best = ov.max(dim=1).values
        label = torch.argmax(ov, dim=1)  # first maximal index, as assign_active_only
        topk = logits.topk(k, dim=1).indices
        pred = topk[:, 0]
        cov_pred = ov.gather(1, pred[:, None])[:, 0]
        s = self.s
        s["rows"] += A.shape[0]
        s["active"] += float(A.sum())
        s["top1"] += float((pred == label).sum())
        s["top1_optimal"] += float((cov_pred == best).sum())
        s["topk"] += float((topk == label[:, None]).any(1).sum())
        s["cov_pred"] += float(cov_pred.sum())
        s["cov_topk"] += float(ov.gather(1, topk).max(1).values.sum())
        s["cov_oracle"] += float(best.sum())
        s["cov_majority"] += float(ov[:, maj[0]].sum())
        s["cov_majority_topk"] += float(ov[:, maj[:k]].max(1).values.sum())
        s["top1_majority"] += float((label == maj[0]).sum())
        s["pred_density"] += float(cf.sum(1)[pred].sum()) / cf.shape[1]
        s["cells"] += A.numel()

    def merge(self, other: "_Counts") -> None:
        for key in self.KEYS:
            self.s[key] += other.s[key]

    def metrics(self, k: int) -> dict:
        s = self.s
        n, act = max(s["rows"], 1.0), max(s["active"], 1.0)
        return {"rows": int(s["rows"]), "top1_acc": s["top1"] / n, f"top{k}_acc": s["topk"] / n,
                "top1_optimal": s["top1_optimal"] / n, "recall_pred": s["cov_pred"] / act,
                f"recall_best_of_top{k}": s["cov_topk"] / act, "recall_oracle": s["cov_oracle"] / act,
                "recall_majority": s["cov_majority"] / act, f"recall_majority_top{k}": s["cov_majority_topk"] / act,
                "top1_acc_majority": s["top1_majority"] / n, "pred_density": s["pred_density"] / n,
                "data_density": s["active"] / max(s["cells"], 1.0)}


def _train_layer(x: torch.Tensor, targets: dict, cfg: TrainConfig, rank: int, ks: dict[str, int],
                 layer: int) -> tuple[_LayerNet, torch.Tensor, torch.Tensor]:
    """Train one layer's net on standardised rows; -> (net, mean, std)."""
    mean = x.mean(0)
    std = x.std(0).clamp(min=1e-4)
    xn = (x - mean) / std
    torch.manual_seed(cfg.seed * 100003 + layer)
    net = _LayerNet(x.shape[1], rank, ks, cfg.trunk, cfg.act)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = x.shape[0]
    steps = cfg.epochs * math.ceil(n / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(cfg.seed * 7919 + layer)
    net.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for b0 in range(0, n, cfg.batch_size):
            idx = perm[b0: b0 + cfg.batch_size]
            out = net(xn[idx])
            loss = xn.new_zeros(())
            for p, lg in out.items():
                t = targets[p]
                ce = F.cross_entropy(lg, t["labels"][idx])
                if cfg.loss == "coverage":
                    prob = torch.softmax(lg, dim=1).gather(1, t["topi"][idx])
                    loss = loss + (1 - (prob * t["topv"][idx]).sum(1).mean()) + 0.1 * ce
                else:
                    loss = loss + ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        log.debug("layer %d epoch %d loss %.4f", layer, epoch, tot / n)
    net.eval()
    return net, mean, std


def _fold(net: _LayerNet, mean: torch.Tensor, std: torch.Tensor, layer: int, counts: dict) -> dict[str, torch.Tensor]:
    """Export one layer: standardisation folded into W1/b1."""
    with torch.no_grad():
        w1 = net.w1.weight / std
        b1 = net.w1.bias - w1 @ mean
        out = {f"layers.{layer}.w1": w1.contiguous(), f"layers.{layer}.b1": b1.contiguous()}
        for p, h in net.heads.items():
            out[f"layers.{layer}.{p}.w2"] = h.weight.detach().clone().contiguous()
            out[f"layers.{layer}.{p}.b2"] = h.bias.detach().clone().contiguous()
            out[f"layers.{layer}.{p}.counts"] = counts[p]
    return out


def train(masks: str | Path, centroids: str, output: str | Path, cfg: TrainConfig) -> dict:
    """Train one predictor per layer on a pattern store recorded with inputs; write ``output``; -> meta."""
    from awq.codebook import parse_centroid_spec
    from awq.masks import PatternStore

    store = PatternStore(masks)
    if not store.meta.get("record_inputs") or not store.hidden:
        raise PredictorError(f"pattern store {masks} has no MLP inputs: record it with --dump_inputs")
    if store.n_tokens < 2:
        raise PredictorError(f"pattern store {masks} holds {store.n_tokens} tokens; need at least 2")
    files = parse_centroid_spec(centroids)
    cents, cinfo = {}, {}
    for p in PROJS:
        if p in files:
            c, cmeta = load_centroids(files[p], store.widths[p])
            cents[p] = c
            cinfo[p] = {"path": str(Path(files[p]).resolve()), "sha256": file_sha256(files[p]), "k": int(c.shape[0]),
                        "density": float(c.float().mean())}
    ks = {p: int(c.shape[0]) for p, c in cents.items()}
    hidden, inter = int(store.hidden), int(store.widths["gate_proj"])
    rank = cfg.rank or auto_rank(hidden, inter, ks, cfg.trunk, cfg.budget)
    cost = predictor_cost(hidden, inter, ks, rank, cfg.trunk)
    if cost["flop_fraction"] > cfg.budget or cost["param_fraction"] > cfg.budget:
        log.warning("rank %d costs %.2f%% of the MLP's MACs (%.2f%% of its parameters), over the %.1f%% budget",
                    rank, 100 * cost["flop_fraction"], 100 * cost["param_fraction"], 100 * cfg.budget)
    n = store.n_tokens
    rng = np.random.default_rng(cfg.seed)
    ids = np.arange(n, dtype=np.int64) if cfg.max_rows is None or cfg.max_rows >= n else \
        np.sort(rng.choice(n, size=cfg.max_rows, replace=False)).astype(np.int64)
    is_val = np.zeros(len(ids), dtype=bool)
    n_val = int(round(cfg.val_fraction * len(ids)))
    if n_val:
        is_val[rng.choice(len(ids), size=n_val, replace=False)] = True
    tr, va = torch.from_numpy(np.flatnonzero(~is_val)), torch.from_numpy(np.flatnonzero(is_val))
    smeta = store.meta
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": smeta.get("model"), "hidden": hidden,
        "intermediate": inter, "num_layers": store.num_layers, "widths": {p: store.widths[p] for p in ks},
        "k": ks, "rank": rank, "trunk": cfg.trunk, "act": cfg.act, "cost": cost, "centroids": cinfo,
        "store": {"dir": str(Path(masks).resolve()), "tokens": n, **{k: smeta.get(k) for k in
                  ("model", "thresholds_sha256", "dataset", "dataset_source", "split", "dtype", "seqlen",
                   "corpus_sha256")}},
        "train": dataclasses.asdict(cfg) | {"rows_train": int(len(tr)), "rows_val": int(len(va))},
    }
    key = json.dumps({k: meta[k] for k in ("k", "rank", "trunk", "act", "centroids", "store", "train")},
                     sort_keys=True, default=str)
    output = Path(output)
    partial = output.with_name(output.name + ".partial")
    tensors: dict[str, torch.Tensor] = {}
    val_metrics: list = []
    if partial.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(partial), framework="pt") as f:
                pm = json.loads(f.metadata()["awq_predictor"])
                if pm.get("resume_key") == key:
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
                    val_metrics = pm["val_metrics"]
                    log.info("resuming predictor training at layer %d of %d", len(val_metrics), store.num_layers)
        except Exception as e:  # noqa: BLE001 - an unreadable partial file is simply retrained
            log.warning("ignoring unreadable partial file %s: %s", partial, e)
    log.info("training %d layer predictors: rank %d, %s trunk, act %s, loss %s, K=%s, %d train / %d val rows per "
             "layer; cost %.2f%% of the MLP's MACs, %.2f%% of its parameters", store.num_layers, rank, cfg.trunk,
             cfg.act, cfg.loss, ks, len(tr), len(va), 100 * cost["flop_fraction"], 100 * cost["param_fraction"])
    for layer in range(len(val_metrics), store.num_layers):
        t0 = time.perf_counter()
        x = _rows(store, layer, ids)
        targets = _layer_targets(store, layer, ids, cents, cfg)
        tr_t = {p: {k: (v[tr] if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for p, t in targets.items()}
        net, mean, std = _train_layer(x[tr], tr_t, cfg, rank, ks, layer)
        counts = {p: torch.bincount(targets[p]["labels"][tr], minlength=ks[p]).to(torch.int64) for p in ks}
        tensors.update(_fold(net, mean, std, layer, counts))
        lm = {}
        if len(va):
            with torch.no_grad():
                val_logits = net((x[va] - mean) / std)
            for p in ks:
                c = _Counts()
                cf = cents[p].float()
                maj = _most_frequent(counts[p], 5)
                for a, b, A, ov in _overlaps(targets[p]["packed"][va.numpy()], store.widths[p], cf, cfg.block_rows):
                    c.add(A, cf, ov, val_logits[p][a:b], maj, 5)
                lm[p] = c.metrics(5)
        val_metrics.append(lm)
        log.info("layer %d: %s (%.1fs)", layer, "  ".join(
            f"{p.split('_')[0]} top1 {m['top1_acc']:.3f} recall {m['recall_pred']:.3f} (oracle {m['recall_oracle']:.3f}"
            f", majority {m['recall_majority']:.3f})" for p, m in lm.items()) or "no validation rows",
            time.perf_counter() - t0)
        if layer + 1 < store.num_layers:
            save_tensors(partial, tensors, meta | {"resume_key": key, "val_metrics": val_metrics})
    meta["val_metrics"] = val_metrics
    ClusterPredictor(tensors, meta).save(output)
    partial.unlink(missing_ok=True)
    log.info("predictor written to %s", output)
    return meta


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
def evaluate(masks: str | Path, predictor: str | Path, centroids: Optional[str] = None, topk: int = 5,
             max_rows: Optional[int] = None, block_rows: int = 8192, seed: int = 0) -> dict:
    """Top-1/top-k accuracy and recall of true active neurons on a (test) store, vs oracle and majority."""
    from awq.masks import PatternStore

    pred = ClusterPredictor.load(predictor)
    store = PatternStore(masks)
    if not store.meta.get("record_inputs") or not store.hidden:
        raise PredictorError(f"pattern store {masks} has no MLP inputs: record it with --dump_inputs")
    if store.hidden != pred.hidden or store.num_layers != pred.num_layers:
        raise PredictorError(f"predictor {predictor} is for hidden {pred.hidden} / {pred.num_layers} layers but the "
                             f"store {masks} has hidden {store.hidden} / {store.num_layers} layers")
    spec = centroids or ",".join(f"{p.split('_')[0]}={pred.meta['centroids'][p]['path']}" for p in pred.projs)
    checked = check_centroids(pred, spec)
    cents = {p: load_centroids(checked[p]["path"], pred.widths[p])[0].float() for p in checked}
    n = store.n_tokens
    ids = np.arange(n, dtype=np.int64) if max_rows is None or max_rows >= n else \
        np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False)).astype(np.int64)
    per_layer = {p: [] for p in cents}
    total = {p: _Counts() for p in cents}
    t0 = time.perf_counter()
    with torch.no_grad():
        for layer in range(store.num_layers):
            counts = {p: _Counts() for p in cents}
            maj = {p: pred.majority(layer, p, topk) for p in cents}
            for b0 in range(0, len(ids), block_rows):
                bid = ids[b0: b0 + block_rows]
                x = _rows(store, layer, bid)
                for p, cf in cents.items():
                    packed = store.read_rows(p, bid, layer=layer)
                    for _, _, A, ov in _overlaps(packed, store.widths[p], cf, block_rows):
                        counts[p].add(A, cf, ov, pred.logits(x, layer, p), maj[p], topk)
            for p in cents:
                per_layer[p].append(counts[p].metrics(topk))
                total[p].merge(counts[p])
            log.info("layer %d: %s", layer, "  ".join(
                f"{p.split('_')[0]} top1 {per_layer[p][-1]['top1_acc']:.3f} recall {per_layer[p][-1]['recall_pred']:.3f}"
                for p in cents))
    return {"predictor": {"path": str(predictor), "sha256": file_sha256(predictor), "model": pred.meta.get("model"),
                          "rank": pred.rank, "trunk": pred.trunk, "act": pred.act, "k": pred.ks,
                          "train": pred.meta.get("train"), "train_store": pred.meta.get("store")},
            "cost": pred.cost(), "centroids": checked, "topk": topk,
            "store": {"dir": str(masks), "tokens": n, "rows_evaluated": int(len(ids)),
                      **{k: store.meta.get(k) for k in ("model", "dataset", "split", "thresholds_sha256")}},
            "overall": {p: total[p].metrics(topk) for p in cents}, "per_layer": per_layer,
            "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _fmt_eval(res: dict) -> list[str]:
    k = res["topk"]
    c = res["cost"]
    lines = [f"predictor rank={res['predictor']['rank']} trunk={res['predictor']['trunk']} K={res['predictor']['k']} "
             f"cost={100 * c['flop_fraction']:.2f}% of MLP MACs ({100 * c['param_fraction']:.2f}% of params)"]
    for p, m in res["overall"].items():
        lines.append(f"{p}: top1={m['top1_acc']:.4f} top{k}={m[f'top{k}_acc']:.4f} recall pred={m['recall_pred']:.4f} "
                     f"best_of_top{k}={m[f'recall_best_of_top{k}']:.4f} oracle={m['recall_oracle']:.4f} "
                     f"majority={m['recall_majority']:.4f} (top1 {m['top1_acc_majority']:.4f}) "
                     f"pred_density={m['pred_density']:.4f}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m awq.predictor", description="Train / evaluate the per-layer "
                                 "cluster predictor (MLP input -> centroid id per projection).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train on a pattern store recorded with --dump_inputs (train split)")
    t.add_argument("--masks", required=True, help="pattern store directory recorded with --dump_masks --dump_inputs")
    t.add_argument("--centroids", required=True, help="gate=FILE,up=FILE,down=FILE (any subset) or a directory")
    t.add_argument("--output", required=True, help="predictor file to write (.safetensors)")
    t.add_argument("--rank", type=int, default=None, help="bottleneck rank r (default: largest within --budget)")
    t.add_argument("--trunk", default="separate", choices=TRUNKS, help="separate x->r per projection, or one "
                   "shared x->r trunk (default separate)")
    t.add_argument("--act", default="none", choices=ACTS, help="activation after the x->r layer (default none)")
    t.add_argument("--loss", default="ce", choices=LOSSES, help="ce: cross-entropy on the oracle label; coverage: "
                   "1 - expected recall over the top-m clusters + 0.1 ce (default ce)")
    t.add_argument("--epochs", type=int, default=8, help="passes over the sampled rows (default 8)")
    t.add_argument("--batch_size", type=int, default=512, help="rows per Adam step (default 512)")
    t.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, cosine decay (default 3e-3)")
    t.add_argument("--weight_decay", type=float, default=0.0, help="Adam weight decay (default 0)")
    t.add_argument("--max_rows", type=int, default=65536, help="token rows sampled per layer; memory bound "
                   "(default 65536; 0 = all)")
    t.add_argument("--val_fraction", type=float, default=0.05, help="held-out share of the rows for the logged "
                   "validation metrics (default 0.05)")
    t.add_argument("--top_m", type=int, default=32, help="clusters per row kept for the coverage loss (default 32)")
    t.add_argument("--budget", type=float, default=0.05, help="cost budget as a fraction of the MLP, for the "
                   "default rank (default 0.05)")
    t.add_argument("--seed", type=int, default=0, help="seed for sampling, init and shuffling (default 0)")
    e = sub.add_parser("evaluate", help="accuracy and recall of active neurons on a (test) store")
    e.add_argument("--masks", required=True, help="pattern store recorded with --dump_inputs (test split)")
    e.add_argument("--predictor", required=True, help="predictor file (.safetensors)")
    e.add_argument("--centroids", default=None, help="centroid files (default: the ones recorded in the predictor; "
                   "must match their sha256)")
    e.add_argument("--topk", type=int, default=5, help="k for top-k accuracy and best-of-top-k recall (default 5)")
    e.add_argument("--max_rows", type=int, default=None, help="evaluate a seeded sample of N rows per layer "
                   "(default all)")
    e.add_argument("--output", default=None, help="write the results JSON here")
    for q in (t, e):
        q.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="logging level")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "train":
            cfg = TrainConfig(rank=args.rank, trunk=args.trunk, act=args.act, loss=args.loss, epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                              max_rows=args.max_rows or None, val_fraction=args.val_fraction, top_m=args.top_m,
                              budget=args.budget, seed=args.seed)
            meta = train(args.masks, args.centroids, args.output, cfg)
            c = meta["cost"]
            print(f"wrote {args.output}: rank={meta['rank']} trunk={meta['trunk']} K={meta['k']} "
                  f"cost={100 * c['flop_fraction']:.2f}% of MLP MACs ({100 * c['param_fraction']:.2f}% of params)")
        else:
            if args.topk < 1:
                raise PredictorError(f"--topk must be >= 1, got {args.topk}")
            res = evaluate(args.masks, args.predictor, args.centroids, args.topk, args.max_rows)
            if args.output:
                from awq.centroids import atomic_write_json

                atomic_write_json(res, args.output)
            for line in _fmt_eval(res):
                print(line)
    except (ValueError, FileNotFoundError) as e:  # PredictorError, StoreError, CentroidError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
