"""Generated blocks for the benchmarks of ``bench/`` that have no table of their own (docs/benchmarks.md).

``python -m awq.report --import_bench FILE [NAME]`` copies the JSON a ``python bench/<script>.py ... --output
FILE`` run wrote (:class:`bench.common.Report`) into ``results_ref/<NAME>.json`` (NAME defaults to the bench's
name; ``bench_clustering_avx2`` holds the AVX2-only run of ``bench_clustering.py``), with its provenance.  The block
of the same name shows the command, the machine and load, and every line the bench printed (timings with their
spread, each ratio beside its roofline, ratios above it flagged as measurement errors by the bench itself).
Until a run is imported the block says so and names the commands, and shows no figure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from awq.report import provenance
from awq.report.importers import RunOutputError, _load, _ref, _root
from awq.util import paths
from awq.util.io import atomic_write_json

BENCH_REFS = {  # block / results_ref name -> (script, how to run it)
    "bench_ppl": ("bench_ppl", "python bench/bench_ppl.py --repeats 5 --output F"),
    "bench_clustering": ("bench_clustering", "python bench/bench_clustering.py --output F"),
    "bench_clustering_avx2": ("bench_clustering", ('AWQ_HW_FLAGS="avx2 fma" ATEN_CPU_CAPABILITY=avx2 '
                                                   "OPENBLAS_CORETYPE=Haswell MKL_ENABLE_INSTRUCTIONS=AVX2 "
                                                   "ONEDNN_MAX_CPU_ISA=AVX2 python bench/bench_clustering.py --output F")),
    "bench_predictor": ("bench_predictor", "python bench/bench_predictor.py --output F"),
}
DERIVED = ("cap_m", "kernel_used", "model", "thresholds_file", "windows", "note", "kernel_path", "output")


def bench_command(data: dict) -> str:
    """The bench's command line rebuilt from the config it recorded (derived settings left out)."""
    env = "".join(f"{k}={v} " for k, v in (data.get("figures", {}).get("baseline_isa_env") or {}).items())
    cfg = data.get("config", {})
    out = f" --output {paths.display(Path(cfg['output']))}" if cfg.get("output") else ""
    return f"{env}python bench/{data['bench']}.py" + provenance.argv_of(cfg, skip=DERIVED) + out


def import_bench(bench_json: Path, name: Optional[str] = None, ref_dir: Optional[Path] = None,
                 command: Optional[str] = None) -> Path:
    """A ``bench/<script>.py --output F`` JSON -> ``results_ref/<name>.json`` (name in :data:`BENCH_REFS`)."""
    f = Path(bench_json)
    b = _load(f, "run the bench with --output FILE first")
    bench = b.get("bench") if isinstance(b, dict) else None
    name = name or bench
    if name not in BENCH_REFS:
        raise RunOutputError(f"--import_bench NAME must be one of {', '.join(BENCH_REFS)}, got {name!r}")
    if bench != BENCH_REFS[name][0] or not isinstance(b.get("lines"), list):
        raise RunOutputError(f"{f} is not a {BENCH_REFS[name][0]}.py output (bench: {bench!r})")
    cmd = command or bench_command(b)
    b["provenance"] = provenance.make(cmd, b.get("config", {}), {"torch": b.get("system", {}).get("torch")},
                                      run_commit=b.get("git_commit"), root=_root(ref_dir),
                                      note=None if command else "command rebuilt from the recorded config")
    ref = _ref(ref_dir, name)
    atomic_write_json(ref, b)
    return ref


def bench_block(name: str) -> Callable[[dict], str]:
    def block(refs: dict) -> str:
        data = refs.get(name)
        if data is None:
            return (f"No checked-in run yet: `{BENCH_REFS[name][1]}`, then `python -m awq.report --import_bench F "
                    f"{name}` and `python -m awq.report` put its figures here.\n")
        s, p = data.get("system", {}), data.get("provenance", {})
        head = (f"`{p.get('command') or bench_command(data)}` — CPU `{s.get('cpu')}`, flags "
                f"{' '.join(s.get('flags') or []) or 'none listed'}, {s.get('torch_threads')} thread(s) of "
                f"{s.get('cpus')}, torch {s.get('torch')}; load average {s.get('loadavg')} at start, "
                f"{s.get('loadavg_end')} at the end. What it printed:\n\n")
        lines = [ln for ln in data["lines"] if not ln.startswith(f"# {data['bench']} |")]
        return head + "```\n" + "\n".join(lines) + "\n```\n"
    return block


BENCH_BLOCKS = {name: bench_block(name) for name in BENCH_REFS}
