"""Per-centroid density statistics of a centroid file (artifact's centroid_analysis, section 3.8):
sparsity of every centroid, overall sparsity, a density histogram, and empty / all-ones /
duplicate centroids."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clustering.common import run_cli, setup_logging  # noqa: E402
from awq.centroids import atomic_write_json, load_centroids  # noqa: E402


def analyze(C: torch.Tensor, bins: int = 10) -> dict:
    """Statistics of a {0,1} centroid tensor ``[K, F]``."""
    Cf = C.float()
    k, F = Cf.shape
    dens = Cf.mean(1)
    hist = torch.histc(dens, bins=bins, min=0.0, max=1.0)
    uniq = torch.unique(C.to(torch.uint8), dim=0).shape[0]
    return {
        "k": k,
        "width": F,
        "overall_sparsity": float(1 - Cf.mean().item()),
        "density_mean": float(dens.mean().item()),
        "density_min": float(dens.min().item()),
        "density_max": float(dens.max().item()),
        "empty_centroids": int((dens == 0).sum().item()),
        "all_ones_centroids": int((dens == 1).sum().item()),
        "duplicate_centroids": int(k - uniq),
        "histogram": {"edges": torch.linspace(0, 1, bins + 1).tolist(), "counts": [int(x) for x in hist.tolist()]},
        "zeros_per_centroid": (F - Cf.sum(1)).int().tolist(),
        "sparsity_per_centroid": (1 - dens).tolist(),
    }


def main(centroids: Path, output: Optional[Path] = None, bins: int = 10) -> dict:
    """Analyse ``centroids``; writes ``output`` JSON (default CENTROIDS.analysis.json)."""
    C, _ = load_centroids(centroids)
    res = analyze(C, bins)
    res["centroids"] = str(centroids)
    out = output or centroids.with_name(centroids.stem + ".analysis.json")
    atomic_write_json(res, out)
    print(f"{centroids}: k={res['k']} width={res['width']} overall sparsity {res['overall_sparsity']:.4f} "
          f"(density {res['density_min']:.3f}..{res['density_max']:.3f}), empty {res['empty_centroids']}, "
          f"all-ones {res['all_ones_centroids']}, duplicates {res['duplicate_centroids']} -> {out}")
    for e0, e1, c in zip(res["histogram"]["edges"][:-1], res["histogram"]["edges"][1:], res["histogram"]["counts"]):
        print(f"  density [{e0:.1f}, {e1:.1f}{']' if e1 >= 1 else ')'}: {c}")
    return res


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--centroids", type=Path, required=True, help="centroid file (.pt)")
    p.add_argument("--output", type=Path, default=None, help="result JSON (default CENTROIDS.analysis.json)")
    p.add_argument("--bins", type=int, default=10, help="histogram bins over density [0, 1]")
    a = p.parse_args()
    setup_logging()
    run_cli(lambda: main(a.centroids, a.output, a.bins))
