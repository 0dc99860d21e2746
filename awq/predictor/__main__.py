"""``python -m awq.predictor train|evaluate``: the per-layer cluster predictor (MLP input -> centroid id per
projection); the model and its files: :mod:`awq.methods.label_predictor`."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from awq.predictor.evaluate import EvaluateOptions, run_evaluate_cli
from awq.predictor.train import TrainOptions, run_train_cli
from awq.util.cli import ConfigError, OneLineParser, check_config, fail, given_options, setup_logging
from awq.util.cli import build_parser as build_config_parser

COMMANDS = {"train": TrainOptions, "evaluate": EvaluateOptions}


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="python -m awq.predictor", description="Train / evaluate the per-layer "
                       "cluster predictor (MLP input -> centroid id per projection).")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{train,evaluate}")
    build_config_parser(TrainOptions, parser=sub.add_parser(
        "train", help="train on a pattern store recorded with --dump_inputs (train split)"))
    build_config_parser(EvaluateOptions, parser=sub.add_parser(
        "evaluate", help="accuracy and recall of active neurons on a (test) store"))
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    try:
        ns = build_parser().parse_args(argv)
        cls = COMMANDS[ns.cmd]
        args = check_config(cls(**given_options(cls, ns)))  # every option checked before any data is read
    except ConfigError as e:
        fail(str(e))
        return 2
    setup_logging(args.log_level)
    try:
        if isinstance(args, TrainOptions):
            return run_train_cli(args)
        return run_evaluate_cli(args)
    except (ValueError, OSError) as e:  # PredictorError, StoreError, CentroidError (ValueError); OutputError, LockedError
        fail(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
