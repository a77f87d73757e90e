# The two commands of the README: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; on a GPU host: make serve TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
TORCH ?= torch==2.13.0

.PHONY: serve test install install-test haproxy chromium demo bench bench-throughput bench-engine bench-mixed bench-adapters bench-soak bench-structured bench-kv-cache gpu-wheels gpu-venv gpu-check bench-prompt-scoring bench-dora bench-modules clean

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
	@command -v haproxy >/dev/null 2>&1 || $(MAKE) --no-print-directory haproxy
	@command -v chromedriver >/dev/null 2>&1 || $(MAKE) --no-print-directory chromium
	touch $@

# The load-balancer tests run the real HAProxy (Debian/Ubuntu package, 2.6 or later).
haproxy:
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null; \
	else \
		echo "the tests need HAProxy: sudo apt-get install haproxy" >&2; exit 1; \
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
bench: bench-throughput bench-engine bench-mixed bench-adapters bench-soak bench-structured bench-kv-cache bench-prompt-scoring bench-dora bench-modules

bench-throughput: install-test
	$(PY) -m bench.throughput $(BENCH_FLAGS)

bench-engine: install-test
	$(PY) -m bench.engine_choice $(BENCH_FLAGS)

bench-mixed: install-test
	$(PY) -m bench.mixed_decode $(BENCH_FLAGS)

bench-modules: install-test
	$(PY) -m bench.module_adapters $(BENCH_FLAGS)

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

bench-dora: install-test
	$(PY) -m bench.dora $(BENCH_FLAGS)

# The GPU check (README, "GPU"). Here, with network: make gpu-wheels. There, on a GPU machine with torch installed and
# no network, with .wheels copied beside the tree: make gpu-check. It never installs torch: its venv sees the machine's.
# GPU_PYTHON=3.12 make gpu-wheels: wheels for that Python when the GPU machine's is not this one's.
WHEELS ?= .wheels
GPU_VENV ?= .venv-gpu
GPU_PYTHON ?=
GPU_CHECK_FLAGS ?=

gpu-wheels: install-test
	mkdir -p $(WHEELS)
	$(PY) -m bench.gpu_check --requirements > $(WHEELS)/requirements.txt
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --dest $(WHEELS) -r $(WHEELS)/requirements.txt \
		$(if $(GPU_PYTHON),--python-version $(GPU_PYTHON) --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)

gpu-venv:
	$(PYTHON) -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
	$(PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet --no-index --no-deps --find-links $(WHEELS) -r $(WHEELS)/requirements.txt

gpu-check:
	@[ -x $(GPU_VENV)/bin/python ] || $(MAKE) --no-print-directory gpu-venv
	$(GPU_VENV)/bin/python -m bench.gpu_check $(GPU_CHECK_FLAGS)

clean:
	rm -rf $(VENV) $(GPU_VENV) build *.egg-info
