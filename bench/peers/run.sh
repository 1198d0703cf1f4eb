#!/usr/bin/env bash
# SeedNet vs peers: the same model.ts served by TorchServe, LitServe, a naive FastAPI app and
# this service, one at a time on 127.0.0.1, each driven by the same closed-loop load generator.
#
#   bench/peers/run.sh [--duration S] [--warmup S] [--concurrency 1,8,64,256]
#                      [--stacks torchserve,litserve,fastapi,seednet]
#                      [--seednet-config NAME:KEY=VALUE[,KEY=VALUE...]]...   (extra rows of ours)
#                      [--count 256] [--model seednet@1] [--ready-timeout 300]
#                      [--ts-queue 1000]   (TorchServe job_queue_size; its default is 100)
#
# Example: bench/peers/run.sh --duration 3 --warmup 1 --concurrency 1,8 \
#              --seednet-config onnx:SEEDNET_BACKEND=onnx
#
# Environment: PROJECT_PY = the project's Python (default: REPO/.venv/bin/python, else
# python3); SEEDNET_* variables pass through to our rows.
# Creates bench/peers/.venv on first use (requirements.txt). Results and logs go to
# bench/peers/results/<UTC time>/. See README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
cd "$REPO"

DURATION=20
WARMUP=5
CONCURRENCY=1,8,64,256
STACKS=torchserve,litserve,fastapi,seednet
SEEDNET_CONFIGS=()
COUNT=256
MODEL=seednet@1
READY_TIMEOUT=300
TS_QUEUE=1000
IMAGES=../shared/cifar10/test

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$HERE/run.sh"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --concurrency) CONCURRENCY=$2; shift 2 ;;
        --stacks) STACKS=$2; shift 2 ;;
        --seednet-config) SEEDNET_CONFIGS+=("$2"); shift 2 ;;
        --count) COUNT=$2; shift 2 ;;
        --model) MODEL=$2; shift 2 ;;
        --ready-timeout) READY_TIMEOUT=$2; shift 2 ;;
        --images) IMAGES=$2; shift 2 ;;
        --ts-queue) TS_QUEUE=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
MODEL_NAME=${MODEL%@*}
MODEL_VERSION=${MODEL#*@}
MV="$REPO/models/$MODEL_NAME/$MODEL_VERSION"

if [ -z "${PROJECT_PY:-}" ]; then
    PROJECT_PY=python3
    [ -x "$REPO/.venv/bin/python" ] && PROJECT_PY=$REPO/.venv/bin/python
fi
PEERS_VENV="$HERE/.venv"
PEERS_PY="$PEERS_VENV/bin/python"
WORK="$HERE/work"
RUN_DIR="$HERE/results/$(date -u +%Y%m%dT%H%M%SZ)"
LOGS="$RUN_DIR/logs"
mkdir -p "$WORK" "$LOGS"
log() { echo "[peers] $*" >&2; }

# ---------------------------------------------------------------- servers and cleanup
SERVER_PID=""
MY_PGID=$(ps -o pgid= -p $$ | tr -d ' ')

LOADGEN_PID=""

# members_of PID: PID and its descendants, space-separated.
members_of() {
    local m
    m=$("$PEERS_PY" "$HERE/rss.py" tree "$1" 2>/dev/null | xargs echo || true)
    echo "${m:-$1}"
}

# wait_gone SECONDS PID...: true once none of the PIDs is alive.
wait_gone() {
    local ticks=$(($1 * 10)) p alive; shift
    for _ in $(seq 1 "$ticks"); do
        alive=0
        for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && return 0
        sleep 0.1
    done
    return 1
}

# Stop the server started last: SIGINT to its root (what Ctrl-C does), then SIGTERM to its
# whole process tree and process group, then SIGKILL.
stop_server() {
    local pid=$SERVER_PID members pgids g
    [ -n "$pid" ] || return 0
    SERVER_PID=""
    members=$(members_of "$pid")
    pgids=$(ps -o pgid= -p "${members// /,}" 2>/dev/null | tr -d ' ' | sort -u || true)
    log "stopping server tree $pid ($members)"
    kill -INT "$pid" 2>/dev/null || true
    # shellcheck disable=SC2086
    if ! wait_gone 5 $members; then
        members=$(echo "$members $(members_of "$pid")" | tr ' ' '\n' | sort -u | tr '\n' ' ')
        for g in $pgids; do [ "$g" != "$MY_PGID" ] && kill -TERM -- "-$g" 2>/dev/null || true; done
        # shellcheck disable=SC2086
        kill -TERM $members 2>/dev/null || true
        # shellcheck disable=SC2086
        if ! wait_gone 10 $members; then
            log "server tree still alive after SIGTERM; SIGKILL"
            for g in $pgids; do [ "$g" != "$MY_PGID" ] && kill -KILL -- "-$g" 2>/dev/null || true; done
            # shellcheck disable=SC2086
            kill -KILL $members 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    if [ -n "$LOADGEN_PID" ]; then
        kill -TERM "$LOADGEN_PID" 2>/dev/null || true
        wait "$LOADGEN_PID" 2>/dev/null || true
        LOADGEN_PID=""
    fi
    stop_server
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

free_port() {
    "$PEERS_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_server NAME LOGFILE ENV... -- CMD...: new session, so the whole tree can be stopped.
start_server() {
    local logfile=$1; shift
    setsid -w env "$@" >"$logfile" 2>&1 </dev/null &
    SERVER_PID=$!
}

# ---------------------------------------------------------------- setup
setup_peers_venv() {
    if [ -x "$PEERS_PY" ] && "$PEERS_PY" -c 'import torch, ts, litserve, aiohttp, fastapi' 2>/dev/null; then
        return 0
    fi
    local free_gb
    free_gb=$(df --output=avail -BG "$HERE" | tail -1 | tr -dc '0-9')
    if [ "${free_gb:-0}" -lt 8 ]; then
        log "only ${free_gb} GB free under $HERE; the peers venv needs about 6 GB"
        exit 1
    fi
    log "creating $PEERS_VENV (torch + TorchServe + LitServe: about 6 GB, a few minutes)"
    local t0=$SECONDS
    python3 -m venv "$PEERS_VENV"
    "$PEERS_PY" -m pip install --quiet -r "$HERE/requirements.txt"
    log "installed in $((SECONDS - t0)) s, $(du -sh "$PEERS_VENV" | cut -f1)"
}

model_ts_ok() {
    [ -f "$MV/model.ts" ] && [ -f "$MV/exports.json" ] || return 1
    "$PEERS_PY" - "$MV" <<'EOF'
import hashlib, json, sys
from pathlib import Path
mv = Path(sys.argv[1])
want = json.loads((mv / "exports.json").read_text())["files"]["model.ts"]["sha256"]
h = hashlib.sha256()
with open(mv / "model.ts", "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
sys.exit(0 if h.hexdigest() == want else 1)
EOF
}

export_model() {
    [ -f "$MV/manifest.json" ] || { log "no $MV/manifest.json"; exit 1; }  # (weights may be its parent's)
    if model_ts_ok; then
        log "using $MV/model.ts (sha256 matches exports.json)"
        return 0
    fi
    log "exporting $MODEL_NAME@$MODEL_VERSION to TorchScript with the project's code ($PROJECT_PY)"
    # The registry CLI is moving; try the new module first, the stable alias second.
    local mod
    for mod in registry.cli service.registry_cli; do
        if "$PROJECT_PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$mod') else 1)" 2>/dev/null \
            && "$PROJECT_PY" -m "$mod" --root models materialize "$MODEL_NAME@$MODEL_VERSION" >"$LOGS/export.log" 2>&1; then
            log "materialized with python -m $mod"
            model_ts_ok && return 0
        fi
    done
    log "export failed, see $LOGS/export.log"
    exit 1
}

# ---------------------------------------------------------------- stacks
# Each sets SERVER_PID, URL and DESC, or returns non-zero when the stack cannot run here.
stack_torchserve() {
    if ! command -v java >/dev/null; then
        log "skipping TorchServe: java not found (apt-get install openjdk-17-jre-headless)"
        return 1
    fi
    local dir="$WORK/torchserve" p1 p2 p3
    rm -rf "$dir"
    mkdir -p "$dir/model-store" "$dir/tmp" "$LOGS/torchserve"
    "$PEERS_VENV/bin/torch-model-archiver" --model-name seednet --version 1.0 \
        --serialized-file "$MV/model.ts" --handler "$HERE/stacks/ts_handler.py" \
        --extra-files "$HERE/stacks/peer_common.py,$MV/manifest.json" \
        --export-path "$dir/model-store" --force || return 1
    p1=$(free_port); p2=$(free_port); p3=$(free_port)
    cat >"$dir/config.properties" <<EOF
inference_address=http://127.0.0.1:$p1
management_address=http://127.0.0.1:$p2
metrics_address=http://127.0.0.1:$p3
model_store=$dir/model-store
load_models=seednet.mar
models={"seednet": {"1.0": {"defaultVersion": true, "marName": "seednet.mar", "minWorkers": 2, "maxWorkers": 2, "batchSize": 16, "maxBatchDelay": 5, "responseTimeout": 120}}}
default_workers_per_model=2
number_of_gpu=0
disable_token_authorization=true
enable_metrics_api=false
disable_system_metrics=true
install_py_dep_per_model=false
async_logging=true
job_queue_size=$TS_QUEUE
EOF
    start_server "$LOGS/torchserve.out" \
        PATH="$PEERS_VENV/bin:$PATH" OMP_NUM_THREADS=1 \
        LOG_LOCATION="$LOGS/torchserve" METRICS_LOCATION="$LOGS/torchserve" \
        TEMP="$dir/tmp" TMPDIR="$dir/tmp" \
        "$PEERS_VENV/bin/torchserve" --start --foreground --ncs --disable-token-auth \
        --ts-config "$dir/config.properties" --model-store "$dir/model-store" \
        --log-config "$HERE/stacks/ts_log4j2.xml"
    URL="http://127.0.0.1:$p1/predictions/seednet"
    DESC="TorchServe $("$PEERS_PY" -c 'import ts.version as v; print(v.__version__)'), custom handler, batch 16 / 5 ms, 2 workers x 1 thread (OMP_NUM_THREADS=1), job queue $TS_QUEUE, token auth off"
}

stack_litserve() {
    local port; port=$(free_port)
    start_server "$LOGS/litserve.out" OMP_NUM_THREADS=1 \
        "$PEERS_PY" "$HERE/stacks/litserve_app.py" --model "$MV/model.ts" \
        --manifest "$MV/manifest.json" --port "$port" --batch 16 --batch-timeout-ms 5 --workers 2
    URL="http://127.0.0.1:$port/predict"
    DESC="LitServe $("$PEERS_PY" -c 'import litserve; print(litserve.__version__)'), batch 16 / 5 ms, 2 inference workers x 1 thread, default API servers (one per worker)"
}

stack_fastapi() {
    local port; port=$(free_port)
    start_server "$LOGS/fastapi.out" \
        "$PEERS_PY" "$HERE/stacks/fastapi_app.py" --model "$MV/model.ts" \
        --manifest "$MV/manifest.json" --port "$port"
    URL="http://127.0.0.1:$port/predict"
    DESC="FastAPI $("$PEERS_PY" -c 'import fastapi; print(fastapi.__version__)') + uvicorn, 1 process, sync endpoint, one model call per request, torch default threads"
}

# stack_seednet NAME [KEY=VALUE...]
stack_seednet() {
    local name=$1; shift
    local port; port=$(free_port)
    start_server "$LOGS/$name.out" \
        SEEDNET_REGISTRY_ROOT=models SEEDNET_MODEL_NAME="$MODEL_NAME" \
        SEEDNET_MODEL_REF="$MODEL_VERSION" SEEDNET_HOST=127.0.0.1 SEEDNET_PORT="$port" \
        SEEDNET_LOG_LEVEL=warning "$@" "$PROJECT_PY" -m service
    URL="http://127.0.0.1:$port/predict"
    DESC="this service ($PROJECT_PY -m service), defaults${*:+ plus $*}"
}

# ---------------------------------------------------------------- main
setup_peers_venv
export_model
MODEL_SHA=$(sha256sum "$MV/model.ts" | cut -c1-12)

LOADGEN=("$PEERS_PY" "$HERE/loadgen.py")
NCPU=$(nproc)
if command -v taskset >/dev/null && [ "$NCPU" -gt 1 ]; then
    LOADGEN=(taskset -c "$((NCPU - 1))" "${LOADGEN[@]}")
    LOADGEN_NOTE="load generator pinned to CPU $((NCPU - 1)) (taskset); servers unpinned"
else
    LOADGEN_NOTE="load generator not pinned"
fi

# rows: "label|function|args" (args space-separated KEY=VALUE)
ROWS=()
IFS=, read -r -a WANTED <<<"$STACKS"
for s in "${WANTED[@]}"; do
    case "$s" in
        torchserve|litserve|fastapi) ROWS+=("$s|stack_$s|") ;;
        seednet)
            ROWS+=("seednet|stack_seednet|")
            for cfg in "${SEEDNET_CONFIGS[@]}"; do
                ROWS+=("seednet[${cfg%%:*}]|stack_seednet|${cfg#*:}")
            done ;;
        *) echo "unknown stack: $s" >&2; exit 2 ;;
    esac
done

: >"$RUN_DIR/stacks.tsv"
FAILED=()
log "results: $RUN_DIR"
for row in "${ROWS[@]}"; do
    IFS='|' read -r label fn args <<<"$row"
    log "=== $label"
    URL="" DESC=""
    # shellcheck disable=SC2086
    if [ "$fn" = stack_seednet ]; then
        stack_seednet "$label" ${args//,/ } || { FAILED+=("$label (could not start)"); continue; }
    else
        "$fn" || { FAILED+=("$label (skipped)"); continue; }
    fi
    printf '%s\t%s\n' "$label" "$DESC" >>"$RUN_DIR/stacks.tsv"
    # In the background, so that a Ctrl-C or SIGTERM reaches the trap at once.
    "${LOADGEN[@]}" --stack "$label" --url "$URL" --server-pid "$SERVER_PID" \
        --concurrency "$CONCURRENCY" --duration "$DURATION" --warmup "$WARMUP" \
        --count "$COUNT" --images "$IMAGES" --ready-timeout "$READY_TIMEOUT" \
        --out "$RUN_DIR/results.jsonl" &
    LOADGEN_PID=$!
    wait "$LOADGEN_PID" || FAILED+=("$label (see $LOGS)")
    LOADGEN_PID=""
    stop_server
done

NOTES=(
    --note "model: $MODEL_NAME@$MODEL_VERSION, model.ts sha256 $MODEL_SHA..., the same file for every stack"
    --note "closed loop, levels $CONCURRENCY, ${WARMUP} s warm-up + ${DURATION} s measured per level, $COUNT CIFAR-10 test JPEGs cycled"
    --note "$LOADGEN_NOTE"
)
[ ${#FAILED[@]} -eq 0 ] || NOTES+=(--note "failed or skipped: ${FAILED[*]}")
"$PEERS_PY" "$HERE/report.py" "$RUN_DIR" "${NOTES[@]}"
[ ${#FAILED[@]} -eq 0 ]
