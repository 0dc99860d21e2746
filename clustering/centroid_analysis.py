"""Per-centroid density statistics of a centroid file (artifact's centroid_analysis, section 3.8):
sparsity of every centroid, overall sparsity, a density histogram, and empty / all-ones /
duplicate centroids."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from awq.store.centroids import load_centroids
from awq.util.cli import check_config, opt
from awq.util.io import atomic_write_json
from clustering.cli import run


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


@dataclass(kw_only=True)
class AnalysisConfig:
    """Options of ``python -m clustering.centroid_analysis``."""

    centroids: Path = opt(help="centroid file (.pt)", kind="in_file")
    output: Optional[Path] = opt(None, help="result JSON (default CENTROIDS.analysis.json)", kind="out_file")
    bins: int = opt(10, min=1, help="histogram bins over density [0, 1]")


def main(cfg: AnalysisConfig) -> dict:
    """Analyse ``cfg.centroids``; writes ``cfg.output`` JSON (default CENTROIDS.analysis.json)."""
    check_config(cfg)
    centroids = Path(cfg.centroids)
    C, _ = load_centroids(centroids)
    res = analyze(C, cfg.bins)
    res["centroids"] = str(centroids)
    out = Path(cfg.output) if cfg.output else centroids.with_name(centroids.stem + ".analysis.json")
    atomic_write_json(out, res)
    print(f"{centroids}: k={res['k']} width={res['width']} overall sparsity {res['overall_sparsity']:.4f} "
          f"(density {res['density_min']:.3f}..{res['density_max']:.3f}), empty {res['empty_centroids']}, "
          f"all-ones {res['all_ones_centroids']}, duplicates {res['duplicate_centroids']} -> {out}")
    for e0, e1, c in zip(res["histogram"]["edges"][:-1], res["histogram"]["edges"][1:], res["histogram"]["counts"]):
        print(f"  density [{e0:.1f}, {e1:.1f}{']' if e1 >= 1 else ')'}: {c}")
    return res


def cli(argv: Optional[list[str]] = None) -> int:
    return run(AnalysisConfig, main, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(cli())
