"""The checked-in results every generated figure comes from: ``results_ref/<name>.json``, loaded and checked."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from awq.util import paths

REF_FILES = ("reproduce", "predictor", "sparse_mlp", "frontier", "frontier_qwen", "quick", "run_default",
             "decode_smollm2", "decode_qwen", "decode_smollm2_avx2", "frontier_cluster", "frontier_cluster_qwen",
             "bench_ppl", "bench_clustering", "bench_clustering_avx2", "bench_predictor",
             "decode_quant_smollm2", "decode_quant_qwen", "decode_quant_smollm2_avx2", "decode_quant_qwen_avx2",
             "frontier_prompt", "frontier_quant", "frontier_quant_qwen")
TARGETS = ("README.md", "ARTIFACT.md")  # plus every docs/*.md: see target_files


def target_files(root: Path) -> list[str]:
    """The files holding generated blocks, relative to ``root``: README.md, ARTIFACT.md and docs/*.md."""
    root = Path(root)
    return [*TARGETS, *sorted(str(f.relative_to(root)) for f in (root / "docs").glob("*.md"))]


class ReportError(ValueError):
    """Missing results file, unknown block name or unbalanced markers (one line)."""


def load_refs(ref_dir: Optional[Path] = None) -> dict:
    """The checked-in summaries, by name (a missing optional file is absent)."""
    ref_dir = Path(ref_dir) if ref_dir else paths.results_ref_dir()
    refs = {}
    for name in REF_FILES:
        f = ref_dir / f"{name}.json"
        if f.is_file():
            try:
                refs[name] = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ReportError(f"{f}: not valid JSON ({e})") from None
    if "reproduce" not in refs:
        raise ReportError(f"no {ref_dir / 'reproduce.json'}: the reproduced results (docs/results.md) come from it")
    return refs


# ---------------------------------------------------------------------------------------------
# docs/results.md blocks (from results_ref/reproduce.json)
# ---------------------------------------------------------------------------------------------
