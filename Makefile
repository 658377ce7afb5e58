# `make test` and `make demo` work on a fresh clone: they create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: test lint demo bench parity clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PY) -m pip install --quiet -r requirements-bench.txt
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check pne_jax tests benchmarks data configs main.py
	$(VENV)/bin/ruff format --check pne_jax tests benchmarks data configs main.py

test: $(STAMP) lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) main.py --config=configs/demo.py --workdir=runs/demo

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.bench_loss $(BENCH_ARGS)

parity: $(BENCH_STAMP)
	$(PY) -m pytest -q -m parity

clean:
	rm -rf $(VENV) .ruff_cache
