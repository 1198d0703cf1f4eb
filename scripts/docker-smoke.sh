#!/usr/bin/env bash
# End-to-end smoke test of the SeedNet container (CPU variant of docker-compose.yml).
#
#   scripts/docker-smoke.sh
#
# 1. starts a Docker daemon if none answers (and stops it at the end only if it started it)
# 2. picks a base image (BASE_IMAGE, else local/debian:bookworm if present, else
#    python:3.11-slim if it can be pulled, else builds local/debian:bookworm with
#    scripts/make-base-image.sh) and builds the image through compose
# 3. copies ./models (or $SMOKE_MODELS) to a scratch folder (owned by the container's uid), materialises and
#    verifies the exports there with the image, mounts it, starts the `seednet-cpu` service
# 4. waits for /health/ready and the container's HEALTHCHECK
# 5. POSTs a real CIFAR-10 image and checks the JSON; POSTs a text file named .jpg and
#    checks the 4xx JSON error
# 6. tears everything down (compose down -v) on exit, whatever happened, and checks that no
#    container or network of the test project is left
# Prints a PASS/FAIL summary; exits 1 if any check failed.
#
# Environment: BASE_IMAGE, SEEDNET_IMAGE (default seednet:latest), SMOKE_PORT (18000),
# SMOKE_IMAGE (test picture), SMOKE_MODELS (registry to serve, default ./models; copied,
# never written), SMOKE_READY_TIMEOUT (seconds, 300), SMOKE_PROJECT.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

PROJECT="${SMOKE_PROJECT:-seednet-smoke}"
PORT="${SMOKE_PORT:-18000}"
IMG="${SMOKE_IMAGE:-$REPO/../shared/cifar10/test/cat/0000.jpg}"
MODELS_SRC="${SMOKE_MODELS:-$REPO/models}"
READY_TIMEOUT="${SMOKE_READY_TIMEOUT:-300}"
export SEEDNET_IMAGE="${SEEDNET_IMAGE:-seednet:latest}"
SERVICE=seednet-cpu
CLASSES="airplane automobile bird cat deer dog frog horse ship truck"

WORK="$(mktemp -d /tmp/seednet-smoke.XXXXXX)"
STARTED_DOCKERD=""
COMPOSE_UP=""
RESULTS=()
FAILED=0

log() { printf '[smoke] %s\n' "$*" >&2; }
pass() { RESULTS+=("PASS  $*"); log "PASS $*"; }
fail() { RESULTS+=("FAIL  $*"); log "FAIL $*"; FAILED=1; }
# fatal: record, then exit (the EXIT trap tears down and prints the summary)
fatal() { fail "$*"; exit 1; }

if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    echo "neither 'docker compose' nor 'docker-compose' is installed" >&2; exit 1
fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$REPO/docker-compose.yml" --profile cpu "$@"; }

container_id() { compose ps -q "$SERVICE" 2>/dev/null | head -n1; }

cleanup() {
    local rc=$? leftovers
    trap - EXIT INT TERM
    if [ -n "$COMPOSE_UP" ]; then
        log "tearing down (compose down -v)"
        if [ "$FAILED" = 1 ]; then
            log "service logs (tail):"
            compose logs --no-color --tail 60 "$SERVICE" >&2 2>/dev/null || true
        fi
        compose down -v --remove-orphans >/dev/null 2>&1 || true
        leftovers="$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")"
        leftovers+="$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")"
        leftovers+="$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")"
        if [ -z "$leftovers" ]; then
            pass "teardown: no container, network or volume of project $PROJECT left"
        else
            fail "teardown: left behind: $(echo "$leftovers" | tr '\n' ' ')"
        fi
    fi
    rm -rf "$WORK"
    if [ -n "$STARTED_DOCKERD" ]; then
        log "stopping the dockerd this script started (pid $STARTED_DOCKERD)"
        kill -TERM "$STARTED_DOCKERD" 2>/dev/null || true
        for _ in $(seq 1 60); do
            kill -0 "$STARTED_DOCKERD" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$STARTED_DOCKERD" 2>/dev/null; then
            fail "dockerd (pid $STARTED_DOCKERD) did not stop"
        else
            pass "dockerd started by this script is stopped"
        fi
    fi
    echo
    echo "== docker smoke test summary =="
    printf '%s\n' "${RESULTS[@]}"
    if [ "$FAILED" = 0 ] && [ "$rc" = 0 ]; then
        echo "RESULT: PASS"
        exit 0
    fi
    echo "RESULT: FAIL"
    exit 1
}
trap cleanup EXIT
trap 'fail "interrupted"; exit 1' INT TERM

# ------------------------------------------------------------------ 1. Docker daemon
if docker info >/dev/null 2>&1; then
    pass "docker daemon already running (left running)"
else
    [ "$(id -u)" = 0 ] || fatal "no Docker daemon answers and not root: cannot start one"
    command -v dockerd >/dev/null || fatal "no Docker daemon answers and dockerd is not installed"
    log "starting dockerd (log: $WORK/dockerd.log)"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$STARTED_DOCKERD" 2>/dev/null || break
        sleep 1
    done
    if docker info >/dev/null 2>&1; then
        pass "dockerd started by this script (pid $STARTED_DOCKERD)"
    else
        tail -n 20 "$WORK/dockerd.log" >&2
        fatal "dockerd did not come up"
    fi
fi

# ------------------------------------------------------------------ 2. base image + build
[ -f "$IMG" ] || fatal "test image not found: $IMG"
if [ -z "${BASE_IMAGE:-}" ]; then
    if docker image inspect local/debian:bookworm >/dev/null 2>&1; then
        BASE_IMAGE=local/debian:bookworm
    elif timeout 120 docker pull -q python:3.11-slim >/dev/null 2>&1; then
        BASE_IMAGE=python:3.11-slim
    else
        log "no registry reachable: building local/debian:bookworm with debootstrap"
        "$REPO/scripts/make-base-image.sh" || fatal "scripts/make-base-image.sh failed"
        BASE_IMAGE=local/debian:bookworm
    fi
fi
export BASE_IMAGE
pass "base image: $BASE_IMAGE"

log "building $SEEDNET_IMAGE (compose build $SERVICE)"
t0=$(date +%s)
if compose build "$SERVICE" >"$WORK/build.log" 2>&1; then
    size=$(docker image inspect -f '{{.Size}}' "$SEEDNET_IMAGE")
    pass "build $SEEDNET_IMAGE in $(( $(date +%s) - t0 )) s, $(( size / 1000000 )) MB"
else
    tail -n 40 "$WORK/build.log" >&2
    fatal "image build failed (see the tail above)"
fi

# ------------------------------------------------------------------ 3. registry volume
# A scratch copy of ./models, so the test never writes into the repository and the
# container's non-root user (uid 10001) can write exports and lock files.
mkdir -p "$WORK/models"
if [ -d "$MODELS_SRC" ]; then
    cp -a "$MODELS_SRC/." "$WORK/models/"
fi
find "$WORK/models" -name manifest.json | grep -q . \
    || fatal "no model in $MODELS_SRC (<name>/<version>/manifest.json): publish one first"
export SEEDNET_MODELS_DIR="$WORK/models"
if [ "$(id -u)" = 0 ]; then
    chown -R 10001:10001 "$WORK/models"
    export SEEDNET_UID=10001 SEEDNET_GID=10001
else
    export SEEDNET_UID="$(id -u)" SEEDNET_GID="$(id -g)"
fi
export SEEDNET_PUBLISH="127.0.0.1:$PORT"
export SEEDNET_GRPC_PUBLISH="127.0.0.1:$((PORT + 1))"  # gRPC beside it, never the host's 8001
export SEEDNET_DEVICE=cpu

COMPOSE_UP=1   # from here on the trap runs `compose down -v`
log "materialising + verifying exports in the mounted registry (as the container user)"
if compose run --rm --no-deps -T "$SERVICE" \
        sh -c 'python -m service.registry_cli --root /app/models materialize && python -m service.registry_cli --root /app/models verify' \
        >"$WORK/materialize.log" 2>&1; then
    pass "registry materialize + verify in the container ($(grep -c '^OK ' "$WORK/materialize.log") version(s) OK)"
else
    tail -n 30 "$WORK/materialize.log" >&2
    fatal "registry materialize/verify failed in the container"
fi

# ------------------------------------------------------------------ 4. start + health
log "starting $SERVICE on 127.0.0.1:$PORT"
compose up -d "$SERVICE" >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fatal "compose up failed"; }
CID="$(container_id)"
[ -n "$CID" ] || fatal "compose up started no container"
pass "compose up ($SERVICE, container ${CID:0:12})"

BASE_URL="http://127.0.0.1:$PORT"
t0=$(date +%s)
ready=""
while [ $(( $(date +%s) - t0 )) -lt "$READY_TIMEOUT" ]; do
    state="$(docker inspect -f '{{.State.Status}} {{.RestartCount}}' "$CID" 2>/dev/null)"
    case "$state" in
        running\ 0) ;;
        *) fatal "container is not running cleanly (status/restarts: $state)" ;;
    esac
    code="$(curl -s -o /dev/null -w '%{http_code}' "$BASE_URL/health/ready" 2>/dev/null)"
    if [ "$code" = 200 ]; then ready=1; break; fi
    sleep 2
done
[ -n "$ready" ] || fatal "/health/ready not 200 after ${READY_TIMEOUT}s"
pass "GET /health/ready = 200 after $(( $(date +%s) - t0 )) s"
code="$(curl -s -o /dev/null -w '%{http_code}' "$BASE_URL/health/live")"
[ "$code" = 200 ] && pass "GET /health/live = 200" || fail "GET /health/live = $code"

health=""
for _ in $(seq 1 60); do
    health="$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$CID")"
    [ "$health" = healthy ] && break
    [ "$health" = unhealthy ] && break
    sleep 2
done
[ "$health" = healthy ] && pass "container HEALTHCHECK: healthy" \
    || fail "container HEALTHCHECK: '${health:-none}' after 120 s"

uid="$(docker exec "$CID" id -u 2>/dev/null)"
[ -n "$uid" ] && [ "$uid" != 0 ] && pass "service runs as non-root (uid $uid)" \
    || fail "service runs as uid '${uid:-?}' (expected non-root)"

# ------------------------------------------------------------------ 5. predictions
code="$(curl -s -o "$WORK/predict.json" -w '%{http_code}' \
        -F "file=@$IMG;type=image/jpeg" "$BASE_URL/predict")"
if [ "$code" = 200 ]; then
    if verdict="$(CLASSES="$CLASSES" python3 - "$WORK/predict.json" <<'EOF'
import json, os, sys
body = json.load(open(sys.argv[1]))
classes = os.environ["CLASSES"].split()
p = body["predictions"][0]
label, probs = p["label"], p["probabilities"]
assert label in classes, f"label {label!r} is not a CIFAR-10 class"
assert set(probs) == set(classes), f"probability keys {sorted(probs)} are not the 10 classes"
total = sum(float(v) for v in probs.values())
assert abs(total - 1.0) < 1e-3, f"probabilities sum to {total}"
assert all(0.0 <= float(v) <= 1.0 for v in probs.values()), "a probability is outside [0, 1]"
assert max(probs, key=probs.get) == label, "label is not the most probable class"
assert "attention" in p, "no attention in the prediction"
assert body.get("model"), "no model in the response"
model = body["model"]
if isinstance(model, dict):
    model = "@".join(str(model[k]) for k in ("name", "version") if k in model) or model
print(f"label={label} p={probs[label]:.3f} sum={total:.4f} model={model}")
EOF
    )"; then
        pass "POST /predict $(basename "$IMG") -> 200, $verdict"
    else
        fail "POST /predict $(basename "$IMG") -> 200 but bad JSON: $(head -c 400 "$WORK/predict.json")"
    fi
else
    fail "POST /predict $(basename "$IMG") -> HTTP $code: $(head -c 400 "$WORK/predict.json")"
fi

printf 'this is plain text, not a JPEG\n' >"$WORK/not-an-image.jpg"
code="$(curl -s -o "$WORK/bad.json" -w '%{http_code}' \
        -F "file=@$WORK/not-an-image.jpg;type=image/jpeg" "$BASE_URL/predict")"
if [[ "$code" =~ ^4[0-9][0-9]$ ]] && errcode="$(python3 - "$WORK/bad.json" <<'EOF'
import json, sys
err = json.load(open(sys.argv[1]))["error"]
assert err["code"] and err["message"], err
print(err["code"])
EOF
)"; then
    pass "POST /predict text-as-.jpg -> $code, error.code=$errcode"
else
    fail "POST /predict text-as-.jpg -> HTTP $code: $(head -c 400 "$WORK/bad.json")"
fi

exit 0   # summary and teardown: cleanup() on EXIT
