"""Replace centroids whose sparsity lies outside ``[--min_sparsity, --max_sparsity]`` and write a
new file (never the input).  ``--mode neighbour`` (the artifact's intent): the nearest in-band
centroid by index (previous first, then next); ``--mode row``: a fresh random data row from
``--masks``/``--proj`` whose sparsity is in the band."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from awq.load.arch import PROJS
from awq.store.centroids import load_centroids, save_centroids
from awq.util.cli import check_config, opt
from clustering import ClusteringError
from clustering.cli import run
from clustering.sources import StoreSource

log = logging.getLogger("clustering.replace")


def replace_out_of_band(C: torch.Tensor, lo: float, hi: float, *, mode: str = "neighbour",
                        rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[int]]:
    """Return ``(new C, replaced indices)``; ``rows`` = candidate data rows for ``mode='row'``."""
    sp = 1 - C.float().mean(1)
    bad = ((sp < lo) | (sp > hi)).numpy()
    good = np.nonzero(~bad)[0]
    out = C.clone()
    idx = np.nonzero(bad)[0]
    if len(idx) == 0:
        return out, []
    if mode == "neighbour":
        if len(good) == 0:
            raise ClusteringError("no centroid lies inside the sparsity band; nothing to copy from")
        pos = np.searchsorted(good, idx)  # first good index after i
        prev = good[np.clip(pos - 1, 0, len(good) - 1)]
        nxt = good[np.clip(pos, 0, len(good) - 1)]
        use_prev = (pos > 0) & ((pos >= len(good)) | (idx - prev <= nxt - idx))
        src = np.where(use_prev, prev, nxt)
        out[torch.from_numpy(idx)] = C[torch.from_numpy(src)]
    elif mode == "row":
        if rows is None:
            raise ClusteringError("--mode row needs --masks and --proj")
        rsp = 1 - rows.float().mean(1)
        ok = torch.nonzero((rsp >= lo) & (rsp <= hi)).flatten()
        if ok.numel() < len(idx):
            raise ClusteringError(f"only {ok.numel()} candidate rows lie inside the band; {len(idx)} needed")
        out[torch.from_numpy(idx)] = rows[ok[: len(idx)]].to(C.dtype)
    else:
        raise ClusteringError(f"unknown mode {mode!r}")
    return out, idx.tolist()


@dataclass(kw_only=True)
class ReplaceConfig:
    """Options of ``python -m clustering.replace_centroid_based_on_sparsity``."""

    centroids: Path = opt(help="input centroid file (.pt), never modified", kind="in_file")
    output: Path = opt(help="output centroid file (.pt), must differ from the input", kind="out_file")
    min_sparsity: float = opt(0.4, min=0.0, max=1.0, kind="fraction",
                              help="lowest acceptable centroid sparsity (default 0.4)")
    max_sparsity: float = opt(0.7, min=0.0, max=1.0, kind="fraction",
                              help="highest acceptable centroid sparsity (default 0.7)")
    mode: str = opt("neighbour", choices=("neighbour", "row"), help="replacement source")
    masks: Optional[Path] = opt(None, help="pattern store (for --mode row)", kind="in_dir")
    proj: Optional[str] = opt(None, choices=PROJS, help="projection (for --mode row)")
    seed: int = opt(42, help="random seed for --mode row", kind="seed")


def main(cfg: ReplaceConfig) -> list[int]:
    """Write ``cfg.output`` with out-of-band centroids replaced; returns the replaced indices."""
    check_config(cfg)
    centroids, output = Path(cfg.centroids), Path(cfg.output)
    lo, hi, mode = cfg.min_sparsity, cfg.max_sparsity, cfg.mode
    if output.resolve() == centroids.resolve():
        raise ClusteringError("--output must differ from --centroids (the input is never overwritten)")
    C, meta = load_centroids(centroids)
    rows = None
    if mode == "row":
        if cfg.masks is None or cfg.proj is None:
            raise ClusteringError("--mode row needs --masks and --proj")
        n_all = StoreSource(cfg.masks, cfg.proj).n_rows
        src = StoreSource(cfg.masks, cfg.proj, max_rows=min(n_all, 16 * C.shape[0]), seed=cfg.seed)
        if src.width != C.shape[1]:
            raise ClusteringError(f"width mismatch: centroids have width {C.shape[1]}, data has width {src.width}")
        perm = np.random.default_rng(cfg.seed).permutation(src.n_rows)
        rows = src.read(np.sort(perm))[torch.from_numpy(np.argsort(np.argsort(perm)))]
    newC, idx = replace_out_of_band(C, lo, hi, mode=mode, rows=rows)
    for i in idx:
        log.info("centroid %d (sparsity %.3f) replaced", i, 1 - C[i].float().mean().item())
    meta = dict(meta)
    meta.update(replaced=idx, replaced_from=str(centroids), replace_band=[lo, hi], replace_mode=mode)
    save_centroids(output, newC, meta)
    print(f"replaced {len(idx)} of {C.shape[0]} centroids outside sparsity [{lo}, {hi}] -> {output}")
    return idx


def cli(argv: Optional[list[str]] = None) -> int:
    return run(ReplaceConfig, main, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(cli())
