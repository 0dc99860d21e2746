"""Default locations of the artifact's files, resolved against the project root (never the cwd).

The artifact's two-step flow chains through these::

    python -m awq.entry --dump_masks                       # -> default_store()      (results/masks)
    python clustering/activation_aware_clustering.py       # -> default_centroid_dir() (results/centroids/awc)
    python -m awq.entry --centroids results/centroids/awc

The project root is ``$AWQ_PROJECT_ROOT`` when set (tests point it at a temporary directory), else
the directory holding this package (the repository checkout; an editable install keeps it there).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from awq.util import env

ROOT_ENV = "AWQ_PROJECT_ROOT"
STORE_REL = Path("results/masks")
CENTROID_REL = Path("results/centroids/awc")
RESULTS_REF_REL = Path("results_ref")


def project_root() -> Path:
    """The repository root: ``$AWQ_PROJECT_ROOT`` or the parent of the ``awq`` package."""
    root = env.get_str(ROOT_ENV)
    if root:
        return Path(root).expanduser().resolve()
    return Path(__file__).resolve().parents[2]


def default_store(root: Optional[Path] = None) -> Path:
    """The default pattern store (``<root>/results/masks``), written by ``awq.entry --dump_masks``."""
    return (Path(root) if root else project_root()) / STORE_REL


def default_centroid_dir(root: Optional[Path] = None) -> Path:
    """Where the no-argument clustering run writes its centroids (``<root>/results/centroids/awc``; one
    file per projection, ``gate_proj.pt`` ...)."""
    return (Path(root) if root else project_root()) / CENTROID_REL


def results_ref_dir(root: Optional[Path] = None) -> Path:
    """The checked-in results summaries that README/ARTIFACT tables are generated from."""
    return (Path(root) if root else project_root()) / RESULTS_REF_REL


def display(path: Path, root: Optional[Path] = None) -> str:
    """``path`` relative to the project root when it lies inside it (for messages), else absolute."""
    root = Path(root) if root else project_root()
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def fill_bare_option(argv: Sequence[str], flag: str, value: str | Path) -> list[str]:
    """``[..., flag]`` or ``[..., flag, --other ...]`` -> ``flag value``: a bare flag takes its default location.

    For options such as ``awq.entry --dump_masks`` whose value is a directory with a documented
    default: ``fill_bare_option(sys.argv[1:], "--dump_masks", default_store())`` before parsing.
    ``flag=VALUE`` and ``flag VALUE`` are left as they are.
    """
    out = list(argv)
    i = 0
    while i < len(out):
        if out[i] == flag and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, str(value))
            i += 1
        i += 1
    return out


__all__ = ["ROOT_ENV", "project_root", "default_store", "default_centroid_dir", "results_ref_dir", "display",
           "fill_bare_option"]
