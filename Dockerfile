# mixserve image. GPU (default): a CUDA runtime base with a CUDA build of torch.
#   docker build -t mixserve .
# CPU:
#   docker build --build-arg VARIANT=cpu -t mixserve:cpu .
# Models and adapters come from volumes: /models (MIXSERVE_MODEL=/models/<name>) and /adapters (the store).
ARG VARIANT=cuda
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu22.04
ARG CPU_BASE=ubuntu:22.04

FROM ${CUDA_BASE} AS base-cuda
FROM ${CPU_BASE} AS base-cpu

FROM base-${VARIANT} AS base
# a C/C++ compiler and Python's headers: torch.compile (Inductor, and Triton on the GPU) compiles what it generates
# at run time, in the serving image
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

FROM base AS build
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_CUDA=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
RUN python3.11 -m venv /opt/venv
RUN if [ "$VARIANT" = "cuda" ]; then index="$TORCH_INDEX_CUDA"; else index="$TORCH_INDEX_CPU"; fi \
    && /opt/venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "$index"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
# the quantized-base backends (MIXSERVE_QUANTIZATION) too: a container serves what the settings offer
RUN /opt/venv/bin/pip install --no-cache-dir ".[quant]"

FROM base AS runtime
COPY --from=build /opt/venv /opt/venv
COPY adapters_store /adapters
RUN useradd --create-home --uid 10001 mixserve && mkdir -p /models
USER mixserve
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    MIXSERVE_HOST=0.0.0.0 \
    MIXSERVE_PORT=8000 \
    MIXSERVE_MODEL=demo \
    MIXSERVE_ADAPTERS_DIR=/adapters \
    MIXSERVE_DRAIN_SECONDS=30
VOLUME ["/models", "/adapters"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "server"]
