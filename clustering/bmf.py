"""BMF randomized clustering baseline: Hamming distance, majority-vote update, D1 seeding from an
all-zeros first centre (see clustering/baselines.py)."""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clustering.baselines import BMF, cli  # noqa: E402

__all__ = ["BMF"]


def _args(p) -> None:
    p.add_argument("--seed_batch", type=int, default=1,
                   help="D1 seeding: rows sampled per round (1 = exact sequential D1; larger = one GEMM per round)")
    p.add_argument("--init_rows", type=int, default=65536, help="D1 seeding runs on this many sampled rows")


if __name__ == "__main__":
    cli(BMF, __doc__, extra_args=_args, extra_kw=lambda a: {"seed_batch": a.seed_batch, "init_rows": a.init_rows})
