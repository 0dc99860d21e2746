"""Threshold files: the artifact's JSON format (read, validate, write) and the shipped defaults."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

from awq.load.arch import PROJS
from awq.util.io import atomic_write_json, file_sha256  # noqa: F401  (file_sha256 re-exported for callers)

THRESHOLDS_DIR = Path(__file__).resolve().parents[2] / "thresholds"
ARTIFACT_FILE_NAME = "thresholds_{pct}_percent_sparsity.json"


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


class ThresholdsError(ValueError):
    """A thresholds file is missing, malformed or does not match the model."""


# --------------------------------------------------------------------------------------------
# thresholds files (the artifact's JSON format)
# --------------------------------------------------------------------------------------------
def load_thresholds(path: str | Path, num_layers: Optional[int] = None) -> dict[str, list[float]]:
    """Read ``{"gate_proj": {"layer_0": t, ...}, "up_proj": ..., "down_proj": ...}``.

    Returns ``{proj: [t_0, ..., t_{L-1}]}``.  An ``act_fn`` key is ignored.  Raises
    :class:`ThresholdsError` with a one-line message on any problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ThresholdsError(f"thresholds file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ThresholdsError(f"thresholds file {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ThresholdsError(f"thresholds file {path}: expected a JSON object with keys {list(PROJS)}")
    out: dict[str, list[float]] = {}
    for proj in PROJS:
        if proj not in raw:
            raise ThresholdsError(f"thresholds file {path} has no '{proj}' entry")
        per = raw[proj]
        if not isinstance(per, dict) or not per:
            raise ThresholdsError(f"thresholds file {path}: '{proj}' must map 'layer_<i>' to numbers")
        idx = {}
        for key, val in per.items():
            if not (isinstance(key, str) and key.startswith("layer_") and key[6:].isdigit()):
                raise ThresholdsError(f"thresholds file {path}: bad key '{key}' under '{proj}' (want layer_<i>)")
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or not val >= 0:
                raise ThresholdsError(f"thresholds file {path}: {proj}.{key} = {val!r} is not a finite non-negative number")
            idx[int(key[6:])] = float(val)
        n = len(idx)
        if sorted(idx) != list(range(n)):
            raise ThresholdsError(f"thresholds file {path}: '{proj}' layers are not 0..{n - 1}")
        out[proj] = [idx[i] for i in range(n)]
    counts = {p: len(v) for p, v in out.items()}
    if len(set(counts.values())) != 1:
        raise ThresholdsError(f"thresholds file {path}: projections disagree on the layer count {counts}")
    if num_layers is not None and counts["gate_proj"] != num_layers:
        raise ThresholdsError(
            f"thresholds file {path} has {counts['gate_proj']} layers but the model has {num_layers} decoder layers"
        )
    return out


def save_thresholds(thresholds: Mapping[str, Sequence[float]], path: str | Path, extra: Optional[dict] = None) -> None:
    """Write thresholds in the artifact's format (atomically)."""
    obj = {p: {f"layer_{i}": float(t) for i, t in enumerate(thresholds[p])} for p in PROJS}
    if extra:
        obj["_meta"] = extra
    atomic_write_json(path, obj, what="thresholds file")


def check_thresholds(thresholds: Optional[Mapping[str, Sequence[float]]], num_layers: Optional[int] = None) -> None:
    """A method config's per-layer thresholds: every projection present and, given ``num_layers``, one value per
    decoder layer (:class:`ThresholdsError`, one line, otherwise). ``None`` (no thresholds) passes."""
    if thresholds is None:
        return
    missing = [p for p in PROJS if p not in thresholds]
    if missing:
        raise ThresholdsError(f"thresholds lack {missing}")
    if num_layers is not None:
        for p in PROJS:
            if len(thresholds[p]) != num_layers:
                raise ThresholdsError(f"thresholds ({p}) have {len(thresholds[p])} layers but the model has "
                                      f"{num_layers} decoder layers: they must have {num_layers} entries (one per layer)")
