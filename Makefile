# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench bench-store clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python pipelines/synthetic.py

# The browser tests drive Debian's Chromium through Playwright (never `playwright install`,
# which downloads a browser this network cannot reach).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

# Two pytest processes (pytest-xdist), a test module each at a time: most tests wait on
# processes, sockets and clusters, so two keep both cores busy. Each has its own shared cluster.
test: $(STAMP) chromium
	$(BIN)/ruff check cosim_dask tests scripts pipelines
	$(BIN)/python -m pytest -n 2 --dist loadscope

# Skips the slow end-to-end tests; CI runs everything through `make test`.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadscope -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check cosim_dask tests scripts pipelines

bench: $(STAMP)
	$(BIN)/python scripts/bench_kernel.py

# Pair-store codecs, chunk sizes and the streaming commands' peak RSS (~10 min).
bench-store: $(STAMP)
	$(BIN)/python scripts/bench_store.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
