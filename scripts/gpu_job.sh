#!/usr/bin/env bash
# The GPU job of the production-model issue, on a CUDA host, in two phases of under 10
# minutes each (data/cifar10.pack in the checkout: `python -m training pack-data`):
#   scripts/gpu_job.sh full    bench training speed, pick the epoch count that fits the
#                              training budget, train SeedNet with the fast recipe, pack it
#   scripts/gpu_job.sh small   train seednet-small, run the inference benchmarks, pack them
# OUT is the folder results are written to (out/gpu): the logs, and tar parts under 15 MB
# with SHA256SUMS for copying them off the host (scripts/gpu_fetch.sh joins and checks them);
# runs/full and runs/small hold the same files unpacked. Everything can be rehearsed on the CPU:
#   DEVICE=cpu LIMIT=5 EPOCHS=1 OUT=/tmp/gpu scripts/gpu_job.sh full
set -uo pipefail
phase=${1:?usage: gpu_job.sh full|small}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out/gpu}
PACK=${PACK:-data/cifar10.pack}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-270}            # seconds of training for the full model
SMALL_BUDGET=${SMALL_BUDGET:-80} # and for the small one
LIMIT=${LIMIT:+--limit-per-class $LIMIT}
PY=${PY:-python3}
mkdir -p "$OUT" runs

pack() {  # pack NAME PATHS...: a tar split into parts under 15 MB, with their sums
    local name=$1; shift
    tar -cf "runs/$name.tar" "$@" && split -b 15000000 -d "runs/$name.tar" "$OUT/$name.tar.part"
    (cd "$OUT" && sha256sum "$name".tar.part* >> SHA256SUMS) && sha256sum "runs/$name.tar" >> "$OUT/SHA256SUMS"
}

epochs_for() {  # epochs_for BENCH_JSON BUDGET: how many epochs fit the budget
    $PY - "$1" "$2" "${3:-0}" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
ips = max(r["images_per_second"] for r in rows if r["batch"] == 512)
overhead = float(sys.argv[3])  # compile time, paid once
epoch_s = 50000 / ips * 1.08 + 0.05  # + augmentation, eval every 4 epochs
print(max(1, min(200, int((float(sys.argv[2]) - overhead) / epoch_s))))
PY
}

if [ "$phase" = full ]; then
    {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch; print('torch', torch.__version__)"
    $PY bench/train_bench.py --device "$DEVICE" --batch-sizes ${BENCH_BATCHES:-128 512 1024} --steps ${STEPS:-30} --json runs/train_bench.json
    compile_flag=""
    if [ "$DEVICE" = cuda ] && $PY bench/train_bench.py --device cuda --batch-sizes 512 --steps 30 --compile --json runs/train_bench_compile.json; then
        if $PY -c "import json,sys; a=json.load(open('runs/train_bench.json'))['rows']; b=json.load(open('runs/train_bench_compile.json'))['rows']; ea=[r for r in a if r['batch']==512][0]['images_per_second']; sys.exit(0 if b[0]['images_per_second'] > 1.2*ea else 1)"; then
            compile_flag=--compile; cp runs/train_bench_compile.json runs/speed.json
        fi
    fi
    [ -n "$compile_flag" ] || cp runs/train_bench.json runs/speed.json
    E=${EPOCHS:-$(epochs_for runs/speed.json "$BUDGET" "${compile_flag:+45}")}
    echo "training the full model for $E epochs ${compile_flag}"
    $PY -m training train --recipe fast --arch seednet --data "$PACK" --device "$DEVICE" --epochs "$E" \
        --eval-every 4 $compile_flag $LIMIT --out runs/full
    } 2>&1 | tee "$OUT/full.log"
    cp runs/train_bench*.json runs/full/ 2>/dev/null
    pack full runs/full/model.safetensors runs/full/*.json runs/full/*.jsonl runs/full/*.png
elif [ "$phase" = small ]; then
    {
    E=${EPOCHS:-$(epochs_for runs/speed.json "$((SMALL_BUDGET * 3))")}  # ~3x faster per epoch
    [ "$E" -gt 200 ] && E=200
    compile_flag=""; [ -f runs/train_bench_compile.json ] && cmp -s runs/speed.json runs/train_bench_compile.json && compile_flag=--compile
    echo "training seednet-small for $E epochs ${compile_flag}"
    $PY -m training train --recipe fast --arch seednet-small --data "$PACK" --device "$DEVICE" --epochs "$E" \
        --eval-every 4 $compile_flag $LIMIT --out runs/small
    $PY bench/infer_bench.py --weights runs/full --device "$DEVICE" --batch-sizes ${INFER_BATCHES:-1 32 256 1024} --json runs/infer_full.json
    $PY bench/infer_bench.py --weights runs/small --device "$DEVICE" --batch-sizes ${INFER_BATCHES:-1 32 256 1024} --no-torchscript --json runs/infer_small.json
    } 2>&1 | tee "$OUT/small.log"
    pack small runs/small/model.safetensors runs/small/*.json runs/small/*.jsonl runs/small/*.png runs/infer_*.json
else
    echo "unknown phase $phase" >&2; exit 2
fi
