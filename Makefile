# The README's two commands are `make demo` and `make test`; .ci/run calls `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
SAMPLE ?= sample

.PHONY: install demo test test-fast bench clean

# heudiconv: only its test data is read (two MR sources of `mediqa synth --train-extra-mr`); the
# package is never imported, so it is installed without its dependencies (nipype and more).
$(BIN)/mediqa: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps 'heudiconv>=1.3'
	touch $(BIN)/mediqa

install: $(BIN)/mediqa

## Main job on the bundled default: sample corpus -> score -> CSV + HTML report, worst first.
demo: install
	bash scripts/demo.sh $(SAMPLE)

## The whole test suite (what CI runs). Headless Chromium (Debian package) renders the HTML
## report in one test; it is installed when apt-get is usable, else that test is skipped visibly.
test: install
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	  && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) ; } \
	  || echo "chromium not available: the HTML render test will be skipped"
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/bench_io.py
	$(BIN)/python benchmarks/bench_engines.py
	$(BIN)/python benchmarks/bench_score.py

clean:
	rm -rf $(VENV) $(SAMPLE) .pytest_cache
