# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test test-all demo bench clean

venv: $(STAMP)

# Pinned, installed without dependencies (requirements.txt says why and pins the ones it needs).
NODEPS := nvidia-resiliency-ext==0.4.1

$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(NODEPS)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The default suite (17.9 min on 2 cores in the last run, docs/results/make_test_durations.txt: two pytest workers, a test file each, as the
# multi-process tests spend much of their time starting processes); test-all adds the slow cases.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=30 tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

# The main job on the built-in default, as a newcomer's first run: the tiny preset learns a
# conditional synthetic task (4 classes, each a fixed text embedding and its own latent pattern),
# PP=2 over 2 local CPU ranks (all GPUs when there are some), text reconstruction on, through
# launch.sh like a cluster run (configs/sd3_light_demo.toml). It ends with one validation, a
# sample grid of each class's prompt (DEMO_DIR/checkpoints/samples/iter_0000400.png: a latent
# preview, one row per class) and the share of samples that follow their prompt, against chance.
DEMO_DIR ?= runs/demo
demo: $(STAMP)
	CONFIG=configs/sd3_light_demo.toml bash launch.sh --pipeline-model-parallel-size 2 \
	    --save $(DEMO_DIR)/checkpoints --metrics-file $(DEMO_DIR)/metrics.jsonl

# CPU-sized on this machine; on a GPU, tools/gpu_check.sh runs the sd3_light throughput table.
bench: $(STAMP)
	$(PY) tools/bench_model.py
	$(PY) tools/bench_throughput.py
	$(PY) tools/bench_attention.py
	$(PY) tools/bench_data.py
	$(PY) tools/bench_memory.py
	$(PY) tools/bench_context_parallel.py
	$(PY) tools/bench_corpus.py

clean:
	rm -rf $(VENV) *.egg-info
