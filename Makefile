# The two set-up commands of the README: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/demo
CONFIG ?= configs/tiny.toml
# Parallel test workers; distributed tests spawn their own processes on top.
TEST_WORKERS ?= 2

.PHONY: demo test test-unit install prepare train sample clean bench-env bench-peers

# torch first and pinned: on a CPU machine this is the CPU build from local disk, never
# the multi-GB CUDA build an unpinned resolve would pull.
$(VENV)/.installed: pyproject.toml requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

prepare: install
	$(PY) -m scaletrain prepare --config $(CONFIG)

train: install
	$(PY) -m scaletrain train --config $(CONFIG) --run.dir=$(RUN) --run.overwrite=true

sample: install
	$(PY) -m scaletrain generate $(RUN)

demo: prepare train sample

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --timeout=600 tests

# The fast lane: unit tests only (no CLI processes, no process groups), a few minutes.
test-unit: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --timeout=600 tests/unit

# The bench environment: the project plus the peer frameworks bench/peers.py compares
# with (Lightning, Accelerate), kept out of .venv. torch first and constrained, then a
# check that it is still the CPU build (a peer pulling a CUDA torch would be GBs).
BENCH_VENV ?= .venv-bench
BPY        := $(BENCH_VENV)/bin/python

$(BENCH_VENV)/.installed: pyproject.toml requirements.txt bench/requirements-peers.txt bench/constraints-torch.txt
	python3 -m venv $(BENCH_VENV)
	$(BPY) -m pip install -q torch==2.13.0
	$(BPY) -m pip show torch | grep '^Version:' > $(BENCH_VENV)/torch-first.txt
	$(BPY) -m pip install -q -c bench/constraints-torch.txt -r requirements.txt -r bench/requirements-peers.txt
	$(BPY) -m pip install -q --no-deps -e .
	$(BPY) -m pip show torch | grep '^Version:' | cmp -s - $(BENCH_VENV)/torch-first.txt || \
		{ echo "bench-env: a peer replaced torch ($$(cat $(BENCH_VENV)/torch-first.txt))"; exit 1; }
	touch $@

bench-env: $(BENCH_VENV)/.installed

# Timed: holds the machine-wide bench lock, one mode at a time (< 5 min each).
bench-peers: bench-env
	flock /tmp/scaletrain-bench.lock $(BPY) bench/peers.py --mode fp32
	flock /tmp/scaletrain-bench.lock $(BPY) bench/peers.py --mode best

clean:
	rm -rf $(VENV) $(BENCH_VENV) runs data .pytest_cache
