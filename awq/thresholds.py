"""Where the shipped thresholds files live and which one a model gets by default."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

THRESHOLDS_DIR = Path(__file__).resolve().parent.parent / "thresholds"
ARTIFACT_FILE_NAME = "thresholds_{pct}_percent_sparsity.json"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shipped_thresholds(model_name: str, sparsity_pct: int = 50) -> Optional[Path]:
    """``thresholds/<model slug>/thresholds_<pct>_percent_sparsity.json`` if shipped, else None."""
    slug = model_name.lower().replace("/", "-")
    fname = ARTIFACT_FILE_NAME.format(pct=sparsity_pct)
    if not THRESHOLDS_DIR.is_dir():
        return None
    for d in sorted(THRESHOLDS_DIR.iterdir()):
        if d.is_dir() and (d.name == slug or d.name in slug) and (d / fname).is_file():
            return d / fname
    return None
