"""KL / top-1 against dense (awq.experiments.quality) and the prompt -> continuation protocol (awq.methods.protocol), against plain
float64 references on tiny random models."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from awq.experiments.quality import DenseReference, QualityError, evaluate
from awq.load.arch import decoder_layers
from awq.methods.base import MethodConfig, SwappedMLP, base_mlp, sparsify_
from awq.methods.protocol import Protocol, ProtocolError, prompt_phase, window_logits
from awq.methods.teal import TealConfig
from tests.conftest import tiny_model

VOCAB, T = 96, 40


@torch.no_grad()
def _model(arch="llama", layers=2):
    """A tiny random model with peaked next-token distributions and MLPs that matter (a random init is near
    uniform, where every KL is tiny)."""
    m = tiny_model(arch, vocab=VOCAB, layers=layers)
    m.lm_head.weight.mul_(40)
    for layer in decoder_layers(m):
        layer.mlp.down_proj.weight.mul_(20)
    return m


def _windows(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, T), generator=g)


def _teal(model, tx=0.6, th=0.05):
    n = len(decoder_layers(model))
    return TealConfig([tx] * n, [th] * n)


def _ref_kl_top1(dense_logits, logits):
    """Plain float64: mean over rows of sum_v p (log p - log q), and the share of equal argmaxes."""
    kls, same = [], 0
    for p_row, q_row in zip(dense_logits.double(), logits.double()):
        p = torch.softmax(p_row, 0)
        q = torch.softmax(q_row, 0)
        kls.append(float((p * (p.log() - q.log())).sum()))
        same += int(p_row.argmax() == q_row.argmax())
    return sum(kls) / len(kls), same / len(kls)


def _ref_nll(logits, targets):
    lp = torch.log_softmax(logits.double(), -1)
    return -float(lp.gather(-1, targets[:, None]).sum())


@torch.no_grad()
def test_kl_top1_ppl_match_float64_reference(tmp_path):
    model = _model("llama", layers=2)
    win = _windows()
    dense = torch.cat([model(w[None]).logits[0, :-1] for w in win])
    ref = DenseReference(tmp_path / "ref", "w|float32")
    assert ref.ensure(model, win) == 2 and ref.ensure(model, win) == 0  # cached: nothing recomputed
    sparsify_(model, _teal(model))
    sparse = torch.cat([model(w[None]).logits[0, :-1] for w in win])
    res = evaluate(model, win, reference=ref)
    kl, top1 = _ref_kl_top1(dense, sparse)
    assert kl > 1e-3 and top1 < 1.0  # the method changes the model (else the test proves nothing)
    assert res.kl == pytest.approx(kl, rel=2e-3, abs=1e-5)
    assert res.top1 == pytest.approx(top1, abs=1e-12)
    tg = torch.cat([w[1:] for w in win])
    assert res.tokens == tg.numel() == 2 * (T - 1)
    assert res.ppl == pytest.approx(math.exp(_ref_nll(sparse, tg) / tg.numel()), rel=1e-6)
    from awq.experiments.eval import perplexity

    assert res.ppl == pytest.approx(perplexity(model, win).ppl, rel=1e-6)  # the frontier's old PPL, same tokens


@torch.no_grad()
def test_dense_against_its_own_reference(tmp_path):
    model = _model("llama", layers=2)
    win = _windows(1)
    ref = DenseReference(tmp_path, "w|float32")
    ref.ensure(model, win)
    res = evaluate(model, win, reference=ref)
    assert res.top1 == 1.0
    assert 0.0 <= res.kl < 1e-5  # float16 storage of log p only


@torch.no_grad()
def test_reference_is_keyed_and_checked(tmp_path):
    model = _model("llama", layers=1)
    win = _windows(1)
    ref = DenseReference(tmp_path, "w|float32")
    other = DenseReference(tmp_path, "other-weights|float32")
    assert ref.key(win[0]) != other.key(win[0]) != ref.key(_windows(1, seed=2)[0])
    with pytest.raises(QualityError, match="no dense reference"):
        ref.load(win[0])
    dense = model(win).logits[0, :-1]
    sparsify_(model, _teal(model))
    mods = [layer.mlp for layer in decoder_layers(model)]
    ref.ensure(model, win)  # computed with the original MLPs, the swapped ones put back
    assert [layer.mlp for layer in decoder_layers(model)] == mods
    logp, top1 = ref.load(win[0])
    torch.testing.assert_close(torch.from_numpy(logp.astype("float32")), torch.log_softmax(dense, -1),
                               rtol=2e-3, atol=2e-3)
    assert torch.equal(top1, dense.argmax(-1))
    assert not other.has(win[0])
    npy = next(tmp_path.glob("*.logp.npy"))
    npy.write_bytes(npy.read_bytes()[:200])  # truncated
    with pytest.raises(QualityError):
        ref.load(win[0])


def test_protocol_parse():
    assert Protocol.parse(None).name == "standard" == Protocol.parse("standard").name
    assert Protocol.parse("prompt:16").prompt_tokens == 16
    for bad in ("prompt", "prompt:0", "prompt:x", "prefix:3", "prompt:-2"):
        with pytest.raises(ProtocolError):
            Protocol.parse(bad)
    with pytest.raises(ProtocolError, match="at least 2"):
        Protocol.parse("prompt:39").check(40)


class _PositionSwitch(nn.Module):
    """Reference for prompt:P in ONE full forward: dense MLP at positions < P, the method's at >= P."""

    def __init__(self, method: nn.Module, P: int) -> None:
        super().__init__()
        self.method, self.P = method, P
        self.dense = base_mlp(method)

    def forward(self, x):
        y = self.method(x)
        y[:, : self.P] = self.dense(x[:, : self.P])
        return y


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@torch.no_grad()
def test_prompt_protocol_matches_position_switch_reference(arch):
    P = 13
    model = _model(arch, layers=2)
    win = _windows(2)
    dense_full = model(win).logits
    # dense under the protocol: the same function as one full forward
    got = window_logits(model, win, Protocol(P))
    torch.testing.assert_close(got, dense_full[:, P:-1], rtol=1e-4, atol=1e-4)
    sparsify_(model, _teal(model))
    got = window_logits(model, win, Protocol(P))
    layers = decoder_layers(model)
    mods = [layer.mlp for layer in layers]
    for layer, m in zip(layers, mods):
        layer.mlp = _PositionSwitch(m, P)
    ref = model(win).logits[:, P:-1]
    for layer, m in zip(layers, mods):
        layer.mlp = m
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, dense_full[:, P:-1], atol=1e-3)  # the method is active on the continuation



class _PromptSet(SwappedMLP):
    """A toy prompt-chosen method: keeps the neurons with the largest prompt-mean |h| per sequence."""

    needs_prompt = True

    def __init__(self, base, i, k):
        super().__init__(base, i)
        self.k, self.keep, self.calls = k, None, []

    def observe_prompt(self, x, h):
        self.calls.append(("prompt", tuple(x.shape), tuple(h.shape)))
        m = self.base
        torch.testing.assert_close(h, m.act_fn(m.gate_proj(x)) * m.up_proj(x))  # the dense h of the prompt
        idx = h.abs().mean(1).topk(self.k, dim=-1).indices  # [B, k]
        self.keep = torch.zeros(h.shape[0], h.shape[-1], dtype=torch.bool).scatter_(1, idx, True)

    def end_sequence(self):
        self.calls.append(("end",))
        self.keep = None

    def forward(self, x):
        self.calls.append(("forward", tuple(x.shape)))
        m = self.base
        h = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
        return m.down_proj(h * self.keep[:, None, :])


@dataclass
class _PromptSetConfig(MethodConfig):
    k: int = 16

    def build(self, mlp, i):
        return _PromptSet(mlp, i, self.k)


@torch.no_grad()
def test_prompt_hook_sequence_sets_batched():
    P = 11
    model = _model("llama", layers=2)
    win = _windows(3)
    sparsify_(model, _PromptSetConfig())
    batched = window_logits(model, win, Protocol(P))
    mods = [layer.mlp for layer in decoder_layers(model)]
    assert mods[0].calls == [("prompt", (3, P, 64), (3, P, 128)), ("forward", (3, T - P, 64)), ("end",)]
    assert mods[0].keep is None
    one = torch.cat([window_logits(model, w[None], Protocol(P)) for w in win])  # one sequence at a time
    torch.testing.assert_close(batched, one, rtol=1e-4, atol=1e-4)
    with prompt_phase(model) as n:
        assert n == 2 and all(type(layer.mlp).__name__ == "DensePromptMLP" for layer in decoder_layers(model))
    assert all(isinstance(layer.mlp, _PromptSet) for layer in decoder_layers(model))
    from awq.methods.protocol import needs_prompt

    assert needs_prompt(model) == ["_PromptSet"]


@torch.no_grad()
def test_prompt_protocol_scores_same_tokens_as_dense(tmp_path):
    P = 9
    model = _model("llama", layers=2)
    win = _windows(2)
    ref = DenseReference(tmp_path, "w|float32")
    ref.ensure(model, win)
    d = evaluate(model, win, protocol=f"prompt:{P}", reference=ref)
    full = model(win).logits
    tg = win[:, P + 1 :]
    assert d.tokens == tg.numel() == 2 * (T - 1 - P) and d.protocol == f"prompt:{P}"
    nll = sum(_ref_nll(full[b, P:-1], tg[b]) for b in range(2))
    assert d.ppl == pytest.approx(math.exp(nll / tg.numel()), rel=1e-5)
    assert d.top1 == 1.0 and d.kl < 1e-5
    sparsify_(model, _teal(model))
    s = evaluate(model, win, protocol=f"prompt:{P}", reference=ref)
    sl = window_logits(model, win, Protocol(P))
    kl, top1 = _ref_kl_top1(full[:, P:-1].reshape(-1, VOCAB), sl.reshape(-1, VOCAB))
    assert s.kl == pytest.approx(kl, rel=2e-3, abs=1e-5) and s.top1 == pytest.approx(top1)


def test_entry_protocol_and_kl(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    from awq.experiments.entry import cli
    from awq.store.thresholds import save_thresholds

    thr = tmp_path / "t.json"
    save_thresholds({"gate_proj": [0.02, 0.02], "up_proj": [0.02, 0.02], "down_proj": [0.0005, 0.0005]}, thr)
    base = ["--model_path", str(tiny_model_dir), "--data_path", str(tiny_corpus), "--seqlen", "32", "--nsamples", "2",
            "--device", "cpu", "--kl", "--dense_ref", str(tmp_path / "ref")]
    out = {}
    for name, extra in (("dense", ["--dense"]), ("thr", ["--thresholds", str(thr)]),
                        ("thr_prompt", ["--thresholds", str(thr), "--protocol", "prompt:10"]),
                        ("plain", ["--thresholds", str(thr)])):
        args = base + extra + ["--output_path", str(tmp_path / f"{name}.json")]
        if name == "plain":
            args = [a for a in args if a not in ("--kl", "--dense_ref", str(tmp_path / "ref"))]
        assert cli(args) == 0
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert out["dense"]["kl"] < 1e-5 and out["dense"]["top1"] == 1.0 and out["dense"]["protocol"] == "standard"
    assert out["thr"]["kl"] > 0 and out["thr"]["ppl"] == pytest.approx(out["plain"]["ppl"], rel=1e-6)
    assert "kl" not in out["plain"]
    p = out["thr_prompt"]
    assert p["protocol"] == "prompt:10" and p["tokens"] == 2 * (31 - 10) and p["config"]["protocol"] == "prompt:10"
    assert "protocol=prompt:10 kl=" in capsys.readouterr().out
    for bad, msg in ((["--protocol", "prompt:31"], "at least 2"), (["--protocol", "tail:3"], "'standard' or 'prompt:P'"),
                     (["--dense_ref", "x"], "--dense_ref is the cache of --kl")):
        assert cli(["--model_path", str(tiny_model_dir), "--data_path", str(tiny_corpus), "--seqlen", "32",
                    "--dense"] + bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_merge_frontier_quality_keeps_speed_where_ppl_agrees(tmp_path):
    from awq.report.importers import RunOutputError, merge_frontier_quality

    ref = {"what": "x", "fingerprint": {"weights_sha256": "a", "corpus_test_sha256": "b", "seqlen": 8, "nsamples": 1},
           "points": [{"method": "dense", "param": 1.0, "weight_read_fraction": 1.0, "ppl": 10.0, "tokens": 7,
                       "realizable": True},
                      {"method": "teal", "param": 0.5, "weight_read_fraction": 0.5, "ppl": 20.0, "tokens": 7,
                       "realizable": True, "decode_speedup": 1.2, "roofline": 1.4},
                      {"method": "paper", "param": 0.5, "weight_read_fraction": 0.75, "ppl": 30.0, "tokens": 7,
                       "realizable": True, "decode_speedup": 0.9, "roofline": 1.1},
                      {"method": "cats", "param": 0.3, "weight_read_fraction": 0.5, "ppl": 40.0, "tokens": 7,
                       "realizable": True}]}
    (tmp_path / "frontier.json").write_text(json.dumps(ref))
    run = tmp_path / "run"
    run.mkdir()
    (run / "fingerprint.json").write_text(json.dumps(ref["fingerprint"]))
    (run / "frontier.csv").write_text(
        "model,method,param,weight_read_fraction,ppl,kl,top1,tokens,realizable,decode_speedup,roofline,protocol\n"
        "m,dense,1.0,1.0,10.0,0.0,1.0,7,true,,,standard\n"
        "m,teal,0.5,0.5,20.001,0.3,0.7,7,true,,,standard\n"
        "m,paper,0.5,0.76,33.0,0.5,0.6,7,true,,,standard\n"
        "m,teal_greedy,0.5,0.5,18.0,0.2,0.8,7,true,,,standard\n")
    c = merge_frontier_quality(run / "frontier.csv", "frontier", tmp_path)
    assert c == {"added": 2, "replaced": 1, "appended": 1, "untouched": 1}
    pts = {p["method"]: p for p in json.loads((tmp_path / "frontier.json").read_text())["points"]}
    assert pts["teal"]["kl"] == 0.3 and pts["teal"]["decode_speedup"] == 1.2 and pts["teal"]["ppl"] == 20.0
    assert pts["paper"]["ppl"] == 33.0 and pts["paper"]["ppl_before"] == 30.0 and "decode_speedup" not in pts["paper"]
    assert pts["teal_greedy"]["top1"] == 0.8 and "kl" not in pts["cats"]
    (run / "fingerprint.json").write_text(json.dumps({**ref["fingerprint"], "nsamples": 2}))
    with pytest.raises(RunOutputError, match="nsamples"):
        merge_frontier_quality(run / "frontier.csv", "frontier", tmp_path)


def test_merge_keys_on_weight_format_and_quant_sentence(tmp_path):
    """A quantised point (same method and density as an F32 one) is appended with its format, never merged into the
    F32 point; the README's quantised-frontier sentence compares at the lowest-byte dense model's bytes per token."""
    from awq.report.importers import merge_frontier_quality
    from awq.report.summaries import quant_headline, quant_sentence

    fp = {"weights_sha256": "a", "corpus_test_sha256": "b", "seqlen": 8, "nsamples": 1}
    ref = {"what": "x", "fingerprint": fp, "points": [
        {"method": "teal", "param": 0.5, "weight_read_fraction": 0.5, "ppl": 20.0, "tokens": 7, "realizable": True}]}
    (tmp_path / "frontier.json").write_text(json.dumps(ref))
    run = tmp_path / "run"
    run.mkdir()
    (run / "fingerprint.json").write_text(json.dumps(fp))
    (run / "frontier.csv").write_text(
        "model,method,param,weight_read_fraction,ppl,kl,top1,tokens,realizable,protocol,weights,bytes_per_token\n"
        "m,teal,0.5,0.5,20.0,0.3,0.7,7,true,standard,f32,100.0\n"
        "m,teal,0.5,0.5,25.0,0.4,0.6,7,true,standard,q4_1,30.0\n")
    assert merge_frontier_quality(run / "frontier.csv", "frontier", tmp_path)["appended"] == 1
    pts = json.loads((tmp_path / "frontier.json").read_text())["points"]
    assert [(q["weights"] if "weights" in q else "f32", q["ppl"]) for q in pts] == [("f32", 20.0), ("q4_1", 25.0)]
    assert pts[1]["bytes_per_token"] == 30.0 and pts[0]["kl"] == 0.3

    def pt(m, d, w, read, mb, p):
        return {"method": m, "param": d, "weights": w, "weight_read_fraction": read, "bytes_per_token": mb * 1e6,
                "ppl": p, "realizable": True}
    pts = [pt("dense", 1.0, "q4_1", 1.0, 80, 25.0), pt("dense", 1.0, "q8_0", 1.0, 140, 24.0),
           pt("teal", 0.5, "q8_0", 0.46, 97, 35.0), pt("teal", 0.3, "q8_0", 0.3, 75, 300.0),
           pt("teal", 0.5, "q4_1", 0.46, 57, 37.0)]
    s = quant_sentence(pts, "M")
    assert "dense Q4_1 reads 80.0 MB" in s and "`teal` d=0.3 at Q8_0 (75.0 MB), has PPL 300.00, worse" in s
    assert "`teal` d=0.5 reads 57.0 MB at PPL 37.00 (1.48x its dense)" in s
    assert quant_sentence([q for q in pts if q["weights"] == "q8_0"], "M") is None  # one dense format only
    assert quant_headline({"frontier_quant": {"points": pts}}).startswith("At equal weight bytes per token")


def test_report_frontier_table_shows_kl_and_top1():
    from awq.report.tables import frontier

    pts = [{"method": "dense", "param": 1.0, "weight_read_fraction": 1.0, "ppl": 10.0, "realizable": True, "kl": 0.0,
            "top1": 1.0},
           {"method": "teal", "param": 0.5, "weight_read_fraction": 0.49, "ppl": 15.0, "realizable": True, "kl": 0.4321,
            "top1": 0.655}]
    out = frontier({"frontier": {"points": pts}})
    assert "| KL vs dense | top-1 = dense |" in out and "| 0.432 | 66% |" in out and "KL 0.432, top-1 66%" in out
    old = frontier({"frontier": {"points": [{k: v for k, v in p.items() if k not in ("kl", "top1")} for p in pts]}})
    assert "KL" not in old  # files without the columns render as before
