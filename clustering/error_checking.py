"""Clustering precision of a centroid set on a pattern store (paper eq. 6, artifact section 3.8).

Every row ``a`` goes to its nearest centroid by the active-only distance (= largest overlap
``<a, c>``, ties -> lowest index, no capacity).  Reported (micro-averaged over all rows):

* ``precision`` = sum(A & C_label) / sum(A): the paper's clustering precision (really the recall
  of the active set; 1.0 for all-ones centroids, hence always read it with ``density``);
* ``density`` = fraction of ones in the centroid set; ``predicted_density`` = mean density of the
  assigned centroids; ``true_precision`` = sum(A & C_label) / sum(C_label);
* ``f1`` = 2 TP / (|A| + |C_label|), ``jaccard`` = TP / (|A| + |C_label| - TP);
* the same per layer, cluster usage, and the artifact's per-neuron error
  (``sum_rows |a_j - c_label,j|``: ``top_indices``, ``top_values``, ``all_errors``).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from awq.store.centroids import CentroidError, load_centroids, metrics_from_counts, overlap
from awq.util.io import atomic_write_json
from clustering.cli import StoreOptions, check_config, make_source, opt, run
from clustering.sources import Source, as_source

log = logging.getLogger("clustering.error_checking")


RULES = ("active_only", "hamming", "penalized")


def evaluate(src: Source | torch.Tensor, C: torch.Tensor, *, device: str = "cpu", block_rows: Optional[int] = None,
             progress: bool = False, top: int = 10, rule: str = "active_only", penalty: float = 2.0) -> dict:
    """Precision-type metrics of centroids ``C`` ({0,1} ``[K, F]``) on the rows of ``src``."""
    src = as_source(src, block_rows)
    C = C.to(device, torch.float32)
    if C.shape[1] != src.width:
        raise CentroidError(f"width mismatch: centroids have width {C.shape[1]}, data has width {src.width}")
    k, F = C.shape
    csize = C.sum(1)
    S = torch.zeros_like(C)
    counts = torch.zeros(k, dtype=torch.float64, device=C.device)
    colsum = torch.zeros(F, dtype=torch.float64, device=C.device)
    per_layer: dict[int, np.ndarray] = {}
    blocks = src.blocks(block_rows)
    it = blocks
    if progress:
        from tqdm import tqdm

        it = tqdm(blocks, desc="precision", unit="block", leave=False)
    for s, e in it:
        X = src.read_range(s, e, device)
        G = overlap(X, C)
        if rule == "active_only":  # the paper's rule: largest overlap (= smallest active-only distance)
            cov, lab = G.max(1)  # max returns the first maximal index
        else:  # the method's own rule: Hamming |a|+|c|-2<a,c>, or with a penalty per spurious 1 (c=1, a=0)
            D = csize[None, :] - 2 * G if rule == "hamming" else (1 + penalty) * csize[None, :] - (2 + penalty) * G
            lab = torch.argmin(D, dim=1)  # |a| is constant per row; first minimal index on ties
            cov = G.gather(1, lab[:, None]).squeeze(1)
        act = X.sum(1)
        pred = csize[lab]
        S.index_add_(0, lab, X)
        counts += torch.bincount(lab, minlength=k).double()
        colsum += X.sum(0).double()
        lay = src.layers_of(np.arange(s, e))
        vals = torch.stack([act, cov, pred], 1).double().cpu().numpy()
        for l in np.unique(lay):
            sel = lay == l
            acc = per_layer.setdefault(int(l), np.zeros(4))
            acc[:3] += vals[sel].sum(0)
            acc[3] += sel.sum()
    tot = sum(per_layer.values())
    res: dict = metrics_from_counts(tot[0], tot[1], tot[2], tot[3] * F)
    res["density"] = float(C.mean().item())
    res.update(rows=int(tot[3]), width=F, k=k, active=float(tot[0]), covered=float(tot[1]), predicted=float(tot[2]))
    res["per_layer"] = {
        str(l): dict(metrics_from_counts(v[0], v[1], v[2], v[3] * F), rows=int(v[3])) for l, v in sorted(per_layer.items())
    }
    res["clusters_used"] = int((counts > 0).sum().item())
    res["cluster_size_max"] = int(counts.max().item())
    # per-neuron error of the artifact: sum over rows of |x_j - c_label,j|
    err = colsum + (counts[:, None] * C.double()).sum(0) - 2 * (S.double() * C.double()).sum(0)
    vals, idx = torch.topk(err, min(top, F))
    res["per_neuron_error"] = {"top_indices": idx.tolist(), "top_values": vals.tolist(), "all_errors": err.tolist()}
    return res


@dataclass(kw_only=True)
class PrecisionConfig(StoreOptions):
    """Options of ``python -m clustering.error_checking``."""

    centroids: Path = opt(help="centroid file (.pt)", kind="in_file")
    output: Optional[Path] = opt(None, help="result JSON (default CENTROIDS.precision.json)", kind="out_file")
    progress: bool = opt(True, help="disable the tqdm progress bar")
    rule: str = opt("active_only", choices=RULES,
                    help="row -> centroid rule: active_only (paper eq. 6: largest overlap; default), hamming (BMF/"
                         "BRB-KMeans's own nearest centroid) or penalized (penalized BRB-KMeans's own, see --penalty)")
    penalty: float = opt(2.0, min=0.0, help="penalty of the 'penalized' rule (default 2.0)")


def main(cfg: PrecisionConfig) -> dict:
    """Evaluate ``cfg.centroids`` on ``cfg.masks``/``cfg.proj``; write ``cfg.output`` JSON (default: next to the
    centroids)."""
    check_config(cfg)
    src = make_source(cfg)
    centroids = Path(cfg.centroids)
    C, meta = load_centroids(centroids, src.width)
    t0 = time.perf_counter()
    res = evaluate(src, C, device=cfg.device, block_rows=cfg.block_rows, progress=cfg.progress, rule=cfg.rule,
                   penalty=cfg.penalty)
    res.update(rule=cfg.rule, proj=cfg.proj, centroids=str(centroids),
               centroid_meta={k: v for k, v in meta.items() if k != "history"},
               source=src.describe(), seconds=time.perf_counter() - t0)
    out = Path(cfg.output) if cfg.output else centroids.with_name(centroids.stem + ".precision.json")
    atomic_write_json(out, res)
    print(f"{cfg.proj} k={res['k']}: precision {res['precision']:.4f} density {res['density']:.4f} "
          f"f1 {res['f1']:.4f} jaccard {res['jaccard']:.4f} -> {out}")
    return res


def cli(argv: Optional[list[str]] = None) -> int:
    return run(PrecisionConfig, main, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(cli())
