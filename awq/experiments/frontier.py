"""``python -m awq.frontier``: perplexity against MLP weight bytes read per token, every method side by side.

For one model: every selected method (:data:`awq.methods.registry.METHODS`) is calibrated on the train part at
each density of its sweep, then scored on the same test windows. The cost axis,
``weight_read_fraction``, is what a batch-1 decode step must read of the MLP's weight bytes per token,
measured from the masks actually applied on the test tokens (:mod:`awq.methods.cost`), plus any predictor or
rotation the method reads besides (``extra``). Resumable: one JSON per point under
``<out>/points/``; points already done are skipped. The directory's ``fingerprint.json`` (weights
sha256, corpus sha256, seqlen, windows, calibration settings; the model's path and name are recorded
only) must match, else the run is refused.
Every point also carries ``kl`` and ``top1`` (:mod:`awq.experiments.quality`): the mean KL divergence from the
dense model's next-token distribution and the share of tokens whose top-1 token is dense's, on the tokens
perplexity scores; the dense log-probabilities are computed once per window and cached (``--dense_ref``,
default ``<out>/../dense_ref``). Points made before these columns existed get them on the next run
(re-evaluated: calibration is deterministic for the seed); ``--quality_again`` re-evaluates every point.
``--protocol prompt:P`` scores every method on the continuation of a dense P-token prompt
(:mod:`awq.methods.protocol`); the protocol is part of the fingerprint.
Writes ``<out>/frontier.csv``, ``<out>/frontier.md`` and ``<plots_dir>/frontier_<model>.png`` (PPL in full and
zoomed to 3x dense, KL, top-1).

Weight formats (``--weights f32,q8_0,q4_1``): every point is also computed with the model's linear layers (q/k/v/o,
gate/up/down, LM head, token embedding) replaced by their block-quantised values, dequantised
(:func:`awq.decode.quant.model_qweights`, raw blocks of the model's GGUF where it holds that format): exactly the
weights the quantised kernels read; calibration runs on those weights too, KL and top-1 stay against the F32 dense
model. Each point carries ``bytes_per_token``, the whole step's weight bytes at its format (attention + LM head + MLP
x (read fraction - extra), plus ``extra`` at 4 bytes per weight), and ``<plots_dir>/frontier_<model>_bytes.png``
plots perplexity against it. Points of a block format are ``<method>_<density>_<format>.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

from awq.decode.check import fake_quantized, sparse_weights
from awq.decode.lean import SUPPORTED_TYPES
from awq.decode.quant import model_qweights, step_bytes
from awq.decode.speed import measure_point  # real batch-1 decode speed, dense interleaved
from awq.decode.tcols import sparse_layout
from awq.experiments.frontier_config import FrontierConfig
from awq.experiments.frontier_report import markdown, plot, plot_bytes, sort_points, write_csv, write_markdown
from awq.experiments.quality import DenseReference, evaluate, weights_id
from awq.load.data import load_corpus, tokenize_windows
from awq.load.models import load_model, model_slug
from awq.load.quant_formats import WEIGHT_FORMATS, bits_per_weight
from awq.load.quant_gguf import gguf_source
from awq.methods.base import SwappedMLP, sparsify_, unsparsify_
from awq.methods.common import CalibData, MethodError, check_density
from awq.methods.cost import metering
from awq.methods.protocol import Protocol, ProtocolError, needs_prompt
from awq.methods.registry import METHODS, check_needs, config_summary, default_methods, extra_read, get_method
from awq.util.cli import ConfigError, build_parser, check_config, fail, parse_config, setup_logging
from awq.util.fingerprint import weights_fingerprint
from awq.util.io import atomic_write_json, output_lock

log = logging.getLogger("awq.experiments.frontier")

INFO_ONLY = ("model", "model_name")  # recorded, not compared: weights_sha256 identifies the model
FINGERPRINT_DEFAULTS = {"protocol": "standard"}  # the value of a key an older fingerprint.json lacks


class FrontierError(ValueError):
    """Bad frontier input or a results directory made with another setup (one line)."""


def _has_kernel(class_path: Optional[str]) -> bool:
    """Whether the module class ``package.module.Class`` now has a batch-1 kernel (overrides ``prepare_decode``)."""
    mod, _, name = (class_path or "").rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, SwappedMLP) and cls.prepare_decode is not SwappedMLP.prepare_decode


def _read_json(path: Path, what: str) -> dict:
    """A results file of this tool, or one line naming it when it is not complete JSON (written elsewhere: this
    tool writes atomically, so a killed run never leaves a truncated one)."""
    try:
        out = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FrontierError(f"frontier {what} file {path} is unreadable or truncated ({e}); delete it to compute it "
                            "again") from None
    if not isinstance(out, dict):
        raise FrontierError(f"frontier {what} file {path} does not hold a JSON object; delete it to compute it again")
    return out


def _point_name(method: str, param: float, fmt: str = "f32") -> str:
    return f"{method}_{param:.4f}.json" if fmt == "f32" else f"{method}_{param:.4f}_{fmt}.json"


def bytes_per_token(point: dict, step: dict) -> float:
    """The whole step's weight bytes per token of a point at its format: attention + LM head + MLP x read fraction,
    plus what the method reads besides (``extra``, a fraction of the MLP's weights, stored at 4 bytes each)."""
    frac, extra = float(point["weight_read_fraction"]), float(point.get("extra") or 0.0)
    mlp_weights = step["mlp"] / (bits_per_weight(point.get("weights", "f32")) / 8.0)
    return step["attn"] + step["head"] + step["mlp"] * (frac - extra) + extra * mlp_weights * 4.0


class Frontier:
    def __init__(self, cfg: FrontierConfig) -> None:
        self.cfg = cfg
        self._qw = None  # the QWeights of the format being run (None: F32)
        files = {"centroids": cfg.centroids, "predictor": cfg.predictor}
        names = cfg.methods or default_methods(files)
        try:
            self.specs = [get_method(m) for m in names]
            for d in cfg.densities or []:
                check_density(d)
            for s in self.specs:
                check_needs(s, files)
        except MethodError as e:
            raise FrontierError(str(e)) from None
        if cfg.predictor and not Path(cfg.predictor).is_file():
            raise FrontierError(f"--predictor {cfg.predictor}: no such file")
        check_config(cfg)
        if len(set(cfg.weights)) != len(cfg.weights):
            raise FrontierError(f"--weights: a format is given twice ({','.join(cfg.weights)})")
        try:
            self.protocol = Protocol.parse(cfg.protocol).check(cfg.seqlen)
        except ProtocolError as e:
            raise FrontierError(str(e)) from None
        if self.protocol.prompt_tokens == 0:
            bad = [s.name for s in self.specs if s.needs_prompt]
            if bad:
                raise FrontierError(f"{bad[0]} chooses its neurons from a prompt: run it with --protocol prompt:P")
        if cfg.speed_again and not cfg.speed:
            raise FrontierError("--speed_again needs --speed")
        self.measure = None
        if cfg.speed:
            self.measure = lambda model, tok, point: measure_point(
                model, tok, point, prompt_tokens=cfg.speed_prompt_tokens, new_tokens=cfg.speed_new_tokens,
                repeats=cfg.speed_repeats)

    # ------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        c = self.cfg
        self.model, self.tok, self.info = load_model(c.model_path, c.dtype, c.device)
        self.slug = model_slug(self.info)
        self.suffix = "" if self.protocol.prompt_tokens == 0 else f"_prompt{self.protocol.prompt_tokens}"
        self.out = Path(c.out) if c.out else Path("results/frontier") / f"{self.slug}{self.suffix}"
        if not c.out:  # the default folder is known now: one run at a time in it
            self._stack.enter_context(output_lock(self.out, "frontier results folder", folder=False))
        test = load_corpus("test", c.data_path, use_hub=not c.no_hub)
        train = load_corpus("train", c.data_path, use_hub=not c.no_hub)
        tw = tokenize_windows(self.tok, test.text, c.seqlen)
        if tw.size(0) < c.nsamples:
            raise FrontierError(f"--nsamples {c.nsamples} but the test part has only {tw.size(0)} windows of {c.seqlen}")
        self.test_windows = tw[: c.nsamples]
        if self.measure is not None:  # --speed needs the lean decoder: refuse before any point, not after the first
            mtype = getattr(self.model.config, "model_type", "?")
            if mtype not in SUPPORTED_TYPES:
                raise FrontierError(f"--speed: the lean decoder runs {', '.join(SUPPORTED_TYPES)} models, not "
                                    f"'{mtype}' (drop --speed)")
        self.calib = CalibData(tokenize_windows(self.tok, train.text, c.seqlen)[: c.calib_nsamples],
                               model_name=self.info.name, max_tokens=c.calib_tokens, seed=c.seed,
                               centroids=c.centroids, predictor=c.predictor)
        self.fingerprint = {"model": self.info.path, "model_name": self.info.name,
                            "weights_sha256": weights_fingerprint(self.model), "dtype": self.info.dtype,
                            "corpus": test.name, "corpus_test_sha256": test.sha256, "corpus_train_sha256": train.sha256,
                            "seqlen": c.seqlen, "nsamples": c.nsamples, "calib_nsamples": c.calib_nsamples,
                            "calib_tokens": c.calib_tokens, "seed": c.seed, "protocol": self.protocol.name}
        self._check_fingerprint()
        self.reference = DenseReference(Path(c.dense_ref) if c.dense_ref else self.out.parent / "dense_ref",
                                        weights_id(self.fingerprint["weights_sha256"], self.info.dtype))
        self.reference.ensure(self.model, self.test_windows)

    def _check_fingerprint(self) -> None:
        fp = self.out / "fingerprint.json"
        if fp.is_file():
            old = _read_json(fp, "fingerprint")
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
    def _evaluate(self, spec, density: float) -> dict:
        """Calibrate, install, evaluate (PPL, KL, top-1, reads) under the protocol; the method stays installed."""
        t0 = time.perf_counter()
        cfg = spec.calibrate(self.model, self.calib, density)
        t_cal = time.perf_counter() - t0
        unsparsify_(self.model)
        desc = f"{spec.name} d={density:.2f}"

        def run():
            return evaluate(self.model, self.test_windows, protocol=self.protocol, reference=self.reference, desc=desc)

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
            # at a block format: the projections the method's quantised sparse kernel reads requantised
            # (awq.decode.tcols) are scored with those values
            with metering(self.model) as meter, sparse_weights(self.model, self._qw):
                res = run()
            summ = meter.summary(extra)
        return {"weight_read_fraction": summ["weight_read_fraction"], "ppl": res.ppl, "kl": res.kl, "top1": res.top1,
                "tokens": res.tokens, "protocol": res.protocol, "extra": summ["extra"],
                "per_projection": summ["per_projection"], "per_layer": summ["per_layer"],
                "per_layer_projection": summ.get("per_layer_projection"), "config": config_summary(cfg),
                "calib_seconds": t_cal, "eval_seconds": res.seconds, "per_window_kl": res.per_window_kl,
                "fingerprint": self.fingerprint}

    def _point(self, spec, density: float, fmt: str = "f32") -> dict:
        try:
            q = self._evaluate(spec, density)
            head = ("weight_read_fraction", "ppl", "kl", "top1", "tokens")
            point = {"model": self.slug, "method": spec.name, "param": float(density),
                     **{k: q[k] for k in head}, "realizable": spec.realizable, "decode_speedup": None, "roofline": None,
                     **{k: v for k, v in q.items() if k not in head}, "weights": fmt,
                     "bits_per_weight": bits_per_weight(fmt)}
            point["bytes_per_token"] = bytes_per_token(point, step_bytes(self.model, fmt))
            if fmt != "f32":
                point["decode_status"] = f"not timed at {fmt} here (bench/bench_decode.py --weights {fmt})"
                point["sparse_layout"] = sparse_layout()  # what its quantised sparse kernel reads (awq.decode.tcols)
            elif self.measure is not None and self._wants_speed(spec, point):
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
        try:
            q = self._evaluate(spec, density)
        finally:
            unsparsify_(self.model)
        old = point.get("ppl")
        if old is not None and abs(q["ppl"] - old) > 1e-4 * abs(old):
            log.warning("%s d=%.3f: ppl %.4f now, %.4f when first measured", spec.name, density, q["ppl"], old)
            q["ppl_before"] = old
        out = {**point, **q}
        out["bytes_per_token"] = bytes_per_token(out, step_bytes(self.model, out.get("weights", "f32")))
        return out

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
            no_kernel = "has no prepare_decode" in status or "has no batch-1 kernel" in status
            return no_kernel and _has_kernel(point.get("decode_module"))
        return True

    def _speed_only(self, spec, density: float, point: dict) -> dict:
        """A done point without decode speed: calibrate again (deterministic for the seed), measure, keep the rest."""

        cfg = spec.calibrate(self.model, self.calib, density)
        unsparsify_(self.model)
        if cfg is not None:
            sparsify_(self.model, cfg)
        try:
            return {**point, **self.measure(self.model, self.tok, point)}
        finally:
            unsparsify_(self.model)

    def run(self) -> dict:
        with contextlib.ExitStack() as self._stack:
            if self.cfg.out:  # before the model loads: a second run on the same folder is refused at once (the lock
                # is .OUT.lock beside the folder, so a run refused later -- e.g. a model it cannot sparsify -- leaves
                # no folder behind)
                self._stack.enter_context(output_lock(self.cfg.out, "frontier results folder", folder=False))
            return self._run()

    def _formats(self):
        """(format, context manager putting the format's dequantised weights into the model) per ``--weights``."""
        src = gguf_source(self.cfg.model_path)
        for fmt in self.cfg.weights:
            self._qw = None
            if fmt == "f32":
                yield fmt, contextlib.nullcontext()
                continue
            qw = self._qw = model_qweights(self.model, fmt, gguf_path=src)
            # the weights the kernels read; the kernels' int8 activations and float16 cache are the decode-path
            # check's business (awq.decode.check.decode_path_check), not the point's
            yield fmt, fake_quantized(self.model, qw, act=False, kv16=False)

    def _run(self) -> dict:
        self._setup()
        pdir = self.out / "points"
        pdir.mkdir(parents=True, exist_ok=True)
        todo = [(s, d) for s in self.specs for d in ((1.0,) if s.name == "dense" else (self.cfg.densities or s.densities))]
        done = 0
        calib_f32 = self.calib
        for fmt, weights in self._formats():
            with weights:
                # calibration inputs collected from the model at this format (CalibData keeps them once)
                self.calib = calib_f32 if fmt == "f32" else dataclasses.replace(calib_f32, _xs=None)
                done += self._run_format(fmt, todo, pdir)
        self.calib = calib_f32
        points = sort_points([_read_json(f, "point") for f in sorted(pdir.glob("*.json"))], list(METHODS))
        steps = {fmt: step_bytes(self.model, fmt) for fmt in WEIGHT_FORMATS}
        for p in points:  # points of older runs (F32 only) carry no format or bytes per token: the same formula
            p.setdefault("weights", "f32")
            if p.get("bytes_per_token") is None and p["weights"] in steps:
                p["bytes_per_token"] = bytes_per_token(p, steps[p["weights"]])
        csv_path = write_csv(points, self.out / "frontier.csv")
        head = (f"Model {self.info.name}, corpus {self.fingerprint['corpus']}, {self.cfg.nsamples} test windows of "
                f"{self.cfg.seqlen} tokens, calibration on {self.cfg.calib_nsamples} train windows, protocol "
                f"{self.protocol.name}; kl: mean KL(dense || method) in nats, top1: share of tokens whose most likely "
                f"next token is dense's (same tokens as PPL); weights: the linear layers' format, MB/token: the whole "
                f"step's weight bytes at it.\n\n")
        md_path = write_markdown(points, self.out / "frontier.md", head)
        f32_points = [p for p in points if p["weights"] == "f32"]
        png = plot(f32_points or points, Path(self.cfg.plots_dir) / f"frontier_{self.slug}{self.suffix}.png",
                   f"{self.info.name}, protocol {self.protocol.name}")
        out = {"points": points, "computed": done, "csv": str(csv_path), "markdown": str(md_path), "plot": str(png),
               "out": str(self.out)}
        if len({p["weights"] for p in points}) > 1:
            out["plot_bytes"] = str(plot_bytes(points, Path(self.cfg.plots_dir) /
                                               f"frontier_{self.slug}{self.suffix}_bytes.png", self.info.name))
        return out

    def _run_format(self, fmt: str, todo: list, pdir: Path) -> int:
        done = 0
        for k, (spec, d) in enumerate(todo):
            path = pdir / _point_name(spec.name, d, fmt)
            if path.is_file():
                old = _read_json(path, "point")
                redone = self._wants_quality(old, self.cfg.quality_again)
                if redone:
                    log.info("[%d/%d] %s at density %.3f: done, evaluating again for kl/top1", k + 1, len(todo),
                             spec.name, d)
                    old = self._quality_only(spec, d, old)
                    atomic_write_json(path, old, "frontier point")
                    done += 1
                    log.info("%s d=%.3f: read %.3f ppl %.3f kl %.4f top1 %.3f", spec.name, d,
                             old["weight_read_fraction"], old["ppl"], old["kl"], old["top1"])
                if fmt == "f32" and self.measure is not None and self._wants_speed(spec, old, self.cfg.speed_again):
                    log.info("[%d/%d] %s at density %.3f: done, adding decode speed", k + 1, len(todo), spec.name, d)
                    atomic_write_json(path, self._speed_only(spec, d, old), "frontier point")
                    done += 0 if redone else 1
                elif not redone:
                    log.info("[%d/%d] skip (done): %s", k + 1, len(todo), path)
                continue
            log.info("[%d/%d] %s at density %.3f, %s weights", k + 1, len(todo), spec.name, d, fmt)
            p = self._point(spec, d, fmt)
            atomic_write_json(path, p, "frontier point")
            done += 1
            log.info("%s d=%.3f %s: read %.3f, %.1f MB/token, ppl %.3f kl %.4f top1 %.3f", spec.name, d, fmt,
                     p["weight_read_fraction"], p["bytes_per_token"] / 1e6, p["ppl"], p["kl"], p["top1"])
        return done


def main(cfg: FrontierConfig) -> dict:
    return Frontier(cfg).run()


def cli(argv: Optional[list[str]] = None) -> int:
    parser = build_parser(FrontierConfig, prog="python -m awq.frontier", description=__doc__.split("\n\n")[0])
    try:
        cfg, _ = parse_config(FrontierConfig, argv, parser)
    except ConfigError as e:
        fail(str(e))
        return 2
    setup_logging()
    try:
        res = main(cfg)
    except (ValueError, RuntimeError, OSError) as e:
        fail(str(e) or type(e).__name__)
        return 2

    print(markdown(res["points"]), end="")
    print(f"frontier: {len(res['points'])} points ({res['computed']} computed now) -> {res['csv']}, {res['plot']}"
          + (f", {res['plot_bytes']}" if res.get("plot_bytes") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
