"""Shared fixtures: tiny random Mistral/Llama models, a tiny tokenizer, a tiny local corpus."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# transformers binds its log handler to sys.stderr at its first log call; create it now, on pytest's session-long
# stream, so that it is never bound to a test's capsys stream (closed after that test: "--- Logging error ---")
import transformers.utils.logging as _hf_logging  # noqa: E402

_hf_logging.get_logger("transformers")

TINY_TEXT = (
    " = Tiny Corpus = \n",
    " The quick brown fox jumps over the lazy dog . A second sentence follows , with numbers 1 2 3 . \n",
    " = = Section = = \n",
    " Activation sparsity in language models means that many neurons are inactive for a token . \n",
    " Clustering activation patterns compresses them into a few centroid masks . \n",
) * 40


def tiny_config(arch: str = "mistral", layers: int = 2, vocab: int = 128, hidden: int = 64, inter: int = 128):
    from transformers import LlamaConfig, MistralConfig

    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, use_cache=False,
              tie_word_embeddings=False)
    return MistralConfig(**kw) if arch == "mistral" else LlamaConfig(**kw)


def tiny_model(arch: str = "mistral", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(arch, **kw))
    return m.eval()


def tiny_tokenizer(vocab: int = 128):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # ByteLevel.alphabet() comes in a different order in every process: sorted, the first 100 characters (and so
    # the trained vocabulary, the tiny model and every figure on it) are the same in every run
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[:100], show_progress=False)
    tok.train_from_iterator(list(TINY_TEXT), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random MistralForCausalLM + tokenizer (a Hugging Face model directory)."""
    d = tmp_path_factory.mktemp("tiny_mistral")
    tok = tiny_tokenizer()
    model = tiny_model("mistral", vocab=len(tok))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A local wiki.test.raw / wiki.train.raw pair in the WikiText raw layout."""
    d = tmp_path_factory.mktemp("tiny_corpus")
    (d / "wiki.test.raw").write_text("".join(TINY_TEXT))
    (d / "wiki.train.raw").write_text("".join(reversed(TINY_TEXT)))
    return d


@pytest.fixture(scope="session")
def tiny_thresholds(tiny_model_dir, tiny_corpus, tmp_path_factory) -> Path:
    """50% thresholds for the tiny model, made by `python -m awq.calibrate` on the tiny corpus's train part."""
    from awq.methods.calibration import cli

    out = tmp_path_factory.mktemp("thr") / "thresholds_50_percent_sparsity.json"
    assert cli(["--sparsity", "0.5", "--model_path", str(tiny_model_dir), "--data_path", str(tiny_corpus),
                "--seqlen", "32", "--nsamples", "4", "--output", str(out)]) == 0
    return out


# The quick tier (`pytest -m "not slow"`, under ~90 s) leaves out, besides the tests marked slow where they are
# defined, these: each took 2 s or more on a quiet 2-core machine (`pytest --durations`), mostly subprocess CLIs,
# real-model runs and kernel builds for a second vector path. `make test` runs them all.
SLOW_TESTS = (
    "tests/test_artifact.py::test_no_store_says_which_command",
    "tests/test_bad_input.py::test_store_of_another_model_with_the_same_name_is_refused",
    "tests/test_bad_input_matrix.py::test_bad_input_in_real_processes",
    "tests/test_cli.py::test_real_clis_share_the_generator",
    "tests/test_cluster_kernel.py::test_avx2_only_build_is_real_and_identical",
    "tests/test_clustering.py::test_cli_bad_inputs",
    "tests/test_clustering.py::test_cli_pipeline_and_precision",
    "tests/test_clustering.py::test_runs_by_path_and_as_module_from_any_cwd",
    "tests/test_clustering.py::test_two_processes_equal_one",
    "tests/test_crash.py::test_killed_clustering_run_resumes_to_the_same_result",
    "tests/test_data.py::test_substitute_is_labelled_and_split",
    "tests/test_decode.py::test_default_model_greedy_equals_hf_generate",
    "tests/test_entry.py::test_help_documents_every_flag",
    "tests/test_entry.py::test_lm_eval_local_task",
    "tests/test_entry.py::test_real_default_model_short_window",
    "tests/test_faults.py::test_reproduce_full_disk_and_kill",
    "tests/test_frontier.py::test_frontier_quality_added_to_old_points_and_prompt_protocol",
    "tests/test_frontier.py::test_frontier_speed_added_to_done_points",
    "tests/test_gelu.py::test_every_method_runs_on_a_gelu_gated_mlp",
    "tests/test_masks.py::test_resume_after_kill9_is_byte_identical",
    "tests/test_models.py::test_real_qwen_if_cached",
    "tests/test_predictor.py::test_cli_contract_and_module_entry_point",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("[", 1)[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


# -- kernel builds in the background --------------------------------------------------------------------------
# On a fresh clone compiling the C++ kernels is much of the suite's time, one g++ at a time. The AVX2-only builds
# the tests load (tests of both vector paths) are started at once in a second process, so a second core compiles
# them while the first runs tests; each build holds its own lock (awq.kernels.build), so a test that needs one
# before it is ready waits for it, then loads it.
_PREBUILD = ("import awq.kernels.quant as q, awq.kernels.cluster as c, awq.kernels.lowbit as lb; "
             "c.kernel(); lb.lowbit_kernel(); q.kernel()")
_prebuild_proc = None


def pytest_sessionstart(session):
    global _prebuild_proc
    import platform
    import subprocess
    import sys

    if platform.machine() not in ("x86_64", "AMD64") or session.config.getoption("collectonly"):
        return
    env = {**os.environ, "AWQ_HW_FLAGS": "avx2 fma"}
    _prebuild_proc = subprocess.Popen([sys.executable, "-c", _PREBUILD], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)


def pytest_sessionfinish(session, exitstatus):
    import signal

    if _prebuild_proc is not None and _prebuild_proc.poll() is None:  # a short session: stop its compilers too
        try:
            os.killpg(_prebuild_proc.pid, signal.SIGTERM)
            _prebuild_proc.wait(timeout=30)
        except (ProcessLookupError, OSError):
            pass
