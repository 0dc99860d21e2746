"""Greedy generation with the lean decoder: ``python -m awq.generate --method M --density D --prompt "..."``.

Prints the continuation and the decode speed of the method beside the dense model's, both measured
in the same run on the same :class:`awq.decode.lean.LeanDecoder` (repeats interleaved, medians)::

    python -m awq.generate --prompt "The capital of France is" --max_new_tokens 64 --threads 2
    python -m awq.generate --method gathered --density 0.5 --threads 2
    python -m awq.generate --method teal --density 0.5           # any method of awq.methods.registry.METHODS

Methods: every method of :data:`awq.methods.registry.METHODS` (``dense``, ``gathered``: a fixed random neuron
set per layer, the speed probe of the gathered kernel; ``paper``, ``teal``, ``cats``, ...), calibrated at
``--density`` on ``--calib_nsamples`` train windows and installed with ``awq.methods.base.sparsify_``; the
decoder calls the method's own module, so the speed is what that module realises (its batch-1 kernel, see
the registry's ``kernel`` column).  The MLP weight-read fraction of the decode steps (metered from the masks
applied, predictor/rotation bytes added) is printed with its roofline.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from awq.decode.lean import LeanDecoder
from awq.decode.speed import decode_read_fraction, extra_bytes, read_bytes, roofline, timed_runs
from awq.load.arch import decoder_layers
from awq.load.data import load_corpus, tokenize_windows
from awq.load.models import check_model_path, load_model
from awq.methods.base import sparsify_
from awq.methods.common import CalibData
from awq.methods.registry import METHODS, get_method
from awq.util.cli import opt, run_cli

log = logging.getLogger("awq.decode.generate")

def install(model: nn.Module, name: str, density: float, cfg: "GenerateConfig", tok, info) -> Optional[list]:
    """Calibrate method ``name`` at ``density`` and install it; -> the per-layer MLP modules (None: dense)."""
    train = load_corpus("train", cfg.data_path)
    windows = tokenize_windows(tok, train.text, cfg.calib_seqlen)[: cfg.calib_nsamples]
    conf = get_method(name).calibrate(model, CalibData(windows, model_name=info.name, seed=cfg.seed), density)
    if conf is None:
        return None
    sparsify_(model, conf)
    return [layer.mlp for layer in decoder_layers(model)]


@dataclass
class GenerateConfig:
    prompt: str = opt("The capital of France is", help="prompt text (plain, no chat template)")
    method: str = opt("dense", help="a method of awq.methods.registry", choices=tuple(METHODS))
    density: float = opt(0.5, help="share of MLP neurons/entries kept by the method, a fraction in (0, 1] "
                         "(default 0.5)", gt=0, max=1, kind="fraction")
    max_new_tokens: int = opt(64, help="tokens to generate (default 64)", min=1)
    threads: Optional[int] = opt(None, help="torch threads (default: torch's choice)", min=1)
    repeats: int = opt(1, help="timed runs per mode, interleaved; medians printed (default 1)", min=1)
    model_path: Optional[str] = opt(None, help="HF dir, hub id or .gguf (default: embedded SmolLM2-135M-Instruct)",
                                    kind="model", check=check_model_path)
    dtype: Optional[str] = opt(None, help="model dtype (default float32 on CPU)",
                               choices=["float32", "bfloat16", "float16"])
    seed: int = opt(0, help="calibration seed (and the gathered method's random neuron sets)", kind="seed")
    calib_nsamples: int = opt(1, help="train windows for calibrating awq.methods.registry methods (default 1)", min=1)
    calib_seqlen: int = opt(512, help="length of those windows (default 512)", min=16)
    data_path: Optional[str] = opt(None, help="corpus for calibration (default: as awq.entry)", kind="in_path")
    no_dense: bool = opt(False, help="skip the dense baseline run")


def main(cfg: GenerateConfig) -> dict:
    get_method(cfg.method)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok, info = load_model(cfg.model_path, cfg.dtype, "cpu")
    ids = torch.tensor(tok(cfg.prompt).input_ids, dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("--prompt gives no tokens")
    dec = LeanDecoder(model, capacity=ids.numel() + cfg.max_new_tokens)
    modes: dict = {} if cfg.no_dense else {"dense": None}
    if cfg.method != "dense":
        modes[cfg.method] = install(model, cfg.method, cfg.density, cfg, tok, info)
    if not modes:
        raise ValueError("--no_dense with --method dense leaves nothing to run")
    res = timed_runs(dec, ids, cfg.max_new_tokens, modes, cfg.repeats, warmup=0 if cfg.repeats == 1 else 1)
    out = {"model": info.name, "threads": torch.get_num_threads(), "prompt_tokens": int(ids.numel()),
           "new_tokens": cfg.max_new_tokens, "modes": {}}
    for name, r in res.items():
        text = tok.decode(r["tokens"], skip_special_tokens=True)
        out["modes"][name] = {"tok_s": r["median"], "runs": r["tok_s"], "text": text}
        print(f"--- {name}{'' if name == 'dense' else f' (density {cfg.density:g})'}:\n{cfg.prompt}{text}")
    line = [f"{name} {r['median']:.2f} tok/s" for name, r in res.items()]
    if "dense" in res and len(res) > 1:
        line.append(f"speedup {res[cfg.method]['median'] / res['dense']['median']:.2f}x")
    frac = decode_read_fraction(dec, ids, cfg.max_new_tokens, modes.get(cfg.method))
    if frac is not None:
        frac += extra_bytes(modes.get(cfg.method)) / read_bytes(model)["mlp"]
        out["mlp_weight_read"], out["roofline"] = frac, roofline(model, frac)
        line.append(f"MLP weight read {frac:.3f} (roofline {out['roofline']:.2f}x)")
    print(f"{info.name} threads={out['threads']} prompt={out['prompt_tokens']} new={cfg.max_new_tokens}: "
          + " | ".join(line))
    return out


def cli(argv: Optional[list[str]] = None) -> int:
    return run_cli(GenerateConfig, main, argv, prog="python -m awq.generate",
                   description="Greedy generation with the lean batch-1 decoder; prints the text and decode "
                               "tok/s of a sparsity method beside the dense model's (same run).")


if __name__ == "__main__":
    sys.exit(cli())
