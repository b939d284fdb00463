# The README's two commands are `make demo` and `make test`; .ci/run calls `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
SAMPLE ?= sample

.PHONY: install demo test test-fast bench clean

$(BIN)/mediqa: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/mediqa

install: $(BIN)/mediqa

## Main job on the bundled default: sample corpus -> score -> CSV + HTML report, worst first.
demo: install
	bash scripts/demo.sh $(SAMPLE)

## The whole test suite (what CI runs).
test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/bench_io.py

clean:
	rm -rf $(VENV) $(SAMPLE) .pytest_cache
