"""Command-line plumbing shared by the clustering tools: the common options (declared once, as
config dataclasses, see :mod:`awq.util.cli`), the source they describe, result files and ``run``.

Every tool defines ``Config`` (a subclass of :class:`StoreOptions` / :class:`FitOptions` or its
own), a typed ``main(cfg) -> result`` and ``cli(argv) -> int`` = ``run(Config, main, argv, doc)``.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

from awq.load.arch import PROJS
from awq.store.centroids import CentroidError, save_centroids
from awq.util.cli import ConfigError, build_parser, check_config, fail, opt, parse_config
from awq.util.cli import setup_logging as awq_setup_logging
from awq.util.io import atomic_write_json, check_not_input, check_output_path, output_lock
from clustering import ClusteringError
from clustering.base import BinaryClusterer, checkpoint_path
from clustering.distributed import dist_info, shutdown_distributed
from clustering.sources import StoreSource

T = TypeVar("T")


@dataclass(kw_only=True)
class StoreOptions:
    """Which rows of which pattern store, on which device."""

    masks: Path = opt(help="pattern store directory (written by python -m awq.entry --dump_masks)", kind="in_dir")
    proj: str = opt(help="projection whose patterns are clustered", choices=PROJS)
    layer: Optional[int] = opt(None, help="use one layer only (default: all layers pooled)", min=0)
    max_rows: Optional[int] = opt(None, help="deterministic random subsample of this many rows", min=1)
    block_rows: Optional[int] = opt(None, min=1, help="rows per block (default seqlen x #layers = one window of "
                                    "all layers, the artifact's chunk)")
    allow_partial: bool = opt(False, help="accept a pattern store whose extraction is unfinished")
    device: str = opt("cpu", help="torch device: cpu or cuda[:i]", kind="device")
    seed: int = opt(42, help="random seed (the artifact uses 42)", kind="seed")
    verbose: bool = opt(False, help="debug logging")


@dataclass(kw_only=True)
class FitOptions(StoreOptions):
    """A clustering run: K, output file, iterations, init, resume."""

    k: int = opt(help="number of clusters", min=1)
    output: Path = opt(help="output centroid file (.pt); a .json sidecar is written too", kind="out_file")
    max_iter: int = opt(10, help="maximum iterations (default 10)", min=0)
    init: Optional[str] = opt(None, help="initial centroids: a .pt file, or 'random' / 'kmeanspp'", kind="in_file",
                              words=("random", "kmeanspp"))
    resume: bool = opt(False, help="continue from OUTPUT.ckpt.pt after an interruption")
    progress: bool = opt(True, help="disable the tqdm progress bar")


def setup_logging(verbose: bool = False) -> None:
    """INFO on rank 0, WARNING on the other ranks (DEBUG everywhere with ``verbose``)."""
    rank = int(os.environ.get("RANK", dist_info()[0]))  # before init_process_group too
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    awq_setup_logging(level)


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
    if dist_info()[0] == 0:  # the centroid file last: once it exists, the run's every output is complete
        atomic_write_json(output.with_name(output.stem + ".results.json"), meta)
        save_centroids(output, est.cluster_centers_, meta)
    return meta


_NOT_PATHS = {"random", "kmeanspp"}  # --init values that are not files


def _inputs(cfg: Any) -> list[Path]:
    """Every path-valued option of ``cfg`` except ``output``: the files and folders a tool reads."""
    out: list[Path] = []
    for f in fields(cfg):
        if f.name == "output":
            continue
        v = getattr(cfg, f.name)
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, Path) or (isinstance(x, str) and f.name in ("init",) and x not in _NOT_PATHS):
                out.append(Path(x))
                if Path(x).suffix == ".pt":  # a centroid file's metadata sidecar is read too
                    out.append(Path(x).with_suffix(".json"))
    return out


def output_files(cfg: Any) -> list[Path]:
    """The files a run of ``cfg`` writes: ``output`` and, for a fit, its sidecar, results JSON and checkpoint."""
    out = getattr(cfg, "output", None)
    if out is None:
        return []
    out = Path(out)
    help_text = next((f.metadata.get("help", "") for f in fields(cfg) if f.name == "output"), "")
    if isinstance(cfg, FitOptions) or "centroid file" in help_text:  # .pt + sidecar (+ results, checkpoint)
        files = [out, out.with_suffix(".json"), out.with_name(out.stem + ".results.json"), checkpoint_path(out)]
        if len({str(p) for p in files}) < len(files):
            raise ClusteringError(f"--output {out}: a centroid file must not end in .json (its .json sidecar "
                                  "would replace it); use a .pt name")
        return files
    return [out]


def check_outputs(cfg: Any) -> list[Path]:
    """Before any work: every output is writable, no output is (or lies inside) an input or a pattern
    store, and no two outputs coincide.  One-line :class:`awq.util.io.OutputError` / ClusteringError."""
    inputs = _inputs(cfg)
    if getattr(cfg, "output", None) is None:
        return []
    check_not_input(cfg.output, inputs, "--output")
    if type(cfg).__name__ == "ImportConfig":  # its output is a pattern store folder (locked by its writer)
        return []
    files = output_files(cfg)
    for f in files:
        check_output_path(f, "--output")
        check_not_input(f, inputs, "--output")
    return files[:1]


def run(cls: type[T], main: Callable[[T], Any], argv: Optional[Sequence[str]] = None,
        description: Optional[str] = None, prog: Optional[str] = None) -> int:
    """Parse ``argv`` into ``cls``, check its outputs (writable, not an input, not in use), run ``main(cfg)``
    under a lock of the output; bad input -> one ``error: ...`` line on stderr, exit 2."""
    parser = build_parser(cls, prog=prog, description=description)
    try:
        try:
            cfg, _ = parse_config(cls, argv, parser)  # every option checked before any data is read
        except ConfigError as e:
            fail(str(e))
            return 2
        setup_logging(bool(getattr(cfg, "verbose", False)))
        with contextlib.ExitStack() as stack:
            if int(os.environ.get("RANK", dist_info()[0])) == 0:  # rank 0 writes the outputs (RANK: before init)
                for f in check_outputs(cfg):
                    stack.enter_context(output_lock(f, "--output", folder=False))
            main(cfg)
    except (ClusteringError, CentroidError, FileNotFoundError, ValueError, OSError) as e:
        fail(str(e))
        return 2
    finally:
        shutdown_distributed()
    return 0


__all__ = ["StoreOptions", "FitOptions", "setup_logging", "check_device", "make_source", "write_result", "run",
           "check_outputs", "output_files",
           "check_config", "opt", "PROJS"]
