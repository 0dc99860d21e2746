"""Cluster-neuron predictor files: a ``cluster_<variant>`` codebook + router, saved for ``awq.entry --predictor``.

A routed variant of :mod:`awq.methods.cluster_neuron` (default ``cluster_thresh``: per layer, a linear
router picks one of ``K`` neuron centroids from the MLP input, the gate rows of that centroid are
read and the neurons with ``|silu(g)| >= t_l`` keep their up and down rows) is fitted on train-part
windows exactly as the frontier does (:data:`awq.methods.registry.METHODS`, same calibration recipe and seed,
so the file reproduces the frontier point) and written as safetensors through :mod:`awq.util.io`:

* tensors ``layers.<l>.centroids`` (``[K, F]`` bool), ``layers.<l>.hot`` (``[F]`` bool),
  ``layers.<l>.router_w`` (``[K, H]``), ``layers.<l>.router_b`` (``[K]``), ``thresholds``
  (``[layers]`` float64, absent for ``within="none"``);
* metadata ``format = "awq-cluster-neuron"`` and ``awq_cluster_neuron`` (JSON: model, hidden,
  intermediate, num_layers, variant, nominal read fraction, K, top_m, within, calibration settings).

The paper's cluster predictor files (``format = "awq-cluster-predictor"``, :mod:`awq.methods.label_predictor`) are
told apart by that metadata (:func:`is_cluster_neuron_file`). CLI::

    python -m awq.cluster_predictor --output P.safetensors [--model_path M] [--variant cluster_thresh]
        [--read 0.5] [--calib_nsamples 2] [--calib_tokens 4096] [--seed 0]
    python -m awq.entry --predictor P.safetensors [--sparse_compute]
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from awq.load.arch import decoder_layers
from awq.load.data import load_corpus, tokenize_windows
from awq.load.models import check_model_path, load_model, model_slug
from awq.methods.base import sparsify_, swapped_mlps, unsparsify_
from awq.methods.cluster_neuron import ClusterNeuronConfig
from awq.methods.common import CalibData, mlp_dims
from awq.methods.dynamic_sparse import prepare_decode_
from awq.methods.registry import CLUSTER_NEURON, METHODS
from awq.util.cache import cache_dir
from awq.util.cli import opt, run_cli
from awq.util.fingerprint import weights_fingerprint
from awq.util.io import atomic_save_safetensors, check_output_path, file_sha256, read_safetensors

log = logging.getLogger("awq.predictor.cluster_files")

FORMAT = "awq-cluster-neuron"
FORMAT_VERSION = 1
DEFAULT_VARIANT = "cluster_thresh"  # the best realizable cluster variant on the frontier (issue 10)
DEFAULT_READ = 0.5


class ClusterPredictorError(ValueError):
    """A cluster-neuron predictor file is missing, malformed, or does not fit the model (one line)."""


def file_format(path: str | Path) -> Optional[str]:
    """The ``format`` metadata of a safetensors file (None if unreadable or absent)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError):
        return None


def is_cluster_neuron_file(path: str | Path) -> bool:
    return Path(path).is_file() and file_format(path) == FORMAT


def routed_variants() -> list[str]:
    """The realizable (routed) ``cluster_<variant>`` names of the frontier."""

    return [n for n in CLUSTER_NEURON if METHODS[n].realizable]


def names_cluster_predictor(spec: Optional[str]) -> bool:
    """Whether ``--predictor spec`` means a cluster-neuron predictor: such a file, or a routed variant name
    (fitted once and cached; a bare ``--predictor`` is :data:`DEFAULT_VARIANT`)."""
    if not spec:
        return False
    if Path(spec).is_file():
        return file_format(spec) == FORMAT
    names = routed_variants()
    if spec.startswith("cluster_") and spec not in names:
        raise ClusterPredictorError(f"--predictor {spec}: no such file, and not a routed cluster variant (choose from "
                                    f"{', '.join(names)})")
    return spec in names


def check_entry_options(cfg) -> None:
    """Options of ``awq.entry`` that do not apply to a cluster-neuron predictor -> one-line error."""
    for flag, val in (("--thresholds", cfg.thresholds), ("--dense", cfg.dense), ("--centroids", cfg.centroids),
                      ("--dump_masks", cfg.dump_masks)):
        if val:
            raise ClusterPredictorError(f"{flag} does not apply to a cluster-neuron predictor ({cfg.predictor}): "
                                        "its codebook, router and thresholds come from the file")


def save_cluster_predictor(cfg, path: str | Path, meta: dict) -> Path:
    """Write a routed :class:`~awq.methods.cluster_neuron.ClusterNeuronConfig` atomically."""

    if not cfg.routed:
        raise ClusterPredictorError("an oracle cluster config (no router) cannot be saved as a predictor")
    t: dict[str, torch.Tensor] = {}
    for i, (c, h, w, b) in enumerate(zip(cfg.centroids, cfg.hot, cfg.router_w, cfg.router_b)):
        t[f"layers.{i}.centroids"] = c.to(torch.bool).cpu().clone()  # no shared storage (safetensors)
        t[f"layers.{i}.hot"] = h.to(torch.bool).cpu().clone()
        t[f"layers.{i}.router_w"] = w.float().cpu().clone()
        t[f"layers.{i}.router_b"] = b.float().cpu().clone()
    if cfg.within != "none":
        t["thresholds"] = torch.tensor(cfg.thresholds, dtype=torch.float64)
    meta = {**meta, "format_version": FORMAT_VERSION, "num_layers": len(cfg.centroids),
            "k": int(cfg.centroids[0].shape[0]), "top_m": cfg.top_m, "within": cfg.within,
            "info": cfg.info}
    return atomic_save_safetensors(t, path, metadata={"format": FORMAT, "awq_cluster_neuron":
                                                      json.dumps(meta, default=str)}, what="cluster predictor")


def load_cluster_predictor(path: str | Path, model: nn.Module):
    """-> ``(ClusterNeuronConfig, meta)``; one-line :class:`ClusterPredictorError` when it does not fit ``model``."""
    path = Path(path)
    md, tensors = read_safetensors(path, FORMAT, "cluster-neuron predictor", ClusterPredictorError)
    try:
        meta = json.loads(md.get("awq_cluster_neuron", ""))
        n, within, top_m = int(meta["num_layers"]), str(meta["within"]), int(meta["top_m"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ClusterPredictorError(f"{path}: bad cluster predictor metadata ({type(e).__name__}: {e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ClusterPredictorError(f"{path}: unsupported format_version {meta.get('format_version')!r}")
    layers = len(decoder_layers(model))
    hidden, inter = mlp_dims(model)
    name = meta.get("model")
    if n != layers:
        raise ClusterPredictorError(f"{path} has {n} layers (model {name}) but the model has {layers} decoder layers")
    if (meta.get("hidden"), meta.get("intermediate")) != (hidden, inter):
        raise ClusterPredictorError(f"{path} is for hidden/intermediate size {meta.get('hidden')}/"
                                    f"{meta.get('intermediate')} (model {name}) but the model has {hidden}/{inter}")
    try:
        get = [[tensors[f"layers.{i}.{k}"] for i in range(n)] for k in ("centroids", "hot", "router_w", "router_b")]
    except KeyError as e:
        raise ClusterPredictorError(f"{path}: missing tensor {e.args[0]}") from None
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ClusterPredictorError(f"{path}: tensor {k} has non-finite values")
    thr = [float(v) for v in tensors["thresholds"].tolist()] if "thresholds" in tensors else []
    cfg = ClusterNeuronConfig(centroids=[c.to(torch.bool) for c in get[0]], hot=[h.to(torch.bool) for h in get[1]],
                              router_w=get[2], router_b=get[3], top_m=top_m, within=within, thresholds=thr,
                              info=dict(meta.get("info") or {}))
    try:
        cfg.validate(model)
    except ValueError as e:
        raise ClusterPredictorError(f"{path}: {e}") from None
    return cfg, meta


@torch.no_grad()
def fit_cluster_predictor(model: nn.Module, tokenizer, model_name: str, variant: str = DEFAULT_VARIANT,
                          read: float = DEFAULT_READ, calib_nsamples: int = 2, calib_tokens: int = 4096,
                          seqlen: int = 2048, seed: int = 0, data_path: Optional[str] = None,
                          use_hub: bool = True):
    """Calibrate ``variant`` at nominal read ``read`` as ``awq.experiments.frontier`` does -> ``(config, meta)``."""
    names = routed_variants()
    if variant not in names:
        raise ClusterPredictorError(f"--variant {variant!r} is not a routed cluster variant (choose from "
                                    f"{', '.join(names)})")
    train = load_corpus("train", data_path, use_hub=use_hub)
    windows = tokenize_windows(tokenizer, train.text, seqlen)[:calib_nsamples]
    if windows.size(0) < 1:
        raise ClusterPredictorError(f"the train part has no full {seqlen}-token window: lower --seqlen")
    calib = CalibData(windows, model_name=model_name, max_tokens=calib_tokens, seed=seed)
    cfg = METHODS[variant].calibrate(model, calib, read)
    unsparsify_(model)
    hidden, inter = mlp_dims(model)
    meta = {"model": model_name, "hidden": hidden, "intermediate": inter, "variant": variant, "read": read,
            "router_read": cfg.extra_read(model),
            "calibration": {"corpus": train.name, "corpus_sha256": train.sha256, "windows": int(windows.size(0)),
                            "seqlen": seqlen, "tokens": calib_tokens, "seed": seed}}
    return cfg, meta


def _weights_key(model: nn.Module) -> str:
    return weights_fingerprint(model)[:12]


def default_predictor(spec: str, model: nn.Module, tokenizer, info, seqlen: int, data_path: Optional[str],
                      use_hub: bool) -> Path:
    """The cached predictor for variant ``spec`` at :data:`DEFAULT_READ` (fitted and written on first use)."""
    key = f"{model_slug(info)}-{_weights_key(model)}-{spec}-r{DEFAULT_READ:g}-s{seqlen}-seed0"
    if data_path:
        import hashlib

        key += "-" + hashlib.sha256(str(Path(data_path).resolve()).encode()).hexdigest()[:8]
    path = cache_dir("cluster_predictors") / f"{key}.safetensors"
    if path.is_file() and file_format(path) == FORMAT:
        log.info("cluster predictor %s: cached %s", spec, path)
        return path
    log.info("cluster predictor %s: fitting it once on the train part (cached as %s)", spec, path)
    cfg, meta = fit_cluster_predictor(model, tokenizer, info.name, spec, DEFAULT_READ, seqlen=seqlen,
                                      data_path=data_path, use_hub=use_hub)
    return save_cluster_predictor(cfg, path, meta)


def install_cluster_predictor(cfg, model: nn.Module, tokenizer, info) -> dict:
    """``awq.entry --predictor`` with a cluster-neuron predictor: swap every MLP, and with
    ``--sparse_compute`` prepare the batch-1 kernels -> the results JSON's ``predictor`` entry."""
    path = Path(cfg.predictor)
    if not path.is_file():
        path = default_predictor(cfg.predictor, model, tokenizer, info, cfg.seqlen, cfg.data_path, not cfg.no_hub)
    ccfg, meta = load_cluster_predictor(path, model)
    if meta.get("model") and meta["model"] != info.name:
        log.warning("cluster predictor was fitted on %s, running %s", meta["model"], info.name)
    sparsify_(model, ccfg)
    ready = prepare_decode_(model) if cfg.sparse_compute else 0
    mods = swapped_mlps(model)
    if cfg.sparse_compute:
        why = mods[0].decode_unsupported() if ready == 0 else None
        log.info("sparse compute: %d of %d MLPs use the batch-1 cluster kernel for single-token steps%s", ready,
                 len(mods), f" ({why})" if why else "")
    log.info("cluster predictor %s: %s", path, mods[0].extra_repr())
    return {"kind": "cluster_neuron", "path": str(path), "sha256": file_sha256(path), "model": meta.get("model"),
            "variant": meta.get("variant"), "read": meta.get("read"), "k": meta.get("k"), "within": meta.get("within"),
            "top_m": meta.get("top_m"), "router_read": ccfg.extra_read(model), "decode_kernels": ready,
            "calibration": meta.get("calibration")}


@dataclass
class FitConfig:
    """Options of ``python -m awq.cluster_predictor``."""

    output: str = opt(help="write the predictor here (safetensors)", kind="out_file")
    model_path: Optional[str] = opt(None, help="model as for awq.entry (default: SmolLM2-135M-Instruct)",
                                    kind="model", check=check_model_path)
    variant: str = opt(DEFAULT_VARIANT, help=f"routed cluster_<variant> of awq.experiments.frontier (default {DEFAULT_VARIANT}: "
                       "routed centroid, then |silu(g)| threshold in it; also cluster_neuron, cluster_union2, "
                       "cluster_hot, cluster_hthresh, cluster_thresh_k128, ...)", choices=tuple(routed_variants()))
    read: float = opt(DEFAULT_READ, help="nominal MLP weight-read fraction in (0, 1] (default 0.5)", gt=0, max=1,
                      kind="fraction")
    calib_nsamples: int = opt(2, help="train windows for calibration (default 2, as the frontier)", min=1)
    calib_tokens: int = opt(4096, help="MLP inputs per layer kept for calibration (default 4096)", min=1)
    seqlen: int = opt(2048, help="window length in tokens (default 2048)", min=2)
    seed: int = opt(0, help="calibration subsample / router training seed (default 0)", kind="seed")
    data_path: Optional[str] = opt(None, help="local WikiText-2 data as for awq.entry (default: hub or the offline "
                                   "substitute)", kind="in_path")
    dtype: Optional[str] = opt(None, help="model dtype (default float32 on CPU)",
                               choices=["float32", "float16", "bfloat16"])
    no_hub: bool = opt(False, help="never try the Hugging Face hub for data")


def main(c: FitConfig) -> dict:
    check_output_path(c.output, "cluster predictor")
    if c.variant not in routed_variants():  # before the model loads
        raise ClusterPredictorError(f"--variant {c.variant!r} is not a routed cluster variant (choose from "
                                    f"{', '.join(routed_variants())})")
    model, tok, info = load_model(c.model_path, c.dtype, None)
    cfg, meta = fit_cluster_predictor(model, tok, info.name, c.variant, c.read, c.calib_nsamples, c.calib_tokens,
                                      c.seqlen, c.seed, c.data_path, use_hub=not c.no_hub)
    save_cluster_predictor(cfg, c.output, meta)
    log.info("cluster predictor %s (%s, read %.2f, K=%d, router %.2f%% of the MLP) written to %s", c.variant,
             info.name, c.read, cfg.centroids[0].shape[0], 100 * meta["router_read"], c.output)
    return meta


def cli(argv: Optional[list[str]] = None) -> int:
    return run_cli(FitConfig, main, argv, prog="python -m awq.cluster_predictor", errors=(ValueError, OSError),
                   description="Fit a cluster-neuron predictor (per-layer neuron codebook + linear router, issue 10) "
                               "for `python -m awq.entry --predictor FILE [--sparse_compute]`.")


if __name__ == "__main__":
    sys.exit(cli())
