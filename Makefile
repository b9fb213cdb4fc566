# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test test-all demo bench clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The default suite (about 11 min on 2 cores: two pytest workers, a test file each, as the
# multi-process tests spend much of their time starting processes); test-all adds the slow cases.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=30 tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

# The main job on the built-in default: tiny preset, synthetic data, PP=2 over 2 local CPU ranks
# (all GPUs when there are some), text reconstruction on, through launch.sh like a cluster run;
# one validation at the end (16 held-out samples, 4 timesteps, EMA too) and one sample grid
# (runs/demo/checkpoints/samples/iter_0000040.png, a latent preview).
demo: $(STAMP)
	CONFIG=configs/sd3_light_tiny.toml bash launch.sh --pipeline-model-parallel-size 2 \
	    --save runs/demo/checkpoints --metrics-file runs/demo/metrics.jsonl \
	    --valid-samples 16 --eval-interval 40 --eval-timesteps 4 --sample-interval 40 --sample-steps 8

# CPU-sized on this machine; on a GPU, tools/gpu_check.sh runs the sd3_light throughput table.
bench: $(STAMP)
	$(PY) tools/bench_model.py
	$(PY) tools/bench_throughput.py
	$(PY) tools/bench_attention.py
	$(PY) tools/bench_data.py
	$(PY) tools/bench_memory.py

clean:
	rm -rf $(VENV) *.egg-info
