#!/usr/bin/env bash
# Create .venv and install the project into it (idempotent; reruns only when
# pyproject.toml changed). Usage: scripts/setup.sh [dev]
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:-}
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=.venv/.installed-$extra
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    if [ "$extra" = dev ]; then
        .venv/bin/python -m pip install -q -e '.[dev]'
    else
        .venv/bin/python -m pip install -q -e .
    fi
    touch "$stamp"
fi
# perf_analyzer (shipped in the tritonclient wheel of the dev extra) links libcudart.so.12
# even on a CPU host. Keep that runtime outside site-packages, so torch never loads a
# second CUDA runtime; bench/oip_bench.py adds this folder to LD_LIBRARY_PATH.
if [ "$extra" = dev ] && [ -x .venv/bin/perf_analyzer ] && [ ! -d .venv/perf_analyzer-libs ]; then
    .venv/bin/python -m pip install -q --target .venv/perf_analyzer-libs nvidia-cuda-runtime-cu12 \
        || echo "warning: no libcudart.so.12 for perf_analyzer; its tests will be skipped" >&2
fi
# kubectl (its built-in kustomize renders deploy/k8s in the tests; no cluster is contacted):
# a pinned upstream binary, checked by sha256, in .venv/tools (scripts/install_kubectl.py).
if [ "$extra" = dev ] && [ ! -x .venv/tools/kubectl ]; then
    .venv/bin/python scripts/install_kubectl.py \
        || echo "warning: could not install kubectl; the deploy/k8s rendering tests will be skipped" >&2
fi
