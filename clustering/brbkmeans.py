"""BRB-KMeans baseline: binary -> real k-means (L2) -> round back to binary (see clustering/baselines.py)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from clustering.baselines import BaselineOptions, BRBKMeans, fit_baseline
from clustering.cli import opt, run

__all__ = ["BRBKMeans", "BRBKMeansConfig", "main", "cli"]


@dataclass(kw_only=True)
class BRBKMeansConfig(BaselineOptions):
    """Options of ``python -m clustering.brbkmeans``."""

    round_every_iter: bool = opt(False, help="round the centroids after every update (the artifact's "
                                             "brbkmeans_same_k) instead of once at the end")


def main(cfg: BRBKMeansConfig) -> dict:
    """Fit BRB-KMeans on a pattern store and write ``cfg.output`` (+ sidecar and ``.results.json``)."""
    return fit_baseline(BRBKMeans, cfg, round_every_iter=cfg.round_every_iter)


def cli(argv: Optional[list[str]] = None) -> int:
    return run(BRBKMeansConfig, main, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(cli())
