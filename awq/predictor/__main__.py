"""``python -m awq.predictor train|evaluate``: the per-layer cluster predictor (MLP input -> centroid id per
projection); the model and its files: :mod:`awq.methods.label_predictor`."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from awq.predictor.evaluate import add_evaluate_parser, run_evaluate_cli
from awq.predictor.train import add_train_parser, run_train_cli
from awq.util.cli import setup_logging


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m awq.predictor", description="Train / evaluate the per-layer "
                                 "cluster predictor (MLP input -> centroid id per projection).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for q in (add_train_parser(sub), add_evaluate_parser(sub)):
        q.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="logging level")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        if args.cmd == "train":
            return run_train_cli(args)
        return run_evaluate_cli(args)
    except (ValueError, OSError) as e:  # PredictorError, StoreError, CentroidError (ValueError); OutputError, LockedError
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
