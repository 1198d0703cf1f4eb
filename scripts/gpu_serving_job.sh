#!/usr/bin/env bash
# The service measured through HTTP on a CUDA host (issue 12: the GPU path through HTTP),
# in one run that prints one table:
#
#   1. with an offline wheelhouse ($WHL/wheels, made by scripts/gpu_wheelhouse.sh on a
#      machine with a package index), installs it without an index into a --target folder
#      on PYTHONPATH (a PyTorch image whose python3 is itself a venv, such as
#      /opt/torch/.venv, would lose its torch in a `venv --system-site-packages`); without
#      one, uses $PY's own packages. Unpacks perf_analyzer and the two libraries it links
#      when $PA is there (LD_LIBRARY_PATH);
#   2. checks the environment (versions, every wheelhouse package's requirements, torch's
#      export APIs, ONNX Runtime's providers) and unpacks the CIFAR-10 slice if there is one;
#   3. runs the GPU tests of the suite (tests/service/test_gpu.py: CUDA graphs, the three
#      backends on CUDA against recorded outputs) and the response-format test;
#   4. builds models/seednet@1's exports once (what a first `python -m service` does; timed);
#   5. bench/gpu_serving.py: model-only ceiling, the HTTP matrix through /predict,
#      perf_analyzer over /v2 and gRPC, promote under load; ONE table, also in $OUT/table.md.
#
# On a CUDA host with the project installed (scripts/setup.sh dev: pytest, perf_analyzer):
#   PY=.venv/bin/python bash scripts/gpu_serving_job.sh
# On an offline CUDA host: the checkout with .whl/ and data/gpu-cifar10-slice.tar.gz beside
# it (scripts/gpu_wheelhouse.sh), then `bash scripts/gpu_serving_job.sh` with the image's python3.
# Rehearsal on a CPU (reduced matrix; see README "GPU serving job"):
#   DEVICE=cpu DURATION=2 OUT=/tmp/gpujob PY=.venv/bin/python WHL=runs/whl-cp311 \
#       PA=.whl/perf_analyzer.tar.xz scripts/gpu_serving_job.sh
#
# Variables: OUT (the folder results are written to; out/gpu-serving), DEVICE (cuda; cpu for
# a rehearsal), DURATION and WARMUP (seconds measured and warmed up per row; 5 and 1),
# MATRIX (full on cuda, else quick), BUDGET (the deadline, seconds from the start; 520),
# SERVER_CORES and CLIENT_CORES (taskset lists; by default a quarter of the cores for the
# load generators), WORKERS_MANY (4), SWAP_SECONDS and SWAP_EVERY (60 and 5: promote under
# load), PY (python3), WHL (.whl), PA ($WHL/perf_analyzer.tar.xz), SLICE
# (data/gpu-cifar10-slice.tar.gz), SEEDNET_CIFAR10 (the JPEG copy when there is no slice;
# ../shared/cifar10), WORK (scratch and server logs; runs/gpu-serving).
#
# Time (estimated for 16 cores + one H100/H200, not measured yet; full matrix, 5 s measured
# + 1 s warm-up per row): install + checks ~20 s, tests ~80 s (they train and export two
# tiny models on the CPU first), exports ~25 s, model-only ~45 s, TorchScript 1 worker
# ~55 s + perf_analyzer ~40 s, promote under load ~95 s, 4 workers ~70 s, eager ~55 s, ONNX
# (only if onnxruntime has the CUDA provider) ~55 s, TorchScript without graphs ~55 s:
# ~540-600 s in all. BUDGET (default 520 s) is a deadline: steps that would end after it are
# skipped, last first (a row says so), and the table is always printed; stopping the
# servers and packing the logs follow, so the job ends within about 10 minutes. The CPU
# rehearsal (quick matrix, 2 s per row, 2 busy cores) took 351 s. Results in $OUT:
# table.md, results.json, job.log, logs.tar.xz (the tests', measurements' and servers' logs).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-out/gpu-serving}
BUDGET=${BUDGET:-520}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
MATRIX=${MATRIX:-$([ "$DEVICE" = cuda ] && echo full || echo quick)}
PY=${PY:-python3}
WHL=${WHL:-.whl}
PA=${PA:-$WHL/perf_analyzer.tar.xz}
SLICE=${SLICE:-data/gpu-cifar10-slice.tar.gz}
SITE=${SITE:-/tmp/seednet-site}
WORK=${WORK:-runs/gpu-serving}
if [ "$DEVICE" = cuda ]; then
    SWAP_SECONDS=${SWAP_SECONDS:-60} SWAP_EVERY=${SWAP_EVERY:-5} WORKERS_MANY=${WORKERS_MANY:-4}
else
    SWAP_SECONDS=${SWAP_SECONDS:-10} SWAP_EVERY=${SWAP_EVERY:-2.5} WORKERS_MANY=${WORKERS_MANY:-2}
fi
# the load generators get a quarter of the cores (4 of 16), the server the rest
NCPU=$(nproc)
if [ "$NCPU" -ge 4 ]; then
    q=$((NCPU / 4)); CLIENT_CORES=${CLIENT_CORES:-0-$((q - 1))}; SERVER_CORES=${SERVER_CORES:-$q-$((NCPU - 1))}
else
    CLIENT_CORES=${CLIENT_CORES:-$((NCPU - 1))}; SERVER_CORES=${SERVER_CORES:-0-$((NCPU > 1 ? NCPU - 2 : 0))}
fi
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/job.log") 2>&1
step() { echo; echo "## $(( $(date +%s) - START )) s: $*"; }

step "machine"
CARD=cpu
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
fi
echo "$NCPU cores: server $SERVER_CORES, load generators $CLIENT_CORES; $(uname -r)"

step "install the offline wheelhouse into $SITE"
if [ -d "$WHL/wheels" ]; then
    rm -rf "$SITE" && mkdir -p "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHL"/wheels/*.whl || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=$SITE:$PWD
else
    echo "no $WHL/wheels: using $PY's own packages"
    export PYTHONPATH=$PWD
fi
if [ -f "$PA" ]; then
    mkdir -p "$SITE/pa" && tar -C "$SITE/pa" -xJf "$PA"
    export PATH=$SITE/pa/bin:$PATH PERF_ANALYZER_LIBS=$SITE/pa/lib
    LD_LIBRARY_PATH=$SITE/pa/lib perf_analyzer --version || echo "perf_analyzer cannot start here"
fi

step "environment check"
"$PY" - <<'PY' || { echo "environment check failed"; exit 1; }
import importlib, importlib.metadata as md, os, sys
from pathlib import Path
print("python", sys.version.split()[0], sys.executable)
site = Path(os.environ.get("PYTHONPATH", "").split(os.pathsep)[0])
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
problems = []
for dist in md.distributions(path=[str(site)]):  # every wheelhouse package's requirements
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{dist.metadata['Name']} needs {req}: missing")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{dist.metadata['Name']} needs {req}: have {have}")
print("wheelhouse requirements:", "; ".join(problems) or "all met")
for name in ["torch", "fastapi", "starlette", "uvicorn", "httptools", "uvloop", "pydantic",
             "pydantic_settings", "multipart", "grpc", "google.protobuf", "prometheus_client",
             "filelock", "fastapi_offline", "httpx", "onnx", "onnxscript", "onnxruntime",
             "PIL", "numpy", "safetensors"]:
    try:
        m = importlib.import_module(name)
        where = "wheelhouse" if str(site) in (m.__file__ or "") else "installed"
        print(f"  {name:18} {getattr(m, '__version__', '?'):14} {where}")
    except Exception as exc:
        problems.append(f"import {name}: {exc}")
        print(f"  {name:18} FAILED: {exc}")
import torch, inspect
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("  ", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
# what seednet/export.py and service/dataplane/backends.py use, on this torch
torch.export.Dim("batch", min=1, max=65536)
params = inspect.signature(torch.onnx.export).parameters
for p in ("dynamo", "dynamic_shapes", "external_data"):
    if p not in params:
        problems.append(f"torch.onnx.export has no {p}=")
assert callable(torch.jit.script) and callable(torch.jit.freeze) and hasattr(torch.cuda, "CUDAGraph")
import onnxruntime as ort
print("onnxruntime providers:", ort.get_available_providers())
import service.app  # the whole service imports (gRPC stubs' version checks included)
print("problems:", problems or "none")
sys.exit(1 if any("import" in p or "missing" in p for p in problems) else 0)
PY

step "data: the CIFAR-10 slice"
if [ -f "$SLICE" ]; then
    mkdir -p /tmp/seednet-data && tar -C /tmp/seednet-data -xzf "$SLICE"
    export SEEDNET_CIFAR10=/tmp/seednet-data/cifar10-slice
fi
export SEEDNET_CIFAR10=${SEEDNET_CIFAR10:-../shared/cifar10}
echo "SEEDNET_CIFAR10=$SEEDNET_CIFAR10: $(find "$SEEDNET_CIFAR10/test" -name '*.jpg' | wc -l) test JPEGs"

step "GPU tests of the suite"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs \
    tests/service/test_gpu.py tests/service/test_predict_response.py 2>&1 | tee "$WORK/pytest.log" | tail -15
TESTS="tests: $(grep -E '(passed|failed|error)' "$WORK/pytest.log" | tail -1 | tr -d '=' | xargs)"
echo "$TESTS"

step "models/seednet@1 exports (a first start builds them; timed)"
t=$(date +%s)
timeout 150 "$PY" -m service.registry_cli materialize seednet@1 2>&1 | grep -v -i "warn" | tail -4
EXPORTS="models/seednet@1 exports (TorchScript + ONNX, verified) built in $(( $(date +%s) - t )) s"
echo "$EXPORTS"

step "measurements (bench/gpu_serving.py), deadline $(( START + BUDGET - $(date +%s) )) s from now"
"$PY" bench/gpu_serving.py --device "$DEVICE" --out "$OUT" --work "$WORK" --matrix "$MATRIX" \
    --duration "$DURATION" --warmup "$WARMUP" --server-cores "$SERVER_CORES" \
    --client-cores "$CLIENT_CORES" --images "$SEEDNET_CIFAR10/test" --deadline $((START + BUDGET)) \
    --workers-many "$WORKERS_MANY" --swap-seconds "$SWAP_SECONDS" --swap-every "$SWAP_EVERY" \
    --header "$CARD, torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null), $NCPU cores, $(date -u +%F)" \
    --notes "GPU $TESTS; $EXPORTS" \
    > "$WORK/measure.log" 2>&1
rc=$?
grep -v '^|' "$WORK/measure.log" | tail -25
tar -C "$WORK" -cJf "$OUT/logs.tar.xz" --exclude swap-registry . 2>/dev/null
step "done in $(( $(date +%s) - START )) s (measurements exit $rc)"
cat "$OUT/table.md" 2>/dev/null || echo "no table written"
