"""Evaluate a cluster predictor on a (test) pattern store: accuracy and recall of active neurons.

Per layer and projection, the oracle label is the centroid of largest overlap with the token's true
mask (ties to the lowest index, as :func:`awq.store.centroids.assign_active_only`).  Reported: top-1 and
top-k accuracy, the recall of true active neurons kept by the predicted centroid, by the best of
the top k, by the oracle and by the training majority class, and the predicted centroids' density.

CLI: ``python -m awq.predictor evaluate --masks TEST_STORE --predictor P.safetensors [--output J]``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from awq.kernels.hw import cpu_info
from awq.methods.codebook import parse_centroid_spec
from awq.methods.label_predictor import ClusterPredictor, PredictorError, check_centroids
from awq.store.bitpack import unpack
from awq.store.centroids import load_centroids
from awq.store.pattern_store import PatternStore
from awq.store.thresholds import file_sha256
from awq.util.cli import opt
from awq.util.io import atomic_write_json, check_not_input, check_output_path

log = logging.getLogger("awq.methods.label_predictor")


def input_rows(store, layer: int, ids: np.ndarray) -> torch.Tensor:
    """fp32 MLP inputs of the sorted token ids of one layer."""
    arr = store.inputs(layer)
    x = arr[ids[0]: ids[-1] + 1] if len(ids) and ids[-1] - ids[0] + 1 == len(ids) else arr[ids]
    return torch.from_numpy(np.array(x, dtype=np.float32))


def block_overlaps(packed: np.ndarray, width: int, cf: torch.Tensor, block: int):
    """Yield ``(a, b, A [b-a, F] float, ov [b-a, K])`` with ``ov = A @ C.T`` for blocks of packed rows."""

    for a in range(0, packed.shape[0], block):
        A = unpack(packed[a: a + block], width)
        yield a, a + A.shape[0], A, A @ cf.T


class EvalCounts:
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

    def merge(self, other: "EvalCounts") -> None:
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


def evaluate(masks: str | Path, predictor: str | Path, centroids: Optional[str] = None, topk: int = 5,
             max_rows: Optional[int] = None, block_rows: int = 8192, seed: int = 0) -> dict:
    """Top-1/top-k accuracy and recall of true active neurons on a (test) store, vs oracle and majority."""

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
    total = {p: EvalCounts() for p in cents}
    t0 = time.perf_counter()
    with torch.no_grad():
        for layer in range(store.num_layers):
            counts = {p: EvalCounts() for p in cents}
            maj = {p: pred.majority(layer, p, topk) for p in cents}
            for b0 in range(0, len(ids), block_rows):
                bid = ids[b0: b0 + block_rows]
                x = input_rows(store, layer, bid)
                for p, cf in cents.items():
                    packed = store.read_rows(p, bid, layer=layer)
                    for _, _, A, ov in block_overlaps(packed, store.widths[p], cf, block_rows):
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


def format_eval(res: dict) -> list[str]:
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


@dataclass
class EvaluateOptions:
    """Options of ``python -m awq.predictor evaluate``."""

    masks: str = opt(help="pattern store recorded with --dump_inputs (test split)", kind="in_dir")
    predictor: str = opt(help="predictor file (.safetensors)", kind="in_file")
    centroids: Optional[str] = opt(None, help="centroid files (default: the ones recorded in the predictor; must "
                                   "match their sha256)", kind="centroids", check=parse_centroid_spec)
    topk: int = opt(5, help="k for top-k accuracy and best-of-top-k recall (default 5)", min=1)
    max_rows: Optional[int] = opt(None, help="evaluate a seeded sample of N rows per layer (default all)", min=1)
    output: Optional[str] = opt(None, help="write the results JSON here (with the machine info, notes and wall time)",
                                kind="out_file")
    log_level: str = opt("INFO", help="logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def machine_notes(given: list[str]) -> tuple[dict, list[str]]:
    """(machine info, notes): CPU, flags, cores, torch threads, load average; ``given`` notes, then one on the
    load when the machine was busy (the evaluation's wall time is then not the machine's own)."""
    import os


    c = cpu_info()
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    info = {"cpu": c["model"], "flags": c["flags"], "cpus": c["cores"], "torch_threads": c["threads"],
            "torch": c["torch"], "loadavg": load}
    busy = load is not None and load >= 0.5 * (c["cores"] or 1)
    return info, [*given, *([f"load average {load} on {c['cores']} cpus: the machine was shared with other jobs, "
                             "so the wall times are longer than on an idle machine"] if busy else [])]


def run_evaluate_cli(args: EvaluateOptions) -> int:
    if args.output:
        check_output_path(args.output, "evaluation results")
        spec = parse_centroid_spec(args.centroids) if getattr(args, "centroids", None) else {}
        check_not_input(args.output, [args.masks, args.predictor, *spec.values()], "evaluation results")
    t0 = time.perf_counter()
    system, notes = machine_notes([])  # the load as the evaluation starts
    res = evaluate(args.masks, args.predictor, args.centroids, args.topk, args.max_rows)
    res["system"], res["notes"] = system, notes
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.output:
        atomic_write_json(args.output, res)
    for line in format_eval(res):
        print(line)
    return 0
