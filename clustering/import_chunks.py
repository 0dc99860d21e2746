"""Import the original artifact's activation-mask chunks into a pattern store.

An artifact chunk ``chunk_<i>.pt`` is a ``torch.save``'d list with one dict per layer,
``{"gate_proj": uint8 [1, T, F], "up_proj": uint8 [1, T, F], "down_proj": uint8 [1, T, H]}``
holding the masks of the T tokens of window i.  Each chunk becomes one window of the store
(values are binarised with ``!= 0``).  The import is resumable: rerunning the same command
continues after the last complete chunk.

    python clustering/import_chunks.py --chunks path/to/chunks_dir --output masks_store --model Mistral-7B-v0.1
"""
from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from awq.load.arch import PROJS
from awq.store.pattern_store import StoreError, StoreWriter, pack
from awq.util.cli import opt, run_cli

log = logging.getLogger("import_chunks")
_CHUNK_RE = re.compile(r"chunk_(\d+)\.pt$")


def list_chunks(chunks: Sequence[str | Path]) -> list[Path]:
    """Chunk files in numeric order: a directory expands to its chunk_<i>.pt files."""
    files: list[Path] = []
    for c in chunks:
        c = Path(c)
        if c.is_dir():
            found = [p for p in c.iterdir() if _CHUNK_RE.search(p.name)]
            if not found:
                raise ValueError(f"no chunk_<i>.pt files in {c}")
            files.extend(found)
        elif c.is_file():
            files.append(c)
        else:
            raise ValueError(f"chunk path not found: {c}")
    if all(_CHUNK_RE.search(p.name) for p in files):
        files.sort(key=lambda p: int(_CHUNK_RE.search(p.name).group(1)))  # type: ignore[union-attr]
    if len({p.resolve() for p in files}) != len(files):
        raise ValueError("the same chunk file is given twice")
    return files


def load_chunk(path: Path) -> list[dict[str, torch.Tensor]]:
    """torch.load a chunk (weights_only, memory-mapped when possible) and check its structure."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, ValueError) as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001  (pickle/zip/IO errors all mean: not a readable chunk)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path.name}: cannot be loaded as a chunk ({msg})") from None
    if not isinstance(obj, (list, tuple)) or not obj:
        raise ValueError(f"{path.name}: expected a non-empty list of per-layer dicts, got {type(obj).__name__}")
    for l, d in enumerate(obj):
        if not isinstance(d, dict):
            raise ValueError(f"{path.name}: layer {l} is a {type(d).__name__}, expected a dict")
        for proj in PROJS:
            t = d.get(proj)
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{path.name}: layer {l} has no '{proj}' tensor")
            if t.dim() == 3 and t.shape[0] == 1:
                continue
            if t.dim() != 2:
                raise ValueError(
                    f"{path.name}: layer {l} {proj} has shape {list(t.shape)}, expected [1, tokens, width]"
                )
    return list(obj)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t[0] if t.dim() == 3 else t


def import_chunks(
    chunks: Sequence[str | Path], output: str | Path, model: Optional[str] = None, progress: bool = True
) -> Path:
    """Write (or resume writing) a pattern store from artifact chunks; returns the store path."""
    files = list_chunks(chunks)
    first = load_chunk(files[0])
    num_layers = len(first)
    seqlen = int(_rows(first[0]["gate_proj"]).shape[0])
    widths = {p: int(_rows(first[0][p]).shape[-1]) for p in PROJS}
    meta = {
        "model": model or "unknown",
        "thresholds_sha256": None,
        "dataset": "artifact-chunks",
        "dataset_source": [p.name for p in files],
        "split": None,
        "imported_from": str(Path(files[0]).resolve().parent),
    }
    writer = StoreWriter(output, meta=meta, total_windows=len(files), seqlen=seqlen, num_layers=num_layers)
    try:
        start = writer.windows_done
        if start:
            log.info("resuming at chunk %d of %d", start, len(files))
        warned = False
        for i in range(start, len(files)):
            chunk = first if i == 0 else load_chunk(files[i])
            if len(chunk) != num_layers:
                raise ValueError(f"{files[i].name}: {len(chunk)} layers, {files[0].name} has {num_layers}")
            writer.abort_window()
            for l, d in enumerate(chunk):
                for proj in PROJS:
                    t = _rows(d[proj])
                    if tuple(t.shape) != (seqlen, widths[proj]):
                        raise ValueError(
                            f"{files[i].name}: layer {l} {proj} has shape {list(t.shape)}, "
                            f"expected [1, {seqlen}, {widths[proj]}]"
                        )
                    a = (t != 0).numpy() if t.dtype == torch.bfloat16 else t.numpy()  # numpy: no torch threads
                    if not warned and a.dtype != np.bool_ and bool(((a[:64] != 0) & (a[:64] != 1)).any()):
                        log.warning("%s holds values other than 0/1: binarising with != 0", files[i].name)
                        warned = True
                    writer.write(proj, l, i, pack(a), width=widths[proj])
            writer.end_window(i, {"chunk": files[i].name})
            if progress:
                log.info("imported %s (%d/%d)", files[i].name, i + 1, len(files))
            del chunk
            first = None  # type: ignore[assignment]
    finally:
        writer.close()
    return Path(output)


@dataclass
class ImportConfig:
    """Options of ``python -m clustering.import_chunks``."""

    chunks: list[Path] = opt(nargs="+", help="a directory of chunk_<i>.pt files, or the chunk files themselves "
                                             "(imported in numeric order)", kind="in_path")
    output: Path = opt(help="pattern store directory to create (or resume)", kind="out_dir")
    model: Optional[str] = opt(None, help="model name recorded in the store's meta.json (default: unknown)")


def main(cfg: ImportConfig) -> Path:
    """Import ``cfg.chunks`` into the pattern store ``cfg.output`` (resumable); returns the store path."""
    out = import_chunks(cfg.chunks, cfg.output, cfg.model)
    print(f"store written: {out}")
    return out


def cli(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(ImportConfig, main, argv, description=__doc__.split("\n\n")[0],
                   errors=(ValueError, StoreError, OSError))


if __name__ == "__main__":
    sys.exit(cli())
