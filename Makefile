# The two set-up commands of the README: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/demo
CONFIG ?= configs/tiny.toml
# Parallel test workers; distributed tests spawn their own processes on top.
TEST_WORKERS ?= 2

.PHONY: demo test install prepare train sample clean

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

clean:
	rm -rf $(VENV) runs data .pytest_cache
