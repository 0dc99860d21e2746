"""Replace centroids whose sparsity lies outside ``[--min_sparsity, --max_sparsity]`` and write a
new file (never the input).  ``--mode neighbour`` (the artifact's intent): the nearest in-band
centroid by index (previous first, then next); ``--mode row``: a fresh random data row from
``--masks``/``--proj`` whose sparsity is in the band."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clustering.common import ClusteringError, PROJS, StoreSource, run_cli, setup_logging  # noqa: E402
from awq.centroids import load_centroids, save_centroids  # noqa: E402

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


def main(centroids: Path, output: Path, *, min_sparsity: float = 0.4, max_sparsity: float = 0.7,
         mode: str = "neighbour", masks: Optional[Path] = None, proj: Optional[str] = None, seed: int = 42) -> list[int]:
    """Write ``output`` with out-of-band centroids replaced; returns the replaced indices."""
    if Path(output).resolve() == Path(centroids).resolve():
        raise ClusteringError("--output must differ from --centroids (the input is never overwritten)")
    C, meta = load_centroids(centroids)
    rows = None
    if mode == "row":
        if masks is None or proj is None:
            raise ClusteringError("--mode row needs --masks and --proj")
        src = StoreSource(masks, proj, max_rows=min(StoreSource(masks, proj).n_rows, 16 * C.shape[0]), seed=seed)
        if src.width != C.shape[1]:
            raise ClusteringError(f"width mismatch: centroids have width {C.shape[1]}, data has width {src.width}")
        perm = np.random.default_rng(seed).permutation(src.n_rows)
        rows = src.read(np.sort(perm))[torch.from_numpy(np.argsort(np.argsort(perm)))]
    newC, idx = replace_out_of_band(C, min_sparsity, max_sparsity, mode=mode, rows=rows)
    for i in idx:
        log.info("centroid %d (sparsity %.3f) replaced", i, 1 - C[i].float().mean().item())
    meta = dict(meta)
    meta.update(replaced=idx, replaced_from=str(centroids), replace_band=[min_sparsity, max_sparsity], replace_mode=mode)
    save_centroids(output, newC, meta)
    print(f"replaced {len(idx)} of {C.shape[0]} centroids outside sparsity [{min_sparsity}, {max_sparsity}] -> {output}")
    return idx


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--centroids", type=Path, required=True, help="input centroid file (.pt), never modified")
    p.add_argument("--output", type=Path, required=True, help="output centroid file (.pt), must differ from the input")
    p.add_argument("--min_sparsity", type=float, default=0.4, help="lowest acceptable centroid sparsity (default 0.4)")
    p.add_argument("--max_sparsity", type=float, default=0.7, help="highest acceptable centroid sparsity (default 0.7)")
    p.add_argument("--mode", choices=("neighbour", "row"), default="neighbour", help="replacement source")
    p.add_argument("--masks", type=Path, default=None, help="pattern store (for --mode row)")
    p.add_argument("--proj", choices=PROJS, default=None, help="projection (for --mode row)")
    p.add_argument("--seed", type=int, default=42, help="random seed for --mode row")
    a = p.parse_args()
    setup_logging()
    run_cli(lambda: main(a.centroids, a.output, min_sparsity=a.min_sparsity, max_sparsity=a.max_sparsity,
                         mode=a.mode, masks=a.masks, proj=a.proj, seed=a.seed))
