"""Gated MLPs with a GELU activation (Gemma's gelu_pytorch_tanh, a Llama config with hidden_act="gelu"): every
frontier method runs (masked dense where a C++ kernel implements SiLU only, and says so), the lean decoder runs
the Llama one exactly, and what cannot run is refused in one line before any work."""
from __future__ import annotations

import json
import math

import pytest
import torch

from awq.experiments.frontier import FrontierConfig, FrontierError, main
from awq.methods.registry import METHODS
from tests.conftest import tiny_tokenizer

KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=512, use_cache=False)


@torch.no_grad()
def _gelu_model(arch: str, vocab: int, seed: int = 0):
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gemma":
        m = GemmaForCausalLM(GemmaConfig(vocab_size=vocab, head_dim=16, hidden_activation="gelu_pytorch_tanh", **KW))
    else:
        m = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_act="gelu", tie_word_embeddings=False, **KW))
    for layer in m.model.layers:  # MLPs that matter (a random init barely moves the residual stream)
        layer.mlp.down_proj.weight.mul_(20)
    return m.eval()


def _save(arch, tmp_path_factory):
    d = tmp_path_factory.mktemp(arch)
    tok = tiny_tokenizer()
    _gelu_model(arch, len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return arch, d


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return _save("gemma", tmp_path_factory)


@pytest.fixture(scope="module", params=["gemma", "llama_gelu"])
def gelu_dir(request, tmp_path_factory, gemma_dir):
    return gemma_dir if request.param == "gemma" else _save(request.param, tmp_path_factory)


def _cfg(d, corpus, tmp_path, **kw):
    base = dict(model_path=str(d), data_path=str(corpus), out=tmp_path / "fr", plots_dir=tmp_path / "plots",
                densities=[0.5], nsamples=1, calib_nsamples=3, seqlen=24, device="cpu")
    base.update(kw)
    return FrontierConfig(**base)


def test_gelu_activation_is_what_the_config_says(gelu_dir):
    from transformers import AutoModelForCausalLM

    from awq.kernels.mlp import is_silu

    arch, d = gelu_dir
    act = AutoModelForCausalLM.from_pretrained(d).model.layers[0].mlp.act_fn
    x = torch.linspace(-4, 4, 9)
    want = torch.nn.functional.gelu(x, approximate="tanh" if arch == "gemma" else "none")
    torch.testing.assert_close(act(x), want)
    assert not is_silu(act)


def test_every_method_runs_on_a_gelu_gated_mlp(gemma_dir, tiny_corpus, tmp_path):
    """Every frontier method (one density; the K=128/256 variants need >= K calibration tokens, the same code
    as K=64) gives a finite PPL, KL > 0 and a read fraction below 1 where it sparsifies anything, on Gemma's
    gelu_pytorch_tanh MLP (the methods call the model's own act_fn; the Llama "gelu" model runs a subset
    below)."""
    _, d = gemma_dir
    names = [m for m, spec in METHODS.items()
             if spec.needs is None and not spec.needs_prompt and "_k128" not in m and "_k256" not in m]
    res = main(_cfg(d, tiny_corpus, tmp_path, methods=names))
    pts = {p["method"]: p for p in res["points"]}
    assert set(pts) == set(names)
    for m, p in pts.items():
        assert math.isfinite(p["ppl"]) and p["kl"] >= 0 and 0 <= p["top1"] <= 1, m
        if m not in ("dense", "paper_down"):
            assert p["kl"] > 1e-6 and p["weight_read_fraction"] < 1.0, m
    assert pts["dense"]["top1"] == 1.0


def test_gelu_speed_kernels_decline_by_name_or_refuse(gelu_dir, tiny_corpus, tmp_path):
    arch, d = gelu_dir
    kw = dict(methods=["dense", "cats", "teal"], speed=True, speed_prompt_tokens=6, speed_new_tokens=3,
              speed_repeats=1)
    if arch == "gemma":  # the lean decoder runs llama / mistral / qwen2: refused before any point is computed
        with pytest.raises(FrontierError, match="lean decoder runs llama, mistral, qwen2 models, not 'gemma'"):
            main(_cfg(d, tiny_corpus, tmp_path, **kw))
        assert not list((tmp_path / "fr" / "points").glob("*.json"))
        return
    pts = {p["method"]: p for p in main(_cfg(d, tiny_corpus, tmp_path, **kw))["points"]}
    for m in ("cats", "teal"):  # the C++ kernels implement SiLU: not timed, and the point says why
        assert pts[m]["decode_tok_s"] is None and "activation is not SiLU" in pts[m]["decode_status"], m
    assert "activation is not SiLU" in (tmp_path / "fr" / "frontier.md").read_text()


def test_lean_decoder_runs_gelu_llama_exactly():
    from awq.decode.lean import LeanDecoder
    from awq.methods.base import sparsify_
    from awq.methods.teal import TealConfig

    model = _gelu_model("llama_gelu", 128, seed=3)
    ids = torch.randint(0, 128, (7,), generator=torch.Generator().manual_seed(1))
    want = model.generate(ids[None], do_sample=False, max_new_tokens=10, min_new_tokens=10, eos_token_id=None,
                          pad_token_id=0, use_cache=True)[0, 7:].tolist()
    assert LeanDecoder(model).generate(ids, 10) == want
    sparsify_(model, TealConfig([0.5, 0.5], [0.02, 0.02]))  # masked dense path (no SiLU kernel): same as HF
    want = model.generate(ids[None], do_sample=False, max_new_tokens=10, min_new_tokens=10, eos_token_id=None,
                          pad_token_id=0, use_cache=True)[0, 7:].tolist()
    assert LeanDecoder(model).generate(ids, 10) == want


def test_entry_paper_thresholds_on_gelu(gelu_dir, tiny_corpus, tmp_path, capsys):
    from awq.experiments.entry import cli
    from awq.store.thresholds import save_thresholds

    _, d = gelu_dir
    thr = tmp_path / "t.json"
    save_thresholds({"gate_proj": [0.02, 0.02], "up_proj": [0.02, 0.02], "down_proj": [0.0, 0.0]}, thr)
    out = tmp_path / "r.json"
    assert cli(["--model_path", str(d), "--data_path", str(tiny_corpus), "--seqlen", "24", "--nsamples", "1",
                "--thresholds", str(thr), "--protocol", "prompt:8", "--output_path", str(out)]) == 0
    r = json.loads(out.read_text())
    assert math.isfinite(r["ppl"]) and r["protocol"] == "prompt:8" and r["weight_read"]["weight_read_fraction"] < 1
