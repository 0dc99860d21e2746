"""The options of ``python -m awq.frontier`` (:class:`FrontierConfig`, read by :mod:`awq.experiments.frontier`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from awq.load.models import check_model_path
from awq.load.quant_formats import WEIGHT_FORMATS
from awq.methods.codebook import parse_centroid_spec
from awq.methods.protocol import check_protocol
from awq.methods.registry import METHODS, default_methods
from awq.util.cli import opt


@dataclass
class FrontierConfig:
    model_path: Optional[str] = opt(None, help="model: HF directory, .gguf or hub id (default: the embedded "
                                    "SmolLM2-135M-Instruct)", kind="model", check=check_model_path)
    data_path: Optional[str] = opt(None, help="local corpus (see awq.entry --help); default: hub or offline substitute",
                                   kind="in_path")
    out: Optional[Path] = opt(None, help="results directory (default results/frontier/<model>); one run at a time "
                              "(a second run on the same folder is refused)", kind="out_dir")
    plots_dir: Path = opt(Path("plots"), help="where frontier_<model>.png goes (default plots)", kind="out_dir")
    methods: Optional[list[str]] = opt(None, help="comma-separated methods of awq.methods.registry (default: "
                                       + ", ".join(default_methods({"centroids": "-", "predictor": "-"}))
                                       + "; cluster_oracle with --centroids, cluster_predicted with --predictor)",
                                       choices=tuple(METHODS))
    densities: Optional[list[float]] = opt(None, help="comma-separated densities in (0, 1] for every method "
                                           "(default: each method's own sweep, read fractions ~0.3-0.8)",
                                           gt=0.0, max=1.0, kind="fraction")
    centroids: Optional[str] = opt(None, help="centroid sets for cluster_oracle / cluster_predicted: "
                                   "gate=FILE,up=FILE,down=FILE (any subset) or a folder (see awq.entry --centroids)",
                                   kind="centroids", check=parse_centroid_spec)
    predictor: Optional[str] = opt(None, help="a trained cluster predictor file (python -m awq.predictor train) for "
                                   "cluster_predicted", kind="in_file")
    nsamples: int = opt(4, help="test windows scored per point (default 4)", min=1)
    calib_nsamples: int = opt(2, help="train windows for calibration (default 2)", min=1)
    calib_tokens: int = opt(4096, help="MLP inputs per layer kept for calibration (default 4096)", min=1)
    seqlen: int = opt(2048, help="window length in tokens (default 2048)", min=2)
    seed: int = opt(0, help="calibration subsample / predictor training seed (default 0)", kind="seed")
    dtype: Optional[str] = opt(None, help="model dtype (default float32 on CPU)",
                               choices=["float32", "float16", "bfloat16"])
    device: Optional[str] = opt(None, help="cpu / cuda (default auto)", kind="device", words=("auto",))
    speed: bool = opt(False, help="also measure batch-1 decode tok/s of every realizable point against the dense "
                      "MLPs on the same lean decoder (awq.decode.speed; added to points already done); a "
                      "method without a batch-1 kernel is not timed: decode_status 'no batch-1 kernel'")
    speed_prompt_tokens: int = opt(256, help="--speed: prompt tokens (default 256)", min=1)
    speed_new_tokens: int = opt(64, help="--speed: new tokens per timed run (default 64)", min=2)
    speed_repeats: int = opt(3, help="--speed: interleaved repeats, medians (default 3)", min=1)
    speed_again: bool = opt(False, help="--speed: time again the points already timed (after a decoder or kernel "
                            "change); perplexity and cost are kept")
    protocol: str = opt("standard", help="evaluation protocol: 'standard' (each window one forward with the method "
                        "active, every token scored) or 'prompt:P' (the first P tokens of each window run dense as a "
                        "prompt, PPL/KL/top-1 on the rest with the method active; methods that choose from the prompt "
                        "see it; default results folder <model>_prompt<P>); see awq.methods.protocol",
                        check=check_protocol)
    dense_ref: Optional[Path] = opt(None, help="folder of the cached dense log-probabilities for kl/top1 (default "
                                    "<out>/../dense_ref; keyed by weights and window tokens, shared safely)",
                                    kind="out_dir")
    quality_again: bool = opt(False, help="evaluate again every point already done (ppl, kl, top1 and the read "
                              "fraction; decode speed kept); points without kl/top1 are re-evaluated anyway")
    no_hub: bool = opt(False, help="never try the Hugging Face hub for the corpus")
    weights: list[str] = opt(default_factory=lambda: ["f32"], choices=WEIGHT_FORMATS,
                             help="weight formats, comma-separated (default f32): every point again on the model's "
                                  "linear layers block-quantised (q8_0, q4_0, q4_1) and dequantised, with its bytes "
                                  "per token (docs/frontier.md)")
