"""Train the per-layer cluster predictor on a pattern store recorded with ``--dump_inputs``.

Targets are the oracle labels (largest overlap with the token's true mask); each layer's net
(:class:`_LayerNet`, see :mod:`awq.methods.label_predictor` for the architecture) is trained with Adam and a
cosine schedule on standardised rows, then exported with the standardisation folded into
``W1``/``b1``.  A run is deterministic for a seed and resumable: after every layer the finished
layers go to ``<output>.partial`` (through :mod:`awq.util.io`), which a rerun with the same
configuration continues from.

CLI: ``python -m awq.predictor train --masks TRAIN_STORE --centroids gate=F,up=F,down=F --output P``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from awq.load.arch import PROJS
from awq.methods.codebook import parse_centroid_spec
from awq.methods.label_predictor import (
    ACT_FNS,
    ACTS,
    FORMAT,
    FORMAT_VERSION,
    TRUNKS,
    ClusterPredictor,
    PredictorError,
    auto_rank,
    most_frequent,
    predictor_cost,
    save_tensors,
)
from awq.predictor.evaluate import EvalCounts, block_overlaps, input_rows
from awq.store.centroids import load_centroids
from awq.store.pattern_store import PatternStore
from awq.store.thresholds import file_sha256
from awq.util.cli import opt
from awq.util.io import check_not_input, check_output_path, output_lock

log = logging.getLogger("awq.methods.label_predictor")

LOSSES = ("ce", "coverage")


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
        self.act = ACT_FNS[act]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.act(self.w1(x))
        return {p: h(z[:, self.slices[p]]) for p, h in self.heads.items()}


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
        for a, b, A, ov in block_overlaps(packed, store.widths[p], cf, cfg.block_rows):
            lab[a:b] = torch.argmax(ov, dim=1)
            if topv is not None:
                v, i = ov.topk(m, dim=1)
                topv[a:b], topi[a:b] = v / A.sum(1, keepdim=True).clamp(min=1), i
        out[p] = {"labels": lab, "packed": packed, "topv": topv, "topi": topi}
    return out


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
    check_output_path(output, "predictor")
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
        x = input_rows(store, layer, ids)
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
                c = EvalCounts()
                cf = cents[p].float()
                maj = most_frequent(counts[p], 5)
                packed = targets[p]["packed"][va.numpy()]
                for a, b, A, ov in block_overlaps(packed, store.widths[p], cf, cfg.block_rows):
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


@dataclass
class TrainOptions:
    """Options of ``python -m awq.predictor train`` (each field one option, checked by its declaration)."""

    masks: str = opt(help="pattern store directory recorded with --dump_masks --dump_inputs", kind="in_dir")
    centroids: str = opt(help="gate=FILE,up=FILE,down=FILE (any subset) or a directory", kind="centroids",
                         check=parse_centroid_spec)
    output: str = opt(help="predictor file to write (.safetensors)", kind="out_file")
    rank: Optional[int] = opt(None, help="bottleneck rank r (default: largest within --budget)", min=1)
    trunk: str = opt("separate", choices=TRUNKS, help="separate x->r per projection, or one shared x->r trunk "
                     "(default separate)")
    act: str = opt("none", choices=ACTS, help="activation after the x->r layer (default none)")
    loss: str = opt("ce", choices=LOSSES, help="ce: cross-entropy on the oracle label; coverage: 1 - expected recall "
                    "over the top-m clusters + 0.1 ce (default ce)")
    epochs: int = opt(8, help="passes over the sampled rows (default 8)", min=1)
    batch_size: int = opt(512, help="rows per Adam step (default 512)", min=1)
    lr: float = opt(3e-3, help="Adam learning rate, cosine decay (default 3e-3)", gt=0)
    weight_decay: float = opt(0.0, help="Adam weight decay (default 0)", min=0)
    max_rows: int = opt(65536, help="token rows sampled per layer; memory bound (default 65536; 0 = all)", min=0)
    val_fraction: float = opt(0.05, help="held-out share of the rows for the logged validation metrics, a fraction "
                              "in [0, 1) (default 0.05)", min=0, lt=1, kind="fraction")
    top_m: int = opt(32, help="clusters per row kept for the coverage loss (default 32)", min=1)
    budget: float = opt(0.05, help="cost budget as a fraction of the MLP, in (0, 1], for the default rank "
                        "(default 0.05)", gt=0, max=1, kind="fraction")
    seed: int = opt(0, help="seed for sampling, init and shuffling (default 0)", kind="seed")
    log_level: str = opt("INFO", help="logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def run_train_cli(args: TrainOptions) -> int:
    inputs = [args.masks, *parse_centroid_spec(args.centroids).values()]
    check_output_path(args.output, "predictor")  # before the work: writable, not an input, not in use
    check_not_input(args.output, inputs, "predictor")
    with output_lock(args.output, "predictor", folder=False):
        return _run_train(args)


def _run_train(args: TrainOptions) -> int:
    cfg = TrainConfig(rank=args.rank, trunk=args.trunk, act=args.act, loss=args.loss, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      max_rows=args.max_rows or None, val_fraction=args.val_fraction, top_m=args.top_m,
                      budget=args.budget, seed=args.seed)
    meta = train(args.masks, args.centroids, args.output, cfg)
    c = meta["cost"]
    print(f"wrote {args.output}: rank={meta['rank']} trunk={meta['trunk']} K={meta['k']} "
          f"cost={100 * c['flop_fraction']:.2f}% of MLP MACs ({100 * c['param_fraction']:.2f}% of params)")
    return 0
