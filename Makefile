# The two commands of the README: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; on a GPU host: make serve TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
TORCH ?= torch==2.13.0

.PHONY: serve test install install-test nginx chromium demo bench bench-throughput bench-engine bench-mixed bench-adapters bench-soak bench-structured bench-kv-cache bench-prompt-scoring clean

serve: install
	$(PY) -m server

test: install-test
	$(PY) -m pytest

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps lorax-client==0.6.3
	@command -v nginx >/dev/null 2>&1 || $(MAKE) --no-print-directory nginx
	@command -v chromedriver >/dev/null 2>&1 || $(MAKE) --no-print-directory chromium
	touch $@

# The load-balancer tests run the real nginx (Debian/Ubuntu package).
nginx:
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null; \
	else \
		echo "the tests need nginx: sudo apt-get install nginx" >&2; exit 1; \
	fi

# The playground's tests drive the real Chromium (Debian packages; no browser download) through Selenium.
chromium:
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; \
	else \
		echo "the tests need Chromium: sudo apt-get install chromium chromium-driver" >&2; exit 1; \
	fi

# Rebuild the embedded demo model and adapters (committed; only needed after changing server/demo/build.py).
demo: install
	$(PY) -m server.demo build

# Benchmarks (minutes each; they print tables and ratios measured side by side in one run).
# make bench BENCH_FLAGS=--quick: seconds each, to check that they run (what the suite does).
BENCH_FLAGS ?=
bench: bench-throughput bench-engine bench-mixed bench-adapters bench-soak bench-structured bench-kv-cache bench-prompt-scoring

bench-throughput: install-test
	$(PY) -m bench.throughput $(BENCH_FLAGS)

bench-engine: install-test
	$(PY) -m bench.engine_choice $(BENCH_FLAGS)

bench-mixed: install-test
	$(PY) -m bench.mixed_decode $(BENCH_FLAGS)

bench-adapters: install-test
	$(PY) -m bench.adapter_load $(BENCH_FLAGS)

bench-soak: install-test
	$(PY) -m bench.soak $(BENCH_FLAGS)

bench-structured: install-test
	$(PY) -m bench.structured $(BENCH_FLAGS)

bench-kv-cache: install-test
	$(PY) -m bench.kv_cache $(BENCH_FLAGS)

bench-prompt-scoring: install-test
	$(PY) -m bench.prompt_scoring $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) build *.egg-info
