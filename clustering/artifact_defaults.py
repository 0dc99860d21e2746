"""The artifact's no-configuration clustering step: ``python clustering/activation_aware_clustering.py``.

With no arguments the AWC script reads the default pattern store (:func:`awq.paths.default_store`,
written by ``python -m awq.entry --dump_masks``), clusters gate_proj, up_proj and down_proj with
the paper's settings (K = 2048, centroid sparsity 0.4 = "the top 60% of features", the artifact's
seed 42) on a deterministic row budget, and writes one directory of centroids
(:func:`awq.paths.default_centroid_dir`) that ``python -m awq.entry --centroids DIR`` reads.
Locations resolve against the project root, so it runs the same from the repository root, from
inside ``clustering/`` and as ``python -m clustering.activation_aware_clustering``.

Row budget: 61,440 rows per projection (one 2048-token window x 30 layers, the artifact's chunk)
and 10 iterations (the artifact's): 4.6 minutes for all three projections measured on 2 CPU cores
shared with other jobs (load ~8).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from awq import paths
from awq.sparsify import PROJS
from clustering import ClusteringError

log = logging.getLogger("clustering.artifact")


@dataclass(frozen=True)
class ArtifactSettings:
    """The paper's clustering settings with a CPU-sized row budget."""

    k: int = 2048  # clusters per projection (paper, section 5.1 / Fig. 4a)
    sparsity: float = 0.4  # centroid keeps the top 60% of features (paper, section 4)
    max_rows: Optional[int] = 61440  # one 2048-token window x 30 layers (the artifact's chunk)
    max_iter: int = 10  # the artifact's iterations
    seed: int = 42  # the artifact's seed
    device: str = "cpu"


SETTINGS = ArtifactSettings()


def no_store_message(store: Path, root: Optional[Path] = None) -> str:
    return (f"no pattern store at {store}: make one first with `python -m awq.entry --dump_masks` "
            f"(all test windows, ~10 min on 2 cores; add --nsamples 2 for a quick one)")


def run_defaults(root: Optional[Path] = None, settings: ArtifactSettings = SETTINGS) -> Path:
    """Cluster all three projections of the default store into the default centroid directory; -> that directory.

    ``root`` overrides the project root (else ``$AWQ_PROJECT_ROOT`` / the checkout).  Raises
    :class:`ClusteringError` (one line) when the store is missing or unusable.
    """
    from clustering.activation_aware_clustering import AWCConfig, main
    from clustering.base import checkpoint_path
    from clustering.sources import StoreSource

    store = paths.default_store(root)
    if not (store / "meta.json").is_file():
        raise ClusteringError(no_store_message(store, root))
    out_dir = paths.default_centroid_dir(root)
    for proj in PROJS:
        src = StoreSource(store, proj, max_rows=settings.max_rows, seed=settings.seed)
        s0, e0 = src.blocks()[0]
        block, k = e0 - s0, settings.k
        if k > block:
            log.warning("K=%d exceeds the %d rows of one block of this store: using K=%d", k, block, block)
            k = block
        out = out_dir / f"{proj}.pt"
        cfg = AWCConfig(masks=store, proj=proj, k=k, output=out, sparsity=settings.sparsity,
                        max_rows=settings.max_rows, max_iter=settings.max_iter, seed=settings.seed,
                        device=settings.device, progress=False)
        log.info("clustering %s: K=%d, sparsity %.2f, %s rows, %d iterations -> %s", proj, k, settings.sparsity,
                 settings.max_rows or "all", settings.max_iter, paths.display(out, root))
        main(cfg)
        checkpoint_path(out).unlink(missing_ok=True)  # finished: only the centroid files stay in the directory
    return out_dir


def cli(root: Optional[Path] = None, settings: ArtifactSettings = SETTINGS) -> int:
    """The no-argument command: one result line on stdout, one error line on stderr (exit 2)."""
    from awq.centroids import CentroidError
    from clustering.cli import setup_logging

    setup_logging(False)
    try:
        out_dir = run_defaults(root, settings)
    except (ClusteringError, CentroidError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"centroids for {', '.join(PROJS)} written to {out_dir}; next: python -m awq.entry --centroids {out_dir}")
    return 0


__all__ = ["ArtifactSettings", "SETTINGS", "run_defaults", "cli", "no_store_message"]
