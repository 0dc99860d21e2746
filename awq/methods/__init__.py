"""Sparsity methods compared on the frontier, by name.

Every method is a config dataclass registered with :func:`awq.sparsify.register_method`; its module
meters the weights it reads per token (:mod:`awq.cost`). :data:`METHODS` maps the frontier's method
names to a :class:`MethodSpec`: how to calibrate a config at a target density from train-part
windows (``spec.calibrate(model, calib, density)``), the default sweep, and whether the method can
run without knowing the true mask (``realizable``).

``density`` is the fraction of the selected entries kept (x entries, h entries or neurons,
depending on the method); ``1 - density`` is the target sparsity.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from awq.methods.cats import CatsConfig, calibrate_cats
from awq.methods.common import MethodError, check_density, collect_mlp_inputs
from awq.methods.neuron_predictor import NeuronPredictorConfig, calibrate_neuron_predictor
from awq.methods.paper import VARIANTS, paper_config, paper_thresholds
from awq.methods.teal import LarosaConfig, TealConfig, WinaConfig, calibrate_larosa, calibrate_teal, calibrate_wina

__all__ = ["METHODS", "MethodSpec", "MethodError", "CalibData", "get_method", "check_density", "TealConfig",
           "WinaConfig", "LarosaConfig", "CatsConfig", "NeuronPredictorConfig", "extra_read", "config_summary"]


@dataclass
class CalibData:
    """Train-part windows plus the dense MLP inputs collected from them (once, on first use)."""

    windows: torch.Tensor
    model_name: Optional[str] = None
    max_tokens: Optional[int] = 4096
    seed: int = 0
    centroids: Optional[str] = None  # cluster_*: a --centroids spec (gate=FILE,up=FILE,down=FILE or a folder)
    predictor: Optional[str] = None  # cluster_predicted: an awq.predictor file
    _xs: Optional[list] = field(default=None, repr=False)

    def xs(self, model: nn.Module) -> list[torch.Tensor]:
        if self._xs is None:
            self._xs = collect_mlp_inputs(model, self.windows, self.max_tokens, self.seed)
        return self._xs


def as_calib(calib: Any) -> CalibData:
    return calib if isinstance(calib, CalibData) else CalibData(windows=calib)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    calibrate: Callable[[nn.Module, CalibData, float], Any]
    densities: tuple[float, ...]  # default sweep: read fractions of about 0.3 .. 0.8
    realizable: bool = True
    about: str = ""


def _paper(variant: str) -> Callable:
    def cal(model: nn.Module, calib: CalibData, density: float):
        thr, src = paper_thresholds(model, calib.windows, density, calib.model_name)
        cfg = paper_config(thr, variant)
        cfg.source = src  # type: ignore[attr-defined]
        return cfg
    return cal


def _dense(model: nn.Module, calib: CalibData, density: float):
    return None


def _xs_method(fn: Callable) -> Callable:
    return lambda model, calib, density: fn(model, calib.xs(model), check_density(density))


_PAPER_ABOUT = {"paper": "thresholds on gate, up and down outputs", "paper_gate": "paper, gate output only",
                "paper_up": "paper, up output only", "paper_gate_up": "paper, gate and up outputs",
                "paper_down": "paper, down output only (saves no reads)"}

METHODS: dict[str, MethodSpec] = {
    "dense": MethodSpec("dense", _dense, (1.0,), about="nothing zeroed"),
    **{v: MethodSpec(v, _paper(v), (0.3, 0.5, 0.7), about=_PAPER_ABOUT[v]) for v in VARIANTS},
    "cats": MethodSpec("cats", _xs_method(calibrate_cats), (0.1, 0.3, 0.5), about="neurons with small |act(gate(x))|"),
    "teal": MethodSpec("teal", _xs_method(calibrate_teal), (0.3, 0.5, 0.7), about="small |x| and |h| entries"),
    "wina": MethodSpec("wina", _xs_method(calibrate_wina), (0.3, 0.5, 0.7), about="small |x_i|·‖W[:, i]‖ entries"),
    "larosa": MethodSpec("larosa", _xs_method(calibrate_larosa), (0.25, 0.45, 0.65),
                         about="TEAL after a per-layer PCA rotation of x (rotation counted)"),
    "neuron_predictor": MethodSpec("neuron_predictor", _xs_method(calibrate_neuron_predictor), (0.25, 0.45, 0.65),
                                   about="low-rank predicted top-k neurons (predictor counted)"),
}


def _cluster(predicted: bool) -> Callable:
    def cal(model: nn.Module, calib: CalibData, density: float):
        from awq.methods.cluster import calibrate_cluster

        if predicted and not calib.predictor:
            raise MethodError("cluster_predicted needs a trained predictor: pass --predictor FILE")
        return calibrate_cluster(model, calib.windows, check_density(density), centroids=calib.centroids,
                                 predictor=calib.predictor if predicted else None, model_name=calib.model_name)
    return cal


METHODS["cluster_oracle"] = MethodSpec("cluster_oracle", _cluster(False), (0.5,), realizable=False,
                                       about="paper thresholds + true-mask centroid (needs --centroids)")
METHODS["cluster_predicted"] = MethodSpec("cluster_predicted", _cluster(True), (0.5,),
                                          about="paper thresholds + predicted centroid (needs --predictor)")
NEEDS_FILES = ("cluster_oracle", "cluster_predicted")  # left out of the default method list without files


def _cluster_neuron(**variant) -> Callable:
    def cal(model: nn.Module, calib: CalibData, density: float):
        from awq.methods.cluster_neuron import ClusterVariant, calibrate_cluster_neuron

        return calibrate_cluster_neuron(model, calib.xs(model), check_density(density), ClusterVariant(**variant),
                                        seed=calib.seed)
    return cal


# issue 10: one intermediate-neuron mask per token from per-layer codebooks (awq.methods.cluster_neuron);
# param = nominal read fraction. *_oracle: the centroid covering the most |h| of the true token.
CLUSTER_NEURON = {
    "cluster_neuron_oracle": (dict(routed=False), "per-layer K=64 |h|-coverage centroids, oracle pick"),
    "cluster_neuron": (dict(), "per-layer K=64 centroids, linear router pick (router counted)"),
    "cluster_pooled_oracle": (dict(routed=False, pooled=True),
                              "one pooled codebook of 64 x layers centroids (equal memory), oracle pick"),
    "cluster_binary_oracle": (dict(routed=False, weighting="binary"),
                              "centroids fitted on binary active sets (AWC-like), oracle pick"),
    "cluster_union2": (dict(top_m=2), "union of the top-2 routed centroids"),
    "cluster_union4": (dict(top_m=4), "union of the top-4 routed centroids"),
    "cluster_hot": (dict(hot_q=0.5), "hot set (active on > 50% of tokens) + routed centroid"),
    "cluster_thresh_oracle": (dict(routed=False, within="gate"), "oracle centroid, then |act(g)| threshold in it"),
    "cluster_thresh": (dict(within="gate"), "routed centroid (gate rows), then |act(g)| threshold in it"),
    "cluster_hthresh_oracle": (dict(routed=False, within="h"), "oracle centroid, then |h| threshold in it"),
    "cluster_hthresh": (dict(within="h"), "routed centroid (gate+up rows), then |h| threshold in it"),
    "cluster_ideal_oracle": (dict(routed=False, k=1, within="ideal"),
                             "bound of any neuron mask: per-token |h| threshold, all three projections masked"),
}
for _k in (128, 256):  # K sweep (issue 10): the same variants with K centroids per layer
    for _base in ("cluster_thresh", "cluster_thresh_oracle", "cluster_neuron", "cluster_neuron_oracle"):
        CLUSTER_NEURON[f"{_base}_k{_k}"] = ({**CLUSTER_NEURON[_base][0], "k": _k},
                                            CLUSTER_NEURON[_base][1].replace("K=64 ", "") + f", K={_k}")
for _name, (_kw, _about) in CLUSTER_NEURON.items():
    METHODS[_name] = MethodSpec(_name, _cluster_neuron(**_kw), (0.3, 0.5), realizable=_kw.get("routed", True),
                                about=_about)


def get_method(name: str) -> MethodSpec:
    if name in METHODS:
        return METHODS[name]
    raise MethodError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")


def extra_read(cfg: Any, model: nn.Module) -> float:
    """Weight bytes a method reads besides the MLP's (predictor, rotation), as a fraction of the MLP's."""
    fn = getattr(cfg, "extra_read", None)
    return float(fn(model)) if callable(fn) else 0.0


def config_summary(cfg: Any) -> dict:
    """What a point JSON records of a config (thresholds, not big tensors)."""
    if cfg is None:
        return {}
    fn = getattr(cfg, "summary", None)
    if callable(fn):
        return fn()
    out = {"thresholds": getattr(cfg, "thresholds", None)}
    if hasattr(cfg, "source"):
        out["source"] = cfg.source
    return out


# issue 21 (branch methods): new methods, each self-contained in its own file; one registry entry each
def _lowbit(bits: int) -> Callable:
    def cal(model: nn.Module, calib: CalibData, density: float):
        from awq.methods.lowbit_rank import calibrate_lowbit_rank

        return calibrate_lowbit_rank(model, calib.xs(model), check_density(density), bits=bits)
    return cal


METHODS["lowbit_rank"] = MethodSpec("lowbit_rank", _lowbit(4), (0.22, 0.32, 0.41, 0.5),
                                    about="neurons ranked by |act(g~) u~| from a 4-bit copy of gate/up (copy counted)")


def _lazy(module: str, fn: str, **kw) -> Callable:
    """Calibrate with ``awq.methods.<module>.<fn>(model, xs, density, **kw)`` (imported on first use)."""
    def cal(model: nn.Module, calib: CalibData, density: float):
        import importlib

        f = getattr(importlib.import_module(f"awq.methods.{module}"), fn)
        return f(model, calib.xs(model), check_density(density), **kw)
    return cal


METHODS["rsparse"] = MethodSpec("rsparse", _lazy("rsparse", "calibrate_rsparse"), (0.3, 0.4, 0.5, 0.6),
                                about="R-Sparse: top-|x| channels exact + rank-r SVD remainder, per-layer rank/split "
                                      "search (factors counted); param = read budget")
METHODS["scap"] = MethodSpec("scap", _lazy("scap", "calibrate_scap"), (0.3, 0.4, 0.5, 0.6),
                             about="SCAP: input pruning after mode-centering, calibrated x/h split; param = read budget")
METHODS["griffin"] = MethodSpec("griffin", _lazy("prompt_sets", "calibrate_griffin"), (0.4, 0.5, 0.6, 0.7),
                                about="GRIFFIN: one neuron set per sequence from the prompt (needs --protocol prompt:P)")
METHODS["cluster_lowbit"] = MethodSpec("cluster_lowbit", _lazy("cluster_lowbit", "calibrate_cluster_lowbit",
                                                                candidates=0.8),
                                       (0.3, 0.4, 0.45), about="routed centroid (80% of neurons) as candidates, 4-bit "
                                       "copy ranks inside (router + copy rows counted)")


def _griffin_refine(candidates: Optional[float], **kw) -> Callable:
    """GRIFFIN candidates (``candidates`` share; None: the param itself, for a fixed centroid) + low-bit ranking."""
    def cal(model: nn.Module, calib: CalibData, density: float):
        from awq.methods.prompt_sets import calibrate_griffin_refine

        d = check_density(density)
        return calibrate_griffin_refine(model, calib.xs(model), d, candidates if candidates is not None else d,
                                        seed=calib.seed, **kw)
    return cal


METHODS["griffin_lowbit"] = MethodSpec("griffin_lowbit", _griffin_refine(0.9), (0.41,),
                                       about="GRIFFIN top 90% as candidates, 4-bit copy ranks inside per token "
                                             "(threshold from the prompt; copy rows counted; needs the prompt protocol)")
METHODS["griffin_centroid"] = MethodSpec("griffin_centroid", _griffin_refine(None, centroids_k=16, refine=False),
                                         (0.5, 0.7), about="the prompt picks one of 16 per-layer centroids (GRIFFIN "
                                         "score coverage), fixed for the continuation; needs the prompt protocol")
