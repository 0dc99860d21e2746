"""The one method registry: every sparsity method by name, read by every command.

A method is one file of :mod:`awq.methods` (a :class:`~awq.methods.base.MethodConfig` whose ``build`` makes
the layer's :class:`~awq.methods.base.SwappedMLP`, and a calibration) plus one :class:`MethodSpec` here:

* ``config``: the config class; ``calibrate(model, calib, density) -> config`` (``None``: dense) from
  train-part windows (:class:`~awq.methods.common.CalibData`);
* ``densities``: the frontier's default sweep (``density`` is the fraction of the selected entries kept: x
  entries, h entries or neurons, depending on the method; ``1 - density`` is the target sparsity);
* ``realizable``: whether it runs without knowing the true mask (oracles are bounds, not methods);
* ``kernel``: its batch-1 decode kernel, or why it has none;
* ``default``: in the frontier's default method list; ``needs``: the file option it needs (``centroids``,
  ``predictor``), without which it is left out of defaults and refused when named;
* ``needs_prompt``: it chooses its neurons from a prompt (:mod:`awq.methods.protocol`), so it runs only under
  ``--protocol prompt:P``.

``python -m awq.entry --method NAME --density D``, ``python -m awq.frontier --methods``, ``python -m
awq.generate --method`` and ``bench/bench_decode.py --methods`` all read :data:`METHODS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from awq.methods.base import MethodConfig
from awq.methods.cats import CatsConfig, calibrate_cats
from awq.methods.cluster import ClusterConfig, calibrate_cluster
from awq.methods.cluster_lowbit import ClusterLowbitConfig, calibrate_cluster_lowbit
from awq.methods.cluster_neuron import ClusterNeuronConfig, ClusterVariant, calibrate_cluster_neuron
from awq.methods.common import CalibData, MethodError, check_density
from awq.methods.gathered import GatheredConfig, random_sets
from awq.methods.greedy import TealGreedyConfig, WinaGreedyConfig, calibrate_greedy
from awq.methods.larosa import (
    LarosaFoldedConfig,
    LarosaTopkConfig,
    calibrate_larosa_folded,
    calibrate_larosa_folded_greedy,
    calibrate_larosa_topk,
)
from awq.methods.lowbit_rank import LowbitRankConfig, calibrate_lowbit_rank
from awq.methods.neuron_predictor import NeuronPredictorConfig, calibrate_neuron_predictor
from awq.methods.paper import VARIANTS, paper_config, paper_thresholds
from awq.methods.paper_mlp import SparsityConfig
from awq.methods.prompt_sets import GriffinConfig, GriffinRefineConfig, calibrate_griffin, calibrate_griffin_refine
from awq.methods.rsparse import RSparseConfig, calibrate_rsparse
from awq.methods.scap import ScapConfig, calibrate_scap
from awq.methods.teal import LarosaConfig, TealConfig, WinaConfig, calibrate_larosa, calibrate_teal, calibrate_wina
from awq.methods.topk import TopKConfig, calibrate_topk

Calibrate = Callable[[nn.Module, CalibData, float], Optional[MethodConfig]]

ROW_KERNEL = "row-gathered (gate rows, then up/down rows of the kept neurons)"
COLUMN_KERNEL = "column-gathered (gate/up columns of kept inputs, down rows of kept h)"


NEEDS = {"centroids": "centroid files: pass --centroids gate=FILE,up=FILE,down=FILE or a folder",
         "predictor": "a trained predictor: pass --predictor FILE (python -m awq.predictor train)"}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: Optional[type]  # a MethodConfig subclass (None: dense)
    calibrate: Calibrate
    densities: tuple[float, ...]  # default sweep
    realizable: bool = True
    kernel: str = ""  # the batch-1 decode kernel, or "none: <why>"
    about: str = ""
    default: bool = True  # in the frontier's default method list
    needs: Optional[str] = None  # "centroids" / "predictor": the file option the method needs
    needs_prompt: bool = False  # chooses its neurons from a prompt: refused under the standard protocol


def on_inputs(fn: Callable) -> Calibrate:
    """A calibration of the dense MLP inputs ``fn(model, xs, density)`` as a registry calibration."""
    return lambda model, calib, density: fn(model, calib.xs(model), check_density(density))


def _paper(variant: str) -> Calibrate:
    def cal(model: nn.Module, calib: CalibData, density: float) -> SparsityConfig:
        thr, src = paper_thresholds(model, calib.windows, density, calib.model_name)
        cfg = paper_config(thr, variant)
        cfg.source = src
        return cfg
    return cal


def _cluster(predicted: bool) -> Calibrate:
    def cal(model: nn.Module, calib: CalibData, density: float) -> ClusterConfig:
        name = "cluster_predicted" if predicted else "cluster_oracle"
        if not calib.centroids and not predicted:
            raise MethodError(f"{name} needs {NEEDS['centroids']}")
        if predicted and not calib.predictor:
            raise MethodError(f"{name} needs {NEEDS['predictor']}")
        return calibrate_cluster(model, calib.windows, check_density(density), centroids=calib.centroids,
                                 predictor=calib.predictor if predicted else None, model_name=calib.model_name)
    return cal


def _cluster_neuron(**variant) -> Calibrate:
    def cal(model: nn.Module, calib: CalibData, density: float) -> ClusterNeuronConfig:
        return calibrate_cluster_neuron(model, calib.xs(model), check_density(density), ClusterVariant(**variant),
                                        seed=calib.seed)
    return cal


def _greedy(kind: str) -> Calibrate:
    def cal(model: nn.Module, calib: CalibData, density: float) -> MethodConfig:
        return calibrate_greedy(model, calib.xs(model), check_density(density), kind=kind, cache=calib.cache,
                                seed=calib.seed)
    return cal


def _larosa_folded_greedy(model: nn.Module, calib: CalibData, density: float) -> LarosaFoldedConfig:
    return calibrate_larosa_folded_greedy(model, calib.xs(model), check_density(density), cache=calib.cache,
                                          seed=calib.seed)


def _griffin_refine(candidates: Optional[float], **kw) -> Calibrate:
    """GRIFFIN candidates (``candidates`` share; None: the density itself, for a fixed centroid) + low-bit ranking."""
    def cal(model: nn.Module, calib: CalibData, density: float) -> GriffinRefineConfig:
        d = check_density(density)
        return calibrate_griffin_refine(model, calib.xs(model), d, candidates if candidates is not None else d,
                                        seed=calib.seed, **kw)
    return cal


def _cluster_lowbit(model: nn.Module, calib: CalibData, density: float) -> ClusterLowbitConfig:
    return calibrate_cluster_lowbit(model, calib.xs(model), check_density(density), candidates=0.8, seed=calib.seed)


LOWBIT_KERNEL = "low-bit scores (csrc/lowbit_rank.cpp), then " + ROW_KERNEL.split(" (")[0] + " rows of the kept neurons"
FOLDED_KERNEL = ("none: an evaluation module (rotates at run time); the folded model "
                 "(awq.methods.larosa.fold_rotation) runs TEAL's column-gathered kernel")
PAPER_KERNEL = "paper ([gate; up] GEMV, thresholds, rows of W_down for nonzero h)"
_PAPER_ABOUT = {"paper": "thresholds on gate, up and down outputs", "paper_gate": "paper, gate output only",
                "paper_up": "paper, up output only", "paper_gate_up": "paper, gate and up outputs",
                "paper_down": "paper, down output only (saves no reads)"}

_SPECS: list[MethodSpec] = [
    MethodSpec("dense", None, lambda model, calib, density: None, (1.0,), kernel="dense", about="nothing zeroed"),
    *(MethodSpec(v, SparsityConfig, _paper(v), (0.3, 0.5, 0.7), kernel=PAPER_KERNEL, about=_PAPER_ABOUT[v])
      for v in VARIANTS),
    MethodSpec("cats", CatsConfig, on_inputs(calibrate_cats), (0.1, 0.3, 0.5), kernel=ROW_KERNEL,
               about="neurons with small |act(gate(x))|"),
    MethodSpec("teal", TealConfig, on_inputs(calibrate_teal), (0.3, 0.5, 0.7), kernel=COLUMN_KERNEL,
               about="small |x| and |h| entries"),
    MethodSpec("wina", WinaConfig, on_inputs(calibrate_wina), (0.3, 0.5, 0.7), kernel=COLUMN_KERNEL,
               about="small |x_i|·‖W[:, i]‖ entries"),
    MethodSpec("larosa", LarosaConfig, on_inputs(calibrate_larosa), (0.25, 0.45, 0.65), kernel=COLUMN_KERNEL,
               about="TEAL after a per-layer PCA rotation of x (rotation counted)"),
    MethodSpec("teal_greedy", TealGreedyConfig, _greedy("teal"), (0.3, 0.5, 0.7), kernel=COLUMN_KERNEL, default=False,
               about="TEAL, per-layer x/h split by TEAL's block-wise greedy output-error search"),
    MethodSpec("wina_greedy", WinaGreedyConfig, _greedy("wina"), (0.3, 0.5, 0.7), kernel=COLUMN_KERNEL, default=False,
               about="WINA, per-layer x/h split by TEAL's block-wise greedy output-error search"),
    MethodSpec("larosa_folded", LarosaFoldedConfig, on_inputs(calibrate_larosa_folded), (0.3, 0.5, 0.7),
               kernel=FOLDED_KERNEL, default=False,
               about="LaRoSA, one global rotation folded into the weights (no extra reads)"),
    MethodSpec("larosa_folded_wina", LarosaFoldedConfig,
               on_inputs(lambda model, xs, density: calibrate_larosa_folded(model, xs, density, wina=True)),
               (0.3, 0.5, 0.7), kernel=FOLDED_KERNEL, default=False,
               about="larosa_folded with WINA's column-norm criterion"),
    MethodSpec("larosa_folded_greedy", LarosaFoldedConfig, _larosa_folded_greedy, (0.3, 0.5, 0.7),
               kernel=FOLDED_KERNEL, default=False, about="larosa_folded with TEAL's greedy per-layer x/h split"),
    MethodSpec("larosa_topk", LarosaTopkConfig, on_inputs(calibrate_larosa_topk), (0.25, 0.375, 0.5),
               kernel="none: top-k selection (the C++ input-sparse kernel takes thresholds)", default=False,
               about="LaRoSA's own selection: per-layer rotation (counted), top-k per token on |xQ| and |h| (exact "
                     "densities)"),
    MethodSpec("lowbit_rank", LowbitRankConfig, on_inputs(calibrate_lowbit_rank), (0.22, 0.32, 0.41, 0.5),
               kernel=LOWBIT_KERNEL, default=False,
               about="neurons ranked by |act(g~) u~| from a 4-bit copy of gate/up (copy counted)"),
    MethodSpec("rsparse", RSparseConfig, on_inputs(calibrate_rsparse), (0.3, 0.4, 0.5, 0.6),
               kernel="column-gathered GEMVs of the kept x and h (down_gather) + the rank-r remainders", default=False,
               about="R-Sparse: top-|x| channels exact + rank-r SVD remainder, per-layer rank/split search (factors "
                     "counted); param = read budget"),
    MethodSpec("scap", ScapConfig, on_inputs(calibrate_scap), (0.3, 0.4, 0.5, 0.6),
               kernel="column-gathered GEMVs of the kept mode-centred x and h (down_gather)", default=False,
               about="SCAP: input pruning after mode-centering, calibrated x/h split; param = read budget"),
    MethodSpec("griffin", GriffinConfig, lambda model, calib, density: calibrate_griffin(model, [], density),
               (0.4, 0.5, 0.6, 0.7),
               kernel=ROW_KERNEL + " of the prompt's set", default=False, needs_prompt=True,
               about="GRIFFIN: one neuron set per sequence from the prompt (needs --protocol prompt:P)"),
    MethodSpec("griffin_lowbit", GriffinRefineConfig, _griffin_refine(0.9), (0.41,),
               kernel=LOWBIT_KERNEL + " (candidates only)", default=False, needs_prompt=True,
               about="GRIFFIN top 90% as candidates, 4-bit copy ranks inside per token (threshold from the prompt; "
                     "copy rows counted; needs --protocol prompt:P)"),
    MethodSpec("griffin_centroid", GriffinRefineConfig, _griffin_refine(None, centroids_k=16, refine=False),
               (0.5, 0.7), kernel=ROW_KERNEL + " of the picked centroid", default=False, needs_prompt=True,
               about="the prompt picks one of 16 per-layer centroids (GRIFFIN score coverage), fixed for the "
                     "continuation; needs --protocol prompt:P"),
    MethodSpec("cluster_lowbit", ClusterLowbitConfig, _cluster_lowbit, (0.3, 0.4, 0.45),
               kernel=LOWBIT_KERNEL + " (the routed centroid's candidates)", default=False,
               about="routed centroid (80% of neurons) as candidates, 4-bit copy ranks inside (router + copy rows "
                     "counted)"),
    MethodSpec("topk", TopKConfig, calibrate_topk, (0.1, 0.3, 0.5), kernel="[gate; up] GEMV, top-k, kept rows of "
               "W_down", about="per-token top-k of |h| (gate and up read in full)", default=False),
    MethodSpec("gathered", GatheredConfig, lambda model, calib, density: random_sets(model, check_density(density),
                                                                                   calib.seed),
               (0.3, 0.5), kernel="gathered rows of a fixed set (one call per layer)", default=False,
               about="a fixed random neuron set per layer: a speed probe of the gathered kernel (quality "
                     "meaningless)"),
    MethodSpec("cluster_oracle", ClusterConfig, _cluster(False), (0.5,), realizable=False,
               kernel="none: the true-mask pick needs the dense outputs",
               about="paper thresholds + true-mask centroid (needs --centroids)", needs="centroids"),
    MethodSpec("cluster_predicted", ClusterConfig, _cluster(True), (0.5,),
               kernel="none: centroid codebooks have no batch-1 kernel",
               about="paper thresholds + predicted centroid (needs --predictor)", needs="predictor"),
    MethodSpec("neuron_predictor", NeuronPredictorConfig, on_inputs(calibrate_neuron_predictor), (0.25, 0.45, 0.65),
               kernel=ROW_KERNEL + " after the predictor's GEMVs", about="low-rank predicted top-k neurons "
               "(predictor counted)"),
]

# intermediate-neuron codebooks (awq.methods.cluster_neuron); param = nominal read fraction; *_oracle: the
# centroid covering the most |h| of the true token.  name -> (variant, about, in the default list)
CLUSTER_NEURON: dict[str, tuple[dict, str, bool]] = {
    "cluster_neuron_oracle": (dict(routed=False), "per-layer K=64 |h|-coverage centroids, oracle pick", False),
    "cluster_neuron": (dict(), "per-layer K=64 centroids, linear router pick (router counted)", False),
    "cluster_pooled_oracle": (dict(routed=False, pooled=True),
                              "one pooled codebook of 64 x layers centroids (equal memory), oracle pick", False),
    "cluster_binary_oracle": (dict(routed=False, weighting="binary"),
                              "centroids fitted on binary active sets (AWC-like), oracle pick", False),
    "cluster_union2": (dict(top_m=2), "union of the top-2 routed centroids", False),
    "cluster_union4": (dict(top_m=4), "union of the top-4 routed centroids", False),
    "cluster_hot": (dict(hot_q=0.5), "hot set (active on > 50% of tokens) + routed centroid", False),
    "cluster_thresh_oracle": (dict(routed=False, within="gate"), "oracle centroid, then |act(g)| threshold in it",
                              False),
    "cluster_thresh": (dict(within="gate"), "routed centroid (gate rows), then |act(g)| threshold in it", True),
    "cluster_hthresh_oracle": (dict(routed=False, within="h"), "oracle centroid, then |h| threshold in it", False),
    "cluster_hthresh": (dict(within="h"), "routed centroid (gate+up rows), then |h| threshold in it", False),
    "cluster_ideal_oracle": (dict(routed=False, k=1, within="ideal"),
                             "bound of any neuron mask: per-token |h| threshold, all three projections masked", True),
}
for _k in (128, 256):  # K sweep: the same variants with K centroids per layer
    for _base in ("cluster_thresh", "cluster_thresh_oracle", "cluster_neuron", "cluster_neuron_oracle"):
        _kw, _about, _ = CLUSTER_NEURON[_base]
        CLUSTER_NEURON[f"{_base}_k{_k}"] = ({**_kw, "k": _k}, _about.replace("K=64 ", "") + f", K={_k}", False)
for _name, (_kw, _about, _default) in CLUSTER_NEURON.items():
    _routed = _kw.get("routed", True)
    _SPECS.append(MethodSpec(_name, ClusterNeuronConfig, _cluster_neuron(**_kw), (0.3, 0.5), realizable=_routed,
                             kernel=ROW_KERNEL + " of the routed centroid" if _routed else
                             "none: the oracle pick needs the dense h", about=_about, default=_default))

METHODS: dict[str, MethodSpec] = {s.name: s for s in _SPECS}


def get_method(name: str) -> MethodSpec:
    if name in METHODS:
        return METHODS[name]
    raise MethodError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")


def check_needs(spec: MethodSpec, files: dict[str, Optional[str]]) -> None:
    """Refuse (one line) a method whose needed file option is not given."""
    if spec.needs and not files.get(spec.needs):
        raise MethodError(f"{spec.name} needs {NEEDS[spec.needs]}")


def default_methods(files: dict[str, Optional[str]]) -> list[str]:
    """The frontier's default method list: every ``default`` method whose needed file option is given."""
    return [s.name for s in _SPECS if s.default and (s.needs is None or files.get(s.needs))]


def extra_read(cfg: Optional[MethodConfig], model: nn.Module) -> float:
    """Weight bytes a method reads besides the MLP's (predictor, rotation), as a fraction of the MLP's."""
    return 0.0 if cfg is None else float(cfg.extra_read(model))


def config_summary(cfg: Optional[MethodConfig]) -> dict:
    """What a point JSON records of a config (thresholds, not big tensors)."""
    return {} if cfg is None else cfg.summary()
