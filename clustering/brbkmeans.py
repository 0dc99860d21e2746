"""BRB-KMeans baseline: binary -> real k-means (L2) -> round back to binary (see clustering/baselines.py)."""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clustering.baselines import BRBKMeans, cli  # noqa: E402

__all__ = ["BRBKMeans"]

if __name__ == "__main__":
    cli(
        BRBKMeans,
        __doc__,
        extra_args=lambda p: p.add_argument(
            "--round_every_iter", action="store_true",
            help="round the centroids after every update (the artifact's brbkmeans_same_k) instead of once at the end",
        ),
        extra_kw=lambda a: {"round_every_iter": a.round_every_iter},
    )
