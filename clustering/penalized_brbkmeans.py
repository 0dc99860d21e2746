"""Penalized BRB-KMeans baseline: asymmetric Hamming (a spurious active neuron costs 1 + penalty),
majority-vote update, random-row init (see clustering/baselines.py)."""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clustering.baselines import PenalizedBRBKMeans, cli  # noqa: E402

__all__ = ["PenalizedBRBKMeans"]

if __name__ == "__main__":
    cli(
        PenalizedBRBKMeans,
        __doc__,
        extra_args=lambda p: p.add_argument("--penalty", type=float, default=2.0,
                                            help="extra cost of a centroid 1 where the data is 0 (default 2.0)"),
        extra_kw=lambda a: {"penalty": a.penalty},
    )
