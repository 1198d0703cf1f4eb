# SeedNet inference service image.
#
#   docker build -t seednet:latest .                          # GPU image (CUDA 13.0 base)
#   docker build --build-arg BASE_IMAGE=python:3.11-slim -t seednet:latest .   # CPU host
#   docker build --build-arg BASE_IMAGE=local/debian:bookworm -t seednet:latest .
#       (offline host: base image made by scripts/make-base-image.sh)
#
# Written for the classic builder as well as BuildKit: no RUN --mount, no heredocs.
# See docs/docker.md.

# torch==2.14.1 from PyPI is a CUDA 13.0 build (torch.version.cuda == "13.0"; it pulls
# nvidia-cuda-runtime 13.0.x, cublas 13.1, cudnn-cu13 9.x) and onnxruntime-gpu 1.31 links
# libcublas.so.13 / libcudart.so.13: the base is the matching CUDA 13.0 runtime. The CUDA
# libraries themselves come from the pip wheels; the base provides the driver integration.
# Any Debian/Ubuntu image with Python >= 3.11 (onnxruntime-gpu needs 3.11) works too.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

# ---------------------------------------------------------------- base: a Python 3 + venv
FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180
# Install python3 + venv with apt only when the base lacks them (nvidia/cuda and plain
# Debian/Ubuntu do; python:*-slim and local/debian:bookworm already have them).
RUN if python3 -c "import venv, ensurepip" >/dev/null 2>&1; then \
        echo "python3 with venv already present: $(python3 --version)"; \
    else \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c "import sys; assert sys.version_info >= (3, 11), sys.version"

# ---------------------------------------------------------------- deps: third-party packages
# Only pyproject.toml enters this stage, so the multi-GB dependency layer is rebuilt only
# when pyproject.toml changes, never for a code, model or README change.
FROM base AS deps
# Optional extra index, e.g. https://download.pytorch.org/whl/cpu for a CPU-only torch
# (2.14.1+cpu satisfies torch==2.14.1 and is ~4 GB smaller). Empty = PyPI only.
ARG TORCH_INDEX_URL=""
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv
WORKDIR /src
COPY pyproject.toml ./
# Stub packages (and an empty stand-in for the README.md pyproject names): `pip install .`
# resolves and installs exactly pyproject's dependencies (no second requirements list);
# the stub itself is uninstalled again.
RUN mkdir -p seednet registry training service \
    && touch seednet/__init__.py registry/__init__.py training/__init__.py service/__init__.py README.md \
    && pip install "setuptools>=68" wheel \
    && pip install --no-build-isolation ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} . \
    && pip uninstall -y seednet \
    && rm -rf /src/* /src/.[!.]* \
    && python -c "import torch, onnxruntime, fastapi; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| onnxruntime', onnxruntime.__version__)"

# ---------------------------------------------------------------- build: the project wheel
FROM deps AS build
# README.m[d]: copied when present (pyproject's `readme`), no error when absent.
COPY pyproject.toml README.m[d] ./
COPY seednet/ seednet/
COPY registry/ registry/
COPY training/ training/
COPY service/ service/
RUN { [ -f README.md ] || : > README.md; } \
    && pip wheel --no-deps --no-build-isolation --wheel-dir /dist .

# ---------------------------------------------------------------- runtime
FROM deps AS runtime
ARG SEEDNET_UID=10001
ARG SEEDNET_GID=10001
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && groupadd --gid "${SEEDNET_GID}" seednet \
    && useradd --uid "${SEEDNET_UID}" --gid seednet --home-dir /app \
               --no-create-home --shell /usr/sbin/nologin seednet \
    && mkdir -p /app/models \
    && chown -R seednet:seednet /app

WORKDIR /app
ENV HOME=/app \
    MPLCONFIGDIR=/tmp/matplotlib \
    SEEDNET_REGISTRY_ROOT=/app/models \
    SEEDNET_HOST=0.0.0.0 \
    SEEDNET_PORT=8000 \
    SEEDNET_GRPC_PORT=8001

# The registry (manifests + weights; derived exports are excluded by .dockerignore).
# "pyproject.toml model[s]": the glob makes a missing models/ folder (a fresh clone with no
# published model) not an error; pyproject.toml is only there so the source list is never
# empty, and is removed again below.
COPY --chown=seednet:seednet pyproject.toml model[s] /app/models/
USER seednet
# Materialise and verify the derived exports (TorchScript, ONNX) of every version at build
# time, so a container starts without exporting anything. An empty registry is fine (both
# commands print "no models in ..." and succeed); the service then needs a model in the
# mounted volume (it exits at start-up when SEEDNET_MODEL_REF does not resolve).
RUN rm -f /app/models/pyproject.toml \
    && python -m service.registry_cli --root /app/models materialize \
    && python -m service.registry_cli --root /app/models verify

# 8000: HTTP (/predict, /v2 inference protocol...); 8001: gRPC (KServe v2 / Triton clients).
EXPOSE 8000 8001
# Ready = model loaded. urllib only: no curl in the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD python -c "import os, sys, urllib.request; port = os.environ.get('SEEDNET_PORT', '8000'); r = urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % port, timeout=4); sys.exit(0 if r.status == 200 else 1)"

CMD ["python", "-m", "service"]
