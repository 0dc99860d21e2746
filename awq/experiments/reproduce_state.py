"""Identity and safety of a ``python -m awq.reproduce`` results directory.

A results directory is resumable: finished steps are skipped on a rerun.  That is only sound
when the rerun is *the same run*, so the directory records ``fingerprint.json`` -- what produced
it: the model by content (:func:`awq.util.fingerprint.source_fingerprint`), the thresholds, corpus and
predictor files by sha256, and every option that changes a result (not the ones that only add
more steps, such as ``--ks``).  A rerun with another fingerprint is refused in one line;
``--force`` deletes this tool's outputs in the directory (nothing else) and starts over.  The
directory is locked (``DIR/.lock``) for the whole run: a second concurrent run is refused.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

from awq.load.models import model_source
from awq.util.fingerprint import cached_sha256, source_fingerprint
from awq.util.io import atomic_write_json

__all__ = ["ReproduceError", "FINGERPRINT", "OWN_ENTRIES", "run_fingerprint", "check_or_claim", "read_json"]

log = logging.getLogger("awq.experiments.reproduce")

FINGERPRINT = "fingerprint.json"
# what awq.experiments.reproduce writes in its directory (--force removes exactly these)
OWN_ENTRIES = ("runs", "centroids", "precision", "store", "plots", "summary.json", "summary.csv", "results.md",
               "timings.json", "config.json", FINGERPRINT)
# options that change a result (the others only select more or fewer steps, or where files go)
RESULT_OPTIONS = ("seqlen", "ppl_nsamples", "extract_nsamples", "max_rows", "eval_rows", "max_iter",
                  "baseline_max_iter", "seed")


class ReproduceError(ValueError):
    """A results directory belongs to another run, or one of its files is unreadable (one line)."""


def _file_id(path: Optional[str]) -> Any:
    if not path:
        return None
    p = Path(path)
    if not p.exists():
        raise ReproduceError(f"{path} does not exist")
    return source_fingerprint(str(p))


def run_fingerprint(cfg: Any) -> dict:
    """What a reproduce run's results depend on (JSON-able)."""
    return {
        "model": model_source(cfg.model_path),
        "thresholds": _file_id(cfg.thresholds),
        "data": _file_id(cfg.data_path) if cfg.data_path else {"default": "hub WikiText-2, else offline substitute"},
        "predictor": {"sha256": cached_sha256(cfg.predictor)} if cfg.predictor else None,
        "options": {k: getattr(cfg, k) for k in RESULT_OPTIONS},
    }


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        if k == "options":
            o, n = old.get(k) or {}, new.get(k) or {}
            out += [f"--{x} {o.get(x)!r} -> {n.get(x)!r}" for x in sorted(set(o) | set(n)) if o.get(x) != n.get(x)]
        elif old.get(k) != new.get(k):
            out.append(k)
    return out


def read_json(path: Path, what: str = "results file") -> Any:
    """JSON of ``path``; a truncated or corrupt file -> one-line :class:`ReproduceError` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReproduceError(f"{what} {path} is corrupt or truncated ({e.__class__.__name__}: {e}); delete it "
                             "(or rerun with --force) to recompute") from None


def _clear(out: Path, plots: Optional[Path]) -> None:
    for name in OWN_ENTRIES:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    if plots is not None and plots.is_dir() and out.resolve() in plots.resolve().parents:
        shutil.rmtree(plots)


def check_or_claim(out: Path, fingerprint: dict, force: bool, plots: Optional[Path] = None) -> None:
    """Refuse a results directory made by another run (or without a fingerprint); with ``force`` clear
    this tool's outputs first; then record ``fingerprint``.  Call while holding the directory's lock."""
    fp_file = out / FINGERPRINT
    if force:
        _clear(out, plots)
    elif fp_file.is_file():
        old = read_json(fp_file, "results fingerprint")
        diff = _differences(old if isinstance(old, dict) else {}, fingerprint)
        if diff:
            raise ReproduceError(f"results directory {out} was made by another run ({', '.join(diff)} differ); "
                                 "use another --out or --force to start over")
        return
    else:
        own = [n for n in OWN_ENTRIES if (out / n).exists() and n != "plots"]
        if own:
            raise ReproduceError(f"results directory {out} holds results of an unknown run ({own[0]} but no "
                                 f"{FINGERPRINT}); use another --out or --force to start over")
    atomic_write_json(fp_file, fingerprint, what="results fingerprint")
