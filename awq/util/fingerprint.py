"""Identity of what produced an output: fingerprints of models, files and configurations.

A resumable output (pattern store, reproduce directory, predictor) records the fingerprint of what
produced it, and a rerun whose fingerprint differs is refused in one line instead of mixing two runs.

* :func:`weights_fingerprint` -- of a loaded model: sha256 over every parameter/buffer's name,
  shape, dtype and a fixed sample of its exact bytes (first, last and evenly strided elements).
  Device independent and cheap (no full copy of a 7B model to the CPU); two different checkpoints
  of one architecture differ in practically every sampled element.
* :func:`source_fingerprint` -- of a ``--model_path`` before loading: the resolved path plus the
  sha256 of the file (a GGUF) or of every top-level file of a model directory (weights, config,
  tokenizer); a hub id is kept as given (a pinned revision belongs in it).  File hashes are cached
  by (resolved path, size, mtime, inode) in ``~/.cache/awq-sparsity/sha256.json``.
* :func:`config_fingerprint` -- sha256 of a JSON-able dict (sorted keys).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

from awq.util.cache import cache_root
from awq.util.io import atomic_write_json, file_sha256

__all__ = ["weights_fingerprint", "source_fingerprint", "cached_sha256", "config_fingerprint"]

log = logging.getLogger(__name__)
_SAMPLE = 4096  # elements sampled per tensor (plus the first and last 256)


def config_fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_sample_bytes(t) -> bytes:
    import torch

    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return b""
    step = max(1, n // _SAMPLE)
    parts = [flat[:256], flat[::step][:_SAMPLE], flat[-256:]]
    out = torch.cat([p.to("cpu") for p in parts]).contiguous()
    return out.view(torch.uint8).numpy().tobytes()


def weights_fingerprint(model) -> str:
    """sha256 over (name, shape, dtype, sampled exact bytes) of every tensor of ``model``.

    Covers the state dict (including the swapped MLP modules' registered buffers) and the
    original MLPs kept unregistered by ``awq.methods.base`` (``mlp.base``).
    """
    h = hashlib.sha256()
    seen: set[tuple[int, tuple]] = set()

    def add(name: str, t) -> None:
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            return
        seen.add(key)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(_tensor_sample_bytes(t))

    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        add(name, t)
    for mname, mod in model.named_modules():
        base = getattr(mod, "_base", None)
        if base is not None and hasattr(base, "state_dict"):
            for name, t in sorted(base.state_dict().items()):
                add(f"{mname}.base.{name}", t)
    return h.hexdigest()


def _cache_file() -> Path:
    return cache_root() / "sha256.json"


def cached_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered by (resolved path, size, mtime_ns, inode); a changed file is rehashed."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache = _cache_file()
    table: dict = {}
    try:
        table = json.loads(cache.read_text())
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    if isinstance(table.get(key), str) and len(table[key]) == 64:
        return table[key]
    digest = file_sha256(p)
    table = {k: v for k, v in table.items() if not k.startswith(f"{p}|")}
    table[key] = digest
    try:
        atomic_write_json(cache, table, what="sha256 cache", indent=None)
    except OSError as e:  # a read-only home is no reason to fail
        log.debug("cannot update %s: %s", cache, e)
    return digest


def source_fingerprint(model_path: str | Path, revision: Optional[str] = None) -> dict:
    """What a resolved ``--model_path`` names, by content: {"path", "sha256"} (a file or directory) or
    {"hub_id", "revision"}.  The embedded default is resolved by the caller (:func:`awq.load.models.model_source`)."""
    p = Path(model_path).expanduser()
    if p.is_file():
        return {"path": str(p.resolve()), "sha256": cached_sha256(p)}
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")):
            h.update(f"{f.name}|{cached_sha256(f)}\n".encode())
        return {"path": str(p.resolve()), "sha256": h.hexdigest()}
    return {"hub_id": str(model_path), "revision": revision}
