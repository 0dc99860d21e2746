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

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clustering.common import Source, add_data_args, as_source, make_source, run_cli, setup_logging  # noqa: E402
from awq.centroids import CentroidError, atomic_write_json, load_centroids, metrics_from_counts, overlap  # noqa: E402

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


def main(masks: Path, proj: str, centroids: Path, output: Optional[Path] = None, *, layer: Optional[int] = None,
         max_rows: Optional[int] = None, block_rows: Optional[int] = None, seed: int = 42, allow_partial: bool = False,
         device: str = "cpu", progress: bool = True, rule: str = "active_only", penalty: float = 2.0) -> dict:
    """Evaluate ``centroids`` on ``masks``/``proj`` and write ``output`` JSON (default: next to the centroids)."""
    args = argparse.Namespace(masks=masks, proj=proj, layer=layer, max_rows=max_rows, seed=seed,
                              block_rows=block_rows, allow_partial=allow_partial, device=device)
    src = make_source(args)
    C, meta = load_centroids(centroids, src.width)
    t0 = time.perf_counter()
    res = evaluate(src, C, device=device, block_rows=block_rows, progress=progress, rule=rule, penalty=penalty)
    res.update(rule=rule, proj=proj, centroids=str(centroids), centroid_meta={k: v for k, v in meta.items() if k != "history"},
               source=src.describe(), seconds=time.perf_counter() - t0)
    out = output or centroids.with_name(centroids.stem + ".precision.json")
    atomic_write_json(res, out)
    print(f"{proj} k={res['k']}: precision {res['precision']:.4f} density {res['density']:.4f} "
          f"f1 {res['f1']:.4f} jaccard {res['jaccard']:.4f} -> {out}")
    return res


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p, need_k=False, need_output=False)
    p.add_argument("--centroids", type=Path, required=True, help="centroid file (.pt)")
    p.add_argument("--output", type=Path, default=None, help="result JSON (default CENTROIDS.precision.json)")
    p.add_argument("--no_progress", action="store_true", help="disable the tqdm progress bar")
    p.add_argument("--rule", choices=RULES, default="active_only",
                   help="row -> centroid rule: active_only (paper eq. 6: largest overlap; default), hamming (BMF/"
                        "BRB-KMeans's own nearest centroid) or penalized (penalized BRB-KMeans's own, see --penalty)")
    p.add_argument("--penalty", type=float, default=2.0, help="penalty of the 'penalized' rule (default 2.0)")
    a = p.parse_args()
    setup_logging(a.verbose)
    run_cli(lambda: main(a.masks, a.proj, a.centroids, a.output, layer=a.layer, max_rows=a.max_rows,
                         block_rows=a.block_rows, seed=a.seed, allow_partial=a.allow_partial, device=a.device,
                         progress=not a.no_progress, rule=a.rule, penalty=a.penalty))
