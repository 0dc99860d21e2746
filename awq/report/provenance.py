"""Where a checked-in result came from: the ``provenance`` object of every ``results_ref/<name>.json``.

Each importer of :mod:`awq.report.importers` (and ``python -m awq.artifact --save_reference``) adds::

    "provenance": {
      "command":     the command that produced the figures (as typed, or rebuilt from the recorded config),
      "config":      the settings the run recorded (its config dataclass, bench config or fingerprint),
      "versions":    package versions ({"python": ..., "torch": ..., ...}),
      "versions_from": "run" (recorded by the run), "import" (the importing environment) or
                     "run+import" (what the run recorded, the rest from the importing environment),
      "git_commit":  40-hex commit, or null when it is not known,
      "git_commit_from": "run" or "import" (the checkout's HEAD when the import ran; "git_dirty" says whether
                     it had uncommitted changes) -- or, with a null commit, "git_commit_note" saying why,
      "imported_at": UTC time of the import (ISO 8601), or null when not known
    }

No field is ever guessed: what a run did not record and an import cannot observe is null, with a note.
:func:`problems` lists the files that lack a field; ``python -m awq.report --check`` and the tests use it.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import json
import platform
import re
import subprocess
from pathlib import Path
from typing import Any, Mapping, Optional

FIELDS = ("command", "config", "versions", "git_commit", "imported_at")
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "lm_eval", "numpy", "gguf", "safetensors",
            "scikit-learn", "llama_cpp_python")
_SHA = re.compile(r"[0-9a-f]{40}")


def environment_versions() -> dict[str, str]:
    """Python and the installed versions of the packages results depend on (absent ones left out)."""
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = _md.version(pkg)
        except _md.PackageNotFoundError:
            pass
    return out


def git_state(root: Optional[Path]) -> dict[str, Any]:
    """``{"commit": HEAD or None, "dirty": bool or None}`` of the checkout at ``root`` (None outside git)."""
    def git(*args: str) -> Optional[str]:
        try:
            r = subprocess.run(["git", "-C", str(root or "."), *args], capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout if r.returncode == 0 else None

    head = (git("rev-parse", "HEAD") or "").strip()
    if not _SHA.fullmatch(head):
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head, "dirty": None if status is None else bool(status.strip())}


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def make(command: str, config: Mapping[str, Any], run_versions: Optional[Mapping[str, str]] = None,
         run_commit: Optional[str] = None, root: Optional[Path] = None, note: Optional[str] = None) -> dict:
    """The provenance of a fresh import: ``run_versions`` / ``run_commit`` when the run recorded them, else
    (or for the packages it did not record) what this environment and the checkout at ``root`` show now."""
    env = environment_versions()
    run_versions = {k: v for k, v in (run_versions or {}).items() if v}
    if not run_versions:
        versions, vfrom = env, "import"
    elif set(env) <= set(run_versions):
        versions, vfrom = dict(run_versions), "run"
    else:
        versions, vfrom = {**env, **run_versions}, "run+import"
    prov: dict[str, Any] = {"command": command, "config": dict(config), "versions": versions, "versions_from": vfrom}
    if run_commit and _SHA.fullmatch(run_commit):
        prov.update(git_commit=run_commit, git_commit_from="run")
    else:
        g = git_state(root)
        prov.update(git_commit=g["commit"], git_commit_from="import", git_dirty=g["dirty"])
        if g["commit"] is None:
            prov["git_commit_note"] = "not a git checkout at import time; the run did not record its commit"
    prov["imported_at"] = now_utc()
    if note:
        prov["note"] = note
    return prov


def argv_of(config: Mapping[str, Any], skip: tuple[str, ...] = ()) -> str:
    """`` --name value`` for every recorded option that was set (None / False / empty left out; True as a bare
    flag; lists comma-joined): the command line of a run rebuilt from the config it recorded."""
    parts = []
    for k, v in config.items():
        if k in skip or v is None or v is False or v == [] or v == "":
            continue
        if v is True:
            parts.append(f" --{k}")
        elif isinstance(v, (list, tuple)):
            parts.append(f" --{k} {','.join(map(str, v))}")
        else:
            parts.append(f" --{k} {v}")
    return "".join(parts)


def problems(ref_dir: Path) -> list[str]:
    """One line per ``results_ref`` file whose provenance lacks a field (or has an unexplained null commit)."""
    out = []
    for f in sorted(Path(ref_dir).glob("*.json")):
        try:
            p = json.loads(f.read_text()).get("provenance")
        except (OSError, json.JSONDecodeError, AttributeError):
            out.append(f"{f.name}: not a JSON object")
            continue
        if not isinstance(p, dict):
            out.append(f"{f.name}: no provenance")
            continue
        missing = [k for k in FIELDS if k not in p]
        if missing:
            out.append(f"{f.name}: provenance lacks {', '.join(missing)}")
        elif not isinstance(p["command"], str) or not p["command"].strip():
            out.append(f"{f.name}: provenance has no command")
        elif p["git_commit"] is None and not p.get("git_commit_note"):
            out.append(f"{f.name}: provenance has a null git_commit without a git_commit_note")
        elif p["git_commit"] is not None and not _SHA.fullmatch(str(p["git_commit"])):
            out.append(f"{f.name}: provenance git_commit {p['git_commit']!r} is not a 40-hex commit")
    return out
