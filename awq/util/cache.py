"""The one cache root of the project: ``$AWQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/awq-sparsity``, else
``~/.cache/awq-sparsity``.  Everything cached (converted models, the corpus, kernel builds, hardware choices,
file hashes, default predictors) lives in a named folder under it."""
from __future__ import annotations

from pathlib import Path

from awq.util import env


def cache_root() -> Path:
    """The cache root (not created)."""
    base = env.get_str("AWQ_CACHE_DIR")
    if base:
        return Path(base).expanduser()
    xdg = env.get_str("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "awq-sparsity"


def cache_dir(*parts: str) -> Path:
    """The cache root joined with ``parts``, created if needed."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
