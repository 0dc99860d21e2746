"""``python -m awq.frontier``: perplexity against MLP weight bytes read per token, every method side by side.

For one model: every selected method (:data:`awq.methods.METHODS`) is calibrated on the train part at
each density of its sweep, then scored on the same test windows. The cost axis,
``weight_read_fraction``, is what a batch-1 decode step must read of the MLP's weight bytes per token,
measured from the masks actually applied on the test tokens (:mod:`awq.cost`), plus any predictor or
rotation the method reads besides (``extra``). Resumable: one JSON per point under
``<out>/points/``; points already done are skipped. The directory's ``fingerprint.json`` (weights
sha256, corpus sha256, seqlen, windows, calibration settings; the model's path and name are recorded
only) must match, else the run is refused.
Every point also carries ``kl`` and ``top1`` (:mod:`awq.quality`): the mean KL divergence from the dense
model's next-token distribution and the share of tokens whose top-1 token is dense's, on the tokens
perplexity scores; the dense log-probabilities are computed once per window and cached (``--dense_ref``,
default ``<out>/../dense_ref``). Points made before these columns existed get them on the next run
(re-evaluated: calibration is deterministic for the seed); ``--quality_again`` re-evaluates every point.
``--protocol prompt:P`` scores every method on the continuation of a dense P-token prompt
(:mod:`awq.protocol`); the protocol is part of the fingerprint.
Writes ``<out>/frontier.csv``, ``<out>/frontier.md`` and ``<plots_dir>/frontier_<model>.png`` (PPL in full and
zoomed to 3x dense, KL, top-1).
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from awq.cli import build_parser, check_config, opt, parse_config, setup_logging

log = logging.getLogger("awq.frontier")

ALL_METHODS = ["dense", "paper", "paper_gate", "paper_up", "paper_gate_up", "paper_down", "cats", "teal", "wina",
               "larosa", "cluster_oracle", "cluster_predicted", "neuron_predictor", "cluster_thresh",
               "cluster_ideal_oracle"]  # other cluster_* variants of awq/methods/cluster_neuron.py: --methods


INFO_ONLY = ("model", "model_name")  # recorded, not compared: weights_sha256 identifies the model
FINGERPRINT_DEFAULTS = {"protocol": "standard"}  # the value of a key an older fingerprint.json lacks


class FrontierError(ValueError):
    """Bad frontier input or a results directory made with another setup (one line)."""


@dataclass
class FrontierConfig:
    model_path: Optional[str] = opt(None, help="model: HF directory, .gguf or hub id (default: the embedded "
                                    "SmolLM2-135M-Instruct)")
    data_path: Optional[str] = opt(None, help="local corpus (see awq.entry --help); default: hub or offline substitute")
    out: Optional[Path] = opt(None, help="results directory (default results/frontier/<model>)")
    plots_dir: Path = opt(Path("plots"), help="where frontier_<model>.png goes (default plots)")
    methods: Optional[list[str]] = opt(None, help="comma-separated subset of: " + ", ".join(ALL_METHODS)
                                       + " (default: all; cluster_oracle with --centroids, cluster_predicted with "
                                       "--predictor)")
    densities: Optional[list[float]] = opt(None, help="comma-separated densities in (0, 1] for every method "
                                           "(default: each method's own sweep, read fractions ~0.3-0.8)")
    centroids: Optional[str] = opt(None, help="centroid sets for cluster_oracle / cluster_predicted: "
                                   "gate=FILE,up=FILE,down=FILE (any subset) or a folder (see awq.entry --centroids)")
    predictor: Optional[str] = opt(None, help="a trained awq.predictor file for cluster_predicted")
    nsamples: int = opt(4, help="test windows scored per point (default 4)", min=1)
    calib_nsamples: int = opt(2, help="train windows for calibration (default 2)", min=1)
    calib_tokens: int = opt(4096, help="MLP inputs per layer kept for calibration (default 4096)", min=1)
    seqlen: int = opt(2048, help="window length in tokens (default 2048)", min=2)
    seed: int = opt(0, help="calibration subsample / predictor training seed (default 0)")
    dtype: Optional[str] = opt(None, help="model dtype (default float32 on CPU)",
                               choices=["float32", "float16", "bfloat16"])
    device: Optional[str] = opt(None, help="cpu / cuda (default auto)")
    speed: bool = opt(False, help="also measure batch-1 decode tok/s of every realizable point against the dense "
                      "MLPs on the same lean decoder (awq.decode_speed; added to points already done); a "
                      "method without a batch-1 kernel is not timed: decode_status 'no batch-1 kernel'")
    speed_prompt_tokens: int = opt(256, help="--speed: prompt tokens (default 256)", min=1)
    speed_new_tokens: int = opt(64, help="--speed: new tokens per timed run (default 64)", min=2)
    speed_repeats: int = opt(3, help="--speed: interleaved repeats, medians (default 3)", min=1)
    speed_again: bool = opt(False, help="--speed: time again the points already timed (after a decoder or kernel "
                            "change); perplexity and cost are kept")
    protocol: str = opt("standard", help="evaluation protocol: 'standard' (each window one forward with the method "
                        "active, every token scored) or 'prompt:P' (the first P tokens of each window run dense as a "
                        "prompt, PPL/KL/top-1 on the rest with the method active; methods that choose from the prompt "
                        "see it; default results folder <model>_prompt<P>); see awq.protocol")
    dense_ref: Optional[Path] = opt(None, help="folder of the cached dense log-probabilities for kl/top1 (default "
                                    "<out>/../dense_ref; keyed by weights and window tokens, shared safely)")
    quality_again: bool = opt(False, help="evaluate again every point already done (ppl, kl, top1 and the read "
                              "fraction; decode speed kept); points without kl/top1 are re-evaluated anyway")
    no_hub: bool = opt(False, help="never try the Hugging Face hub for the corpus")


def _weights_sha(info) -> str:
    if info.kind in ("gguf", "default-gguf"):
        from awq.io import file_sha256

        return file_sha256(info.path)
    p = Path(info.loaded_from)
    files = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) if p.is_dir() else []
    if not files:
        return f"hub:{info.loaded_from}"
    from awq.io import file_sha256

    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return h.hexdigest()


def _has_prepare_decode(class_path: Optional[str]) -> bool:
    """Whether the module class ``package.module.Class`` now has a ``prepare_decode`` (a batch-1 kernel)."""
    import importlib

    mod, _, name = (class_path or "").rpartition(".")
    try:
        return callable(getattr(getattr(importlib.import_module(mod), name), "prepare_decode", None))
    except (ImportError, AttributeError, ValueError):
        return False


def _point_name(method: str, param: float) -> str:
    return f"{method}_{param:.4f}.json"


class Frontier:
    def __init__(self, cfg: FrontierConfig) -> None:
        from awq.methods import MethodError, check_density, get_method

        self.cfg = cfg
        names = cfg.methods or [m for m in ALL_METHODS if (m != "cluster_oracle" or cfg.centroids)
                                and (m != "cluster_predicted" or cfg.predictor)]
        try:
            self.specs = [get_method(m) for m in names]
            for d in cfg.densities or []:
                check_density(d)
        except MethodError as e:
            raise FrontierError(str(e)) from None
        if "cluster_oracle" in names and not cfg.centroids:
            raise FrontierError("cluster_oracle needs centroid files: pass --centroids gate=FILE,up=FILE,down=FILE "
                                "or a folder")
        if "cluster_predicted" in names and not cfg.predictor:
            raise FrontierError("cluster_predicted needs a trained predictor: pass --predictor FILE "
                                "(python -m awq.predictor train)")
        if cfg.predictor and not Path(cfg.predictor).is_file():
            raise FrontierError(f"--predictor {cfg.predictor}: no such file")
        check_config(cfg)
        from awq.protocol import Protocol, ProtocolError

        try:
            self.protocol = Protocol.parse(cfg.protocol).check(cfg.seqlen)
        except ProtocolError as e:
            raise FrontierError(str(e)) from None
        if self.protocol.prompt_tokens == 0:
            bad = [s.name for s in self.specs if getattr(s, "needs_prompt", False)]
            if bad:
                raise FrontierError(f"{bad[0]} chooses its neurons from a prompt: run it with --protocol prompt:P")
        if cfg.speed_again and not cfg.speed:
            raise FrontierError("--speed_again needs --speed")
        self.measure = None
        if cfg.speed:
            from awq.decode_speed import measure_point  # real batch-1 decode speed, dense interleaved

            self.measure = lambda model, tok, point: measure_point(
                model, tok, point, prompt_tokens=cfg.speed_prompt_tokens, new_tokens=cfg.speed_new_tokens,
                repeats=cfg.speed_repeats)

    # ------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        from awq.data import load_corpus, tokenize_windows
        from awq.methods import CalibData
        from awq.models import load_model, model_slug

        c = self.cfg
        self.model, self.tok, self.info = load_model(c.model_path, c.dtype, c.device)
        self.slug = model_slug(self.info)
        self.suffix = "" if self.protocol.prompt_tokens == 0 else f"_prompt{self.protocol.prompt_tokens}"
        self.out = Path(c.out) if c.out else Path("results/frontier") / f"{self.slug}{self.suffix}"
        test = load_corpus("test", c.data_path, use_hub=not c.no_hub)
        train = load_corpus("train", c.data_path, use_hub=not c.no_hub)
        tw = tokenize_windows(self.tok, test.text, c.seqlen)
        if tw.size(0) < c.nsamples:
            raise FrontierError(f"--nsamples {c.nsamples} but the test part has only {tw.size(0)} windows of {c.seqlen}")
        self.test_windows = tw[: c.nsamples]
        if self.measure is not None:  # --speed needs the lean decoder: refuse before any point, not after the first
            from awq.decode import SUPPORTED_TYPES

            mtype = getattr(self.model.config, "model_type", "?")
            if mtype not in SUPPORTED_TYPES:
                raise FrontierError(f"--speed: the lean decoder runs {', '.join(SUPPORTED_TYPES)} models, not "
                                    f"'{mtype}' (drop --speed)")
        self.calib = CalibData(tokenize_windows(self.tok, train.text, c.seqlen)[: c.calib_nsamples],
                               model_name=self.info.name, max_tokens=c.calib_tokens, seed=c.seed,
                               centroids=c.centroids, predictor=c.predictor)
        self.fingerprint = {"model": self.info.path, "model_name": self.info.name,
                            "weights_sha256": _weights_sha(self.info), "dtype": self.info.dtype,
                            "corpus": test.name, "corpus_test_sha256": test.sha256, "corpus_train_sha256": train.sha256,
                            "seqlen": c.seqlen, "nsamples": c.nsamples, "calib_nsamples": c.calib_nsamples,
                            "calib_tokens": c.calib_tokens, "seed": c.seed, "protocol": self.protocol.name}
        self._check_fingerprint()
        from awq.quality import DenseReference, weights_id

        self.reference = DenseReference(Path(c.dense_ref) if c.dense_ref else self.out.parent / "dense_ref",
                                        weights_id(self.fingerprint["weights_sha256"], self.info.dtype))
        self.reference.ensure(self.model, self.test_windows)

    def _check_fingerprint(self) -> None:
        from awq.io import atomic_write_json

        fp = self.out / "fingerprint.json"
        if fp.is_file():
            old = json.loads(fp.read_text())
            # the model's path and name are informative only: the same weights elsewhere (another checkout) resume
            diff = [k for k in self.fingerprint if k not in INFO_ONLY
                    and old.get(k, FINGERPRINT_DEFAULTS.get(k)) != self.fingerprint[k]]
            if diff:
                k = diff[0]
                raise FrontierError(f"{self.out} was made with another setup ({k}: {old.get(k)!r} there, "
                                    f"{self.fingerprint[k]!r} now); refusing to mix: pass another --out")
        else:
            atomic_write_json(fp, self.fingerprint, "frontier fingerprint")

    # ------------------------------------------------------------------------------------------
    def _evaluate(self, spec, density: float) -> tuple[dict, float]:
        """Calibrate, install, evaluate (PPL, KL, top-1, reads) under the protocol; the method stays installed."""
        from awq.cost import metering
        from awq.methods import config_summary, extra_read
        from awq.protocol import needs_prompt
        from awq.quality import evaluate
        from awq.sparsify import sparsify_, unsparsify_

        t0 = time.perf_counter()
        cfg = spec.calibrate(self.model, self.calib, density)
        t_cal = time.perf_counter() - t0
        unsparsify_(self.model)
        desc = f"{spec.name} d={density:.2f}"
        run = lambda: evaluate(self.model, self.test_windows, protocol=self.protocol,  # noqa: E731
                               reference=self.reference, desc=desc)
        if cfg is None:  # dense: reads every weight
            res = run()
            summ = {"weight_read_fraction": 1.0, "per_projection": {"gate_proj": 1.0, "up_proj": 1.0, "down_proj": 1.0},
                    "per_layer": None, "extra": 0.0}
        else:
            sparsify_(self.model, cfg)
            if self.protocol.prompt_tokens == 0 and (getattr(cfg, "needs_prompt", False) or needs_prompt(self.model)):
                unsparsify_(self.model)
                raise FrontierError(f"{spec.name} chooses its neurons from a prompt: run it with --protocol prompt:P")
            extra = extra_read(cfg, self.model)
            with metering(self.model) as meter:
                res = run()
            summ = meter.summary(extra)
        return {"weight_read_fraction": summ["weight_read_fraction"], "ppl": res.ppl, "kl": res.kl, "top1": res.top1,
                "tokens": res.tokens, "protocol": res.protocol, "extra": summ["extra"],
                "per_projection": summ["per_projection"], "per_layer": summ["per_layer"],
                "per_layer_projection": summ.get("per_layer_projection"), "config": config_summary(cfg),
                "calib_seconds": t_cal, "eval_seconds": res.seconds, "per_window_kl": res.per_window_kl,
                "fingerprint": self.fingerprint}, t_cal

    def _point(self, spec, density: float) -> dict:
        from awq.sparsify import unsparsify_

        try:
            q, _ = self._evaluate(spec, density)
            point = {"model": self.slug, "method": spec.name, "param": float(density),
                     "weight_read_fraction": q["weight_read_fraction"], "ppl": q["ppl"], "kl": q["kl"], "top1": q["top1"],
                     "tokens": q["tokens"], "realizable": spec.realizable, "decode_speedup": None, "roofline": None,
                     **{k: v for k, v in q.items() if k not in ("weight_read_fraction", "ppl", "kl", "top1", "tokens")}}
            if self.measure is not None and self._wants_speed(spec, point):
                point.update(self.measure(self.model, self.tok, point))
        finally:
            unsparsify_(self.model)
        return point

    @staticmethod
    def _wants_quality(point: dict, again: bool) -> bool:
        return again or point.get("kl") is None or point.get("top1") is None

    def _quality_only(self, spec, density: float, point: dict) -> dict:
        """A done point evaluated again (calibration is deterministic for the seed): PPL, KL, top-1 and reads
        replaced, decode speed kept; a PPL that moved by more than 1e-4 (relative) is logged."""
        from awq.sparsify import unsparsify_

        try:
            q, _ = self._evaluate(spec, density)
        finally:
            unsparsify_(self.model)
        old = point.get("ppl")
        if old is not None and abs(q["ppl"] - old) > 1e-4 * abs(old):
            log.warning("%s d=%.3f: ppl %.4f now, %.4f when first measured", spec.name, density, q["ppl"], old)
            q["ppl_before"] = old
        return {**point, **q}

    @staticmethod
    def _wants_speed(spec, point: dict, again: bool = False) -> bool:
        """Realizable, not dense, never timed (or ``again``); a point found without a batch-1 kernel only
        once the module class it named then has a ``prepare_decode`` (it had none)."""
        if not spec.realizable or spec.name == "dense":
            return False
        if point.get("decode_tok_s") is not None:
            return again
        status = point.get("decode_status") or ""
        if status.startswith("no batch-1 kernel"):
            return "has no prepare_decode" in status and _has_prepare_decode(point.get("decode_module"))
        return True

    def _speed_only(self, spec, density: float, point: dict) -> dict:
        """A done point without decode speed: calibrate again (deterministic for the seed), measure, keep the rest."""
        from awq.sparsify import sparsify_, unsparsify_

        cfg = spec.calibrate(self.model, self.calib, density)
        unsparsify_(self.model)
        if cfg is not None:
            sparsify_(self.model, cfg)
        try:
            return {**point, **self.measure(self.model, self.tok, point)}
        finally:
            unsparsify_(self.model)

    def run(self) -> dict:
        from awq.frontier_report import plot, sort_points, write_csv, write_markdown
        from awq.io import atomic_write_json

        self._setup()
        pdir = self.out / "points"
        pdir.mkdir(parents=True, exist_ok=True)
        todo = [(s, d) for s in self.specs for d in ((1.0,) if s.name == "dense" else (self.cfg.densities or s.densities))]
        done = 0
        for k, (spec, d) in enumerate(todo):
            path = pdir / _point_name(spec.name, d)
            if path.is_file():
                old = json.loads(path.read_text())
                redone = self._wants_quality(old, self.cfg.quality_again)
                if redone:
                    log.info("[%d/%d] %s at density %.3f: done, evaluating again for kl/top1", k + 1, len(todo),
                             spec.name, d)
                    old = self._quality_only(spec, d, old)
                    atomic_write_json(path, old, "frontier point")
                    done += 1
                    log.info("%s d=%.3f: read %.3f ppl %.3f kl %.4f top1 %.3f", spec.name, d,
                             old["weight_read_fraction"], old["ppl"], old["kl"], old["top1"])
                if self.measure is not None and self._wants_speed(spec, old, self.cfg.speed_again):
                    log.info("[%d/%d] %s at density %.3f: done, adding decode speed", k + 1, len(todo), spec.name, d)
                    atomic_write_json(path, self._speed_only(spec, d, old), "frontier point")
                    done += 0 if redone else 1
                elif not redone:
                    log.info("[%d/%d] skip (done): %s", k + 1, len(todo), path)
                continue
            log.info("[%d/%d] %s at density %.3f", k + 1, len(todo), spec.name, d)
            p = self._point(spec, d)
            atomic_write_json(path, p, "frontier point")
            done += 1
            log.info("%s d=%.3f: read %.3f ppl %.3f kl %.4f top1 %.3f", spec.name, d, p["weight_read_fraction"], p["ppl"],
                     p["kl"], p["top1"])
        points = sort_points([json.loads(f.read_text()) for f in sorted(pdir.glob("*.json"))], ALL_METHODS)
        csv_path = write_csv(points, self.out / "frontier.csv")
        head = (f"Model {self.info.name}, corpus {self.fingerprint['corpus']}, {self.cfg.nsamples} test windows of "
                f"{self.cfg.seqlen} tokens, calibration on {self.cfg.calib_nsamples} train windows, protocol "
                f"{self.protocol.name}; kl: mean KL(dense || method) in nats, top1: share of tokens whose most likely "
                f"next token is dense's (same tokens as PPL).\n\n")
        md_path = write_markdown(points, self.out / "frontier.md", head)
        png = plot(points, Path(self.cfg.plots_dir) / f"frontier_{self.slug}{self.suffix}.png",
                   f"{self.info.name}, protocol {self.protocol.name}")
        return {"points": points, "computed": done, "csv": str(csv_path), "markdown": str(md_path), "plot": str(png),
                "out": str(self.out)}


def main(cfg: FrontierConfig) -> dict:
    return Frontier(cfg).run()


def cli(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    parser = build_parser(FrontierConfig, prog="python -m awq.frontier", description=__doc__.split("\n\n")[0])
    try:
        cfg, _ = parse_config(FrontierConfig, argv, parser)
        res = main(cfg)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    from awq.frontier_report import markdown

    print(markdown(res["points"]), end="")
    print(f"frontier: {len(res['points'])} points ({res['computed']} computed now) -> {res['csv']}, {res['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
