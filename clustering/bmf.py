"""BMF randomized clustering baseline: Hamming distance, majority-vote update, D1 seeding from an
all-zeros first centre (see clustering/baselines.py)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from clustering.baselines import BMF, BaselineOptions, fit_baseline
from clustering.cli import opt, run

__all__ = ["BMF", "BMFConfig", "main", "cli"]


@dataclass(kw_only=True)
class BMFConfig(BaselineOptions):
    """Options of ``python -m clustering.bmf``."""

    seed_batch: int = opt(1, min=1, help="D1 seeding: rows sampled per round (1 = exact sequential D1; larger = "
                                         "one GEMM per round)")
    init_rows: Optional[int] = opt(65536, min=1, help="D1 seeding runs on this many sampled rows")


def main(cfg: BMFConfig) -> dict:
    """Fit BMF on a pattern store and write ``cfg.output`` (+ sidecar and ``.results.json``)."""
    return fit_baseline(BMF, cfg, seed_batch=cfg.seed_batch, init_rows=cfg.init_rows)


def cli(argv: Optional[list[str]] = None) -> int:
    return run(BMFConfig, main, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(cli())
