# `make test` and `make demo` work on a fresh clone: they create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
# The loss alone at the declared floors (pyproject's jax and numpy), nothing else installed.
FLOOR_VENV := .venv-floor
FLOOR_STAMP := $(FLOOR_VENV)/.installed
FLOOR_TESTS := tests/test_pne.py tests/test_pne_layout.py tests/test_grouped_logsumexp.py \
	tests/test_pne_shard_map.py tests/test_readme_loss.py

.PHONY: test test-floor lint demo bench parity clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PY) -m pip install --quiet -r requirements-bench.txt
	touch $@

$(FLOOR_STAMP): requirements-floor.txt
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install --quiet -r requirements-floor.txt
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check pne_jax tests benchmarks data configs main.py
	$(VENV)/bin/ruff format --check pne_jax tests benchmarks data configs main.py

# The checkout is on the path (pyproject's pytest settings); pne-jax itself is not installed.
test-floor: $(FLOOR_STAMP)
	$(FLOOR_VENV)/bin/python -m pytest -q $(FLOOR_TESTS)

test: $(STAMP) lint test-floor
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) main.py --config=configs/demo.py --workdir=runs/demo

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.bench_loss $(BENCH_ARGS)

parity: $(BENCH_STAMP)
	$(PY) -m pytest -q -m parity

clean:
	rm -rf $(VENV) $(FLOOR_VENV) .ruff_cache
