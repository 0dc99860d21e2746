"""Cluster predictor: choose each token's centroid from the MLP input, before the MLP runs (issue 6).

Per decoder layer a small network maps the MLP input ``x`` (the post-attention-norm hidden state,
recorded in a pattern store with ``--dump_inputs``) to one of the ``K`` centroids of each
projection.  The target is the oracle label of the paper: the nearest centroid of the token's true
mask ``A`` under the active-only distance (= largest overlap ``|A & C_k|``, ties to the lowest
index, :func:`awq.store.centroids.assign_active_only`).

Architecture (per layer), a low-rank head over the standardised input::

    z = act(W1 x + b1)                 W1: [R, H]   (R = r with a shared trunk, 3r with separate ones)
    logits_p = W2_p z[slice_p] + b2_p  W2_p: [K_p, r]

``trunk="separate"`` gives every projection its own ``x -> r -> K`` head (its own slice of
``W1``); ``trunk="shared"`` shares one ``x -> r`` trunk.  The input standardisation (mean/std of
the training rows) is folded into ``W1``/``b1`` when saving, so inference is two small GEMMs.
The cost per token and layer is ``R*H + r*sum(K_p)`` multiply-accumulates against ``3*H*I`` for
the MLP (:func:`predictor_cost`); ``--rank`` defaults to the largest rank within ``--budget``
(5%) of the MLP's MACs and parameters.

Files are safetensors: tensors ``layers.<l>.w1/b1`` and ``layers.<l>.<proj>.w2/b2/counts``
(``counts``: training label frequencies, which give the majority-class baseline) and the JSON
metadata under the key ``awq_predictor`` (model, hidden, num_layers, widths, K, rank, trunk,
activation, the centroid files and their sha256, the training store, the training config and
per-layer validation metrics).

This module holds the model (:class:`ClusterPredictor`, file format, cost, loading against a
model); training is :mod:`awq.predictor.train` (``TrainConfig``, ``train``) and evaluation
:mod:`awq.predictor.evaluate` (``evaluate``), both also reachable from here.  CLI::

    python -m awq.predictor train --masks TRAIN_STORE --centroids gate=F,up=F,down=F --output P.safetensors
    python -m awq.predictor evaluate --masks TEST_STORE --predictor P.safetensors [--output eval.json]

In :mod:`awq.entry`, ``--predictor FILE`` runs the codebooks in mode ``predicted`` with the label
functions of :func:`load_predictor`; ``--sparse_compute`` uses :func:`load_predicted_selector`.
"""
from __future__ import annotations

import json
import logging
import weakref
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from awq.load.arch import PROJS, decoder_layers
from awq.methods.active_sets import cluster_selector
from awq.methods.base import base_mlp
from awq.methods.codebook import check_centroid_proj, parse_centroid_spec
from awq.store.centroids import load_centroids
from awq.store.thresholds import file_sha256
from awq.util.io import atomic_save_safetensors, read_safetensors

log = logging.getLogger("awq.methods.label_predictor")

FORMAT = "awq-cluster-predictor"
FORMAT_VERSION = 1
TRUNKS = ("separate", "shared")
ACTS = ("none", "relu", "gelu")
LabelFn = Callable[[torch.Tensor, int], torch.Tensor]
ACT_FNS = {"none": lambda z: z, "relu": F.relu, "gelu": F.gelu}

# training and evaluation live in their own modules; their names stay importable from here
class PredictorError(ValueError):
    """A predictor file is missing, malformed, or does not fit the model / centroids / store."""


# --------------------------------------------------------------------------------------------
# cost model
# --------------------------------------------------------------------------------------------
def mlp_cost(hidden: int, intermediate: int) -> int:
    """MACs (= weights) of one SwiGLU MLP per token: gate and up ``H x I``, down ``I x H``."""
    return 3 * hidden * intermediate


def predictor_cost(hidden: int, intermediate: int, ks: dict[str, int], rank: int, trunk: str) -> dict:
    """MACs and parameters of one layer's predictor per token, absolute and as a fraction of the MLP's."""
    r_total = rank if trunk == "shared" else rank * len(ks)
    macs = r_total * hidden + rank * sum(ks.values())
    params = macs + r_total + sum(ks.values())
    mlp = mlp_cost(hidden, intermediate)
    return {"macs": macs, "params": params, "mlp_macs": mlp, "mlp_params": mlp,
            "flop_fraction": macs / mlp, "param_fraction": params / mlp}


def auto_rank(hidden: int, intermediate: int, ks: dict[str, int], trunk: str, budget: float) -> int:
    """Largest rank whose MAC and parameter fractions both stay within ``budget``."""
    per = predictor_cost(hidden, intermediate, ks, 1, trunk)
    fixed = sum(ks.values())  # output biases
    r = int((budget * per["mlp_params"] - fixed) // (per["params"] - fixed))
    while r > 0 and max(predictor_cost(hidden, intermediate, ks, r, trunk)[f] for f in
                        ("flop_fraction", "param_fraction")) > budget:
        r -= 1
    if r < 1:
        raise PredictorError(f"a predictor for K={ks} does not fit a budget of {budget:.1%} of the MLP even at rank 1")
    return min(r, hidden)


# --------------------------------------------------------------------------------------------
# the runtime predictor (file format)
# --------------------------------------------------------------------------------------------
class ClusterPredictor:
    """Per-layer low-rank cluster heads; ``labels(x, layer, proj)`` -> centroid ids."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.meta = meta
        try:
            self.hidden, self.num_layers = int(meta["hidden"]), int(meta["num_layers"])
            self.rank, self.trunk, self.act = int(meta["rank"]), str(meta["trunk"]), str(meta["act"])
            self.ks = {p: int(k) for p, k in meta["k"].items()}
            self.widths = {p: int(w) for p, w in meta["widths"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise PredictorError(f"predictor metadata is incomplete: {type(e).__name__} {e}") from None
        if self.trunk not in TRUNKS or self.act not in ACTS or not self.ks or any(p not in PROJS for p in self.ks):
            raise PredictorError(f"predictor metadata has bad trunk/act/projections: {self.trunk}, {self.act}, "
                                 f"{sorted(self.ks)}")
        self.projs = [p for p in PROJS if p in self.ks]
        r_total = self.rank if self.trunk == "shared" else self.rank * len(self.projs)
        self.slices = {p: slice(0, self.rank) if self.trunk == "shared" else slice(i * self.rank, (i + 1) * self.rank)
                       for i, p in enumerate(self.projs)}
        want = {}
        for l in range(self.num_layers):
            want[f"layers.{l}.w1"] = (r_total, self.hidden)
            want[f"layers.{l}.b1"] = (r_total,)
            for p in self.projs:
                want[f"layers.{l}.{p}.w2"] = (self.ks[p], self.rank)
                want[f"layers.{l}.{p}.b2"] = (self.ks[p],)
                want[f"layers.{l}.{p}.counts"] = (self.ks[p],)
        for name, shape in want.items():
            if name not in tensors:
                raise PredictorError(f"predictor file lacks tensor '{name}'")
            if tuple(tensors[name].shape) != shape:
                raise PredictorError(f"predictor tensor '{name}' has shape {tuple(tensors[name].shape)}, "
                                     f"metadata implies {shape}")
        extra = sorted(set(tensors) - set(want))
        if extra:
            raise PredictorError(f"predictor file holds unexpected tensors, e.g. '{extra[0]}'")
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise PredictorError(f"predictor tensor '{name}' holds non-finite values (NaN/inf): a damaged or "
                                     "diverged predictor")
        self.tensors = {n: t.contiguous() for n, t in tensors.items()}
        self._cache: Optional[tuple] = None

    # -- io -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "ClusterPredictor":
        path = Path(path)
        md, tensors = read_safetensors(path, FORMAT, "cluster predictor", PredictorError)
        try:
            meta = json.loads(md.get("awq_predictor", ""))
        except json.JSONDecodeError as e:
            raise PredictorError(f"{path}: predictor metadata is not valid JSON: {e}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise PredictorError(f"{path}: unsupported predictor format_version {meta.get('format_version')!r}")
        return cls(tensors, meta)

    def save(self, path: str | Path) -> None:
        save_tensors(path, {n: t.cpu() for n, t in self.tensors.items()}, self.meta)

    def to(self, device) -> "ClusterPredictor":
        self.tensors = {n: t.to(device) for n, t in self.tensors.items()}
        self._cache = None
        return self

    # -- inference ----------------------------------------------------------------------------
    def trunk_out(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """``act(W1 x + b1)`` for ``x [..., H]`` -> ``[n, R]`` (fp32); reused across projections of one call."""
        c = self._cache
        if c is not None and c[0] == layer and c[1]() is x and c[2] == x._version:
            return c[3]
        w1, b1 = self.tensors[f"layers.{layer}.w1"], self.tensors[f"layers.{layer}.b1"]
        z = ACT_FNS[self.act](torch.addmm(b1, x.reshape(-1, x.shape[-1]).to(w1.device, w1.dtype), w1.T))
        self._cache = (layer, weakref.ref(x), x._version, z)
        return z

    def logits(self, x: torch.Tensor, layer: int, proj: str) -> torch.Tensor:
        if x.shape[-1] != self.hidden:
            raise PredictorError(f"predictor expects inputs of width {self.hidden}, got {x.shape[-1]}")
        if not 0 <= layer < self.num_layers:
            raise PredictorError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        z = self.trunk_out(x, layer)[:, self.slices[proj]]
        return torch.addmm(self.tensors[f"layers.{layer}.{proj}.b2"], z, self.tensors[f"layers.{layer}.{proj}.w2"].T)

    @torch.no_grad()
    def labels(self, x: torch.Tensor, layer: int, proj: str) -> torch.Tensor:
        return torch.argmax(self.logits(x, layer, proj), dim=1).reshape(x.shape[:-1]).to(x.device)

    def label_fn(self, proj: str) -> LabelFn:
        if proj not in self.ks:
            raise PredictorError(f"predictor has no head for {proj} (it has {self.projs})")
        return lambda x, layer_idx: self.labels(x, layer_idx, proj)

    def majority(self, layer: int, proj: str, k: int = 1) -> torch.Tensor:
        """The ``k`` most frequent training labels (ties -> lowest index)."""
        return most_frequent(self.tensors[f"layers.{layer}.{proj}.counts"], k)

    def cost(self) -> dict:
        return predictor_cost(self.hidden, int(self.meta["intermediate"]), self.ks, self.rank, self.trunk)


def most_frequent(counts: torch.Tensor, k: int) -> torch.Tensor:
    return torch.argsort(-counts.cpu().double(), stable=True)[:k]


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a predictor file atomically (:func:`awq.util.io.atomic_save_safetensors`)."""
    atomic_save_safetensors(tensors, path,
                            metadata={"format": FORMAT, "awq_predictor": json.dumps(meta, default=str)}, what="predictor")


# --------------------------------------------------------------------------------------------
# model-side loading (used by awq.entry --predictor)
# --------------------------------------------------------------------------------------------
def check_centroids(pred: ClusterPredictor, spec: str) -> dict:
    """Check the centroid sets named by ``spec`` are the ones the predictor was trained with."""

    out = {}
    for proj, path in parse_centroid_spec(spec).items():
        if proj not in pred.ks:
            raise PredictorError(f"--centroids names {proj} but the predictor has no head for it (has {pred.projs})")
        if not Path(path).is_file():
            raise PredictorError(f"{proj} centroid file {path} (named by the predictor or --centroids) not found: "
                                 "pass --centroids with the files the predictor was trained with")
        c, cmeta = load_centroids(path, pred.widths[proj])
        check_centroid_proj(path, cmeta, proj)
        if c.shape[0] != pred.ks[proj]:
            raise PredictorError(f"predictor {proj} head has K={pred.ks[proj]} but centroid file {path} has "
                                 f"K={c.shape[0]}")
        sha, want = file_sha256(path), pred.meta["centroids"][proj]["sha256"]
        if sha != want:
            raise PredictorError(f"centroid file {path} (sha256 {sha[:12]}) is not the {proj} set the predictor "
                                 f"was trained with (sha256 {want[:12]}, {pred.meta['centroids'][proj]['path']})")
        out[proj] = {"path": str(path), "sha256": sha, "k": int(c.shape[0])}
    return out


def load_predictor(path: str | Path, model: nn.Module, centroids: Optional[str] = None
                   ) -> tuple[dict[str, LabelFn], dict]:
    """-> (``{proj: fn(x, layer_idx) -> labels}``, info for the results JSON).

    Raises :class:`PredictorError` when the file does not fit the model (hidden size, layer count,
    projection widths) or when a centroid set -- ``centroids`` (a ``--centroids`` spec) or, without
    it, the training files the predictor names -- differs from the training one (K, sha256, or a
    file whose metadata names another projection).  ``info["centroids_spec"]`` names the training
    centroid files (a default for ``--centroids``).
    """
    pred = ClusterPredictor.load(path)
    layers = decoder_layers(model)
    mlp = base_mlp(layers[0].mlp)
    hidden = mlp.gate_proj.in_features
    name = pred.meta.get("model")
    if pred.hidden != hidden:
        raise PredictorError(f"predictor {path} is for hidden size {pred.hidden} (model {name}) but the model has "
                             f"hidden size {hidden}")
    if pred.num_layers != len(layers):
        raise PredictorError(f"predictor {path} has {pred.num_layers} layers (model {name}) but the model has "
                             f"{len(layers)} decoder layers")
    for p in pred.projs:
        w = getattr(mlp, p).out_features
        if pred.widths[p] != w:
            raise PredictorError(f"predictor {path} {p} width {pred.widths[p]} != model's {w}")
    spec = ",".join(f"{p.split('_')[0]}={pred.meta['centroids'][p]['path']}" for p in pred.projs)
    checked = check_centroids(pred, centroids or spec)  # the training sets too: never silently other centroids
    device = next(model.parameters()).device
    pred.to(device)
    info = {"path": str(path), "sha256": file_sha256(path), "model": name, "rank": pred.rank, "trunk": pred.trunk,
            "act": pred.act, "k": pred.ks, "cost": pred.cost(), "centroids": pred.meta["centroids"],
            "centroids_spec": spec, "centroids_checked": checked, "train": pred.meta.get("train")}
    log.info("predictor %s: rank %d (%s trunk), K=%s, %.2f%% of the MLP's MACs", path, pred.rank, pred.trunk,
             pred.ks, 100 * info["cost"]["flop_fraction"])
    return {p: pred.label_fn(p) for p in pred.projs}, info


def load_predicted_selector(path: str | Path, model: nn.Module, centroids: Optional[str] = None) -> tuple[Any, dict]:
    """The active-set selector of gathered sparse compute (:class:`awq.methods.gathered.GatheredConfig`).

    Per layer and token, the predictor's label of each projection named by ``centroids`` (a
    ``--centroids`` spec, checked against the training sets; default: the training sets) picks a
    centroid: gate/up centroids give the active neurons, a down centroid the output mask (see
    :func:`awq.methods.active_sets.cluster_selector`).  -> ``(selector, info)``: :func:`load_predictor`'s
    info plus ``projs``, the projections the selector masks (their outputs are masked
    unthresholded, as in the codebooks' ``predicted`` mode).
    """
    fns, info = load_predictor(path, model, centroids=centroids)
    files = parse_centroid_spec(centroids or info["centroids_spec"])
    mlp = base_mlp(decoder_layers(model)[0].mlp)
    device = next(model.parameters()).device
    tables = {p: load_centroids(f, getattr(mlp, p).out_features)[0].to(device=device, dtype=torch.bool)
              for p, f in files.items()}
    projs = [p for p in PROJS if p in tables]
    return cluster_selector({p: fns[p] for p in projs}, tables), info | {"projs": projs}
