# make demo | make test | make bench — each sets up .venv first (pip install . builds the C core).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := pyproject.toml setup.py $(shell find src -name '*.py' -o -name '*.c' -o -name '*.h')

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	rm -rf build/lib.*  # pip builds in ./build: a module moved or deleted must not ship from there
	$(PY) -m pip install -q --disable-pip-version-check ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/capbus demo

test: setup
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q

# The benchmarks (bench/, not in the wheel) run from here: make bench BENCH_ARGS="--quick --only caps".
# The peers (pyzmq, iceoryx2, faster-fifo) are optional: a missing one is skipped with a note.
bench: setup
	-$(PY) -m pip install -q --disable-pip-version-check ".[bench]"
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info
