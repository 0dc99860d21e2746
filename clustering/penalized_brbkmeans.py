"""Penalized BRB-KMeans baseline: asymmetric Hamming (a spurious active neuron costs 1 + penalty),
majority-vote update, random-row init (see clustering/baselines.py)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from clustering.baselines import BaselineOptions, PenalizedBRBKMeans, fit_baseline
from clustering.cli import opt, run

__all__ = ["PenalizedBRBKMeans", "PenalizedConfig", "main", "cli"]


@dataclass(kw_only=True)
class PenalizedConfig(BaselineOptions):
    """Options of ``python -m clustering.penalized_brbkmeans``."""

    penalty: float = opt(2.0, min=0.0, help="extra cost of a centroid 1 where the data is 0 (default 2.0)")


def main(cfg: PenalizedConfig) -> dict:
    """Fit penalized BRB-KMeans on a pattern store and write ``cfg.output`` (+ sidecar and ``.results.json``)."""
    return fit_baseline(PenalizedBRBKMeans, cfg, penalty=cfg.penalty)


def cli(argv: Optional[list[str]] = None) -> int:
    return run(PenalizedConfig, main, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(cli())
