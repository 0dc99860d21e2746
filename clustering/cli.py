"""Command-line plumbing shared by the clustering tools: the common options (declared once, as
config dataclasses, see :mod:`awq.cli`), the source they describe, result files and ``run``.

Every tool defines ``Config`` (a subclass of :class:`StoreOptions` / :class:`FitOptions` or its
own), a typed ``main(cfg) -> result`` and ``cli(argv) -> int`` = ``run(Config, main, argv, doc)``.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

from awq.centroids import CentroidError, save_centroids
from awq.cli import ConfigError, build_parser, check_config, opt, parse_config
from awq.io import atomic_write_json
from awq.sparsify import PROJS
from clustering import ClusteringError
from clustering.base import BinaryClusterer
from clustering.distributed import dist_info, shutdown_distributed
from clustering.sources import StoreSource

T = TypeVar("T")


@dataclass(kw_only=True)
class StoreOptions:
    """Which rows of which pattern store, on which device."""

    masks: Path = opt(help="pattern store directory (written by python -m awq.entry --dump_masks)")
    proj: str = opt(help="projection whose patterns are clustered", choices=PROJS)
    layer: Optional[int] = opt(None, help="use one layer only (default: all layers pooled)", min=0)
    max_rows: Optional[int] = opt(None, help="deterministic random subsample of this many rows", min=1)
    block_rows: Optional[int] = opt(None, min=1, help="rows per block (default seqlen x #layers = one window of "
                                    "all layers, the artifact's chunk)")
    allow_partial: bool = opt(False, help="accept a pattern store whose extraction is unfinished")
    device: str = opt("cpu", help="torch device: cpu or cuda[:i]")
    seed: int = opt(42, help="random seed (the artifact uses 42)")
    verbose: bool = opt(False, help="debug logging")


@dataclass(kw_only=True)
class FitOptions(StoreOptions):
    """A clustering run: K, output file, iterations, init, resume."""

    k: int = opt(help="number of clusters", min=1)
    output: Path = opt(help="output centroid file (.pt); a .json sidecar is written too")
    max_iter: int = opt(10, help="maximum iterations (default 10)", min=0)
    init: Optional[str] = opt(None, help="initial centroids: a .pt file, or 'random' / 'kmeanspp'")
    resume: bool = opt(False, help="continue from OUTPUT.ckpt.pt after an interruption")
    progress: bool = opt(True, help="disable the tqdm progress bar")


def setup_logging(verbose: bool = False) -> None:
    """INFO on rank 0, WARNING on the other ranks (DEBUG everywhere with ``verbose``)."""
    rank = int(os.environ.get("RANK", dist_info()[0]))  # before init_process_group too
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def check_device(device: str) -> None:
    """Fail with one line when the requested device does not exist."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ClusteringError(f"bad --device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ClusteringError(f"--device {device}: CUDA is not available on this machine")


def make_source(cfg: StoreOptions) -> StoreSource:
    """The checked device and the store rows ``cfg`` describes."""
    check_device(cfg.device)
    return StoreSource(cfg.masks, cfg.proj, layer=cfg.layer, max_rows=cfg.max_rows, seed=cfg.seed,
                       block_rows=cfg.block_rows, allow_partial=cfg.allow_partial)


def write_result(est: BinaryClusterer, output: Path, proj: str, extra: Optional[dict] = None) -> dict:
    """Save the centroids (+ sidecar meta) and a results JSON next to them (rank 0 only)."""
    output = Path(output)
    meta = est.result_meta()
    meta["proj"] = proj
    meta.update(extra or {})
    if dist_info()[0] == 0:
        save_centroids(output, est.cluster_centers_, meta)
        atomic_write_json(output.with_name(output.stem + ".results.json"), meta)
    return meta


def run(cls: type[T], main: Callable[[T], Any], argv: Optional[Sequence[str]] = None,
        description: Optional[str] = None, prog: Optional[str] = None) -> int:
    """Parse ``argv`` into ``cls``, run ``main(cfg)``; bad input -> one ``error: ...`` line on stderr, exit 2."""
    parser = build_parser(cls, prog=prog, description=description)
    try:
        try:
            cfg, _ = parse_config(cls, argv, parser)  # ranges checked before any data is read
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        setup_logging(bool(getattr(cfg, "verbose", False)))
        main(cfg)
    except (ClusteringError, CentroidError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0


__all__ = ["StoreOptions", "FitOptions", "setup_logging", "check_device", "make_source", "write_result", "run",
           "check_config", "opt", "PROJS"]
