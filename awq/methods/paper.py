"""The paper's thresholds (``awq.methods.paper_mlp.SparsityConfig``) as frontier methods, whole and per projection.

``paper`` thresholds the outputs of gate, up and down; the per-projection variants keep one or two
projections' thresholds and zero the others (``paper_gate``, ``paper_up``, ``paper_gate_up``,
``paper_down``). Thresholds for density ``d`` are the shipped file for ``round(100 (1 - d))``%
sparsity when one exists for the model, else calibrated on the train windows with
:func:`awq.methods.calibration.calibrate` (exact streamed quantiles). ``SparseMLP`` meters itself: gate and up
are read in full, down only for the nonzero ``h`` (thresholding down's output saves no reads). At
batch 1 every variant runs the kernel of :mod:`awq.methods.paper_decode` (``SparseMLP.prepare_decode``), which
reads exactly that, so ``awq.experiments.frontier --speed`` times them all.
"""
from __future__ import annotations

import logging
from typing import Optional

from torch import nn

from awq.load.arch import PROJS, decoder_layers
from awq.methods.calibration import calibrate
from awq.methods.common import check_density
from awq.methods.paper_mlp import SparsityConfig
from awq.store.thresholds import load_thresholds, shipped_thresholds

log = logging.getLogger(__name__)

VARIANTS: dict[str, tuple[str, ...]] = {
    "paper": PROJS,
    "paper_gate": ("gate_proj",),
    "paper_up": ("up_proj",),
    "paper_gate_up": ("gate_proj", "up_proj"),
    "paper_down": ("down_proj",),
}


def paper_thresholds(model: nn.Module, windows, density: float, model_name: Optional[str] = None) -> tuple[dict, str]:
    """``({proj: [t per layer]}, source)`` for the paper's scheme at ``density`` (1 - sparsity)."""
    check_density(density)
    n = len(decoder_layers(model))
    if density == 1.0:
        return {p: [0.0] * n for p in PROJS}, "none"
    pct = round(100 * (1.0 - density))
    if model_name and abs(pct - 100 * (1.0 - density)) < 1e-6:
        path = shipped_thresholds(model_name, pct)
        if path is not None:
            return load_thresholds(path, n), str(path)

    log.info("calibrating the paper's thresholds at %.1f%% sparsity on %d windows", 100 * (1 - density), windows.size(0))
    return calibrate(model, windows, 1.0 - density, n), f"calibrated on {windows.size(0)} train windows"


def paper_config(thresholds: dict, variant: str = "paper") -> SparsityConfig:
    keep = VARIANTS[variant]
    return SparsityConfig(thresholds={p: (list(thresholds[p]) if p in keep else [0.0] * len(thresholds[p]))
                                      for p in PROJS})
