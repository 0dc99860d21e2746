"""The tests' tiny tokenizer is the same in every process (the figures computed on the tiny model depend on it)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CODE = ("import sys; sys.path.insert(0, sys.argv[1]); import conftest; "
        "print(conftest.tiny_tokenizer().backend_tokenizer.to_str())")


def test_tiny_tokenizer_is_deterministic_across_processes():
    tests = str(Path(__file__).parent)
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = subprocess.run([sys.executable, "-c", CODE, tests], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r.stdout)
    assert outs[0] == outs[1]
