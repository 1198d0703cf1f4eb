#!/usr/bin/env bash
# The GPU job of issue 11 (recipe v2), on a CUDA host: sized to end within 9 minutes on one
# H100/H200 (BUDGET seconds for the sweep; not run on a GPU yet).
#
#   1. the ablation of recipe v2 (training/recipes.py ABLATIONS["v2"]: v2, the old fast
#      recipe, and v2 with one technique off per variant) at a short schedule, each
#      variant on 2 seeds, in that order until the time budget must go to step 2;
#   2. the chosen recipe (v2 plus the overrides that beat it, training/sweep.py) on 3
#      seeds at its final length: the epochs that fit RUN_BUDGET seconds of training,
#      compilation included, at the time per epoch measured in step 1;
#   3. one table: variant, seeds, epochs, training seconds, test accuracy (mean +/- std),
#      flip-TTA accuracy, final training accuracy; and the loop overhead of a final run.
#
# All runs are one process (python -m training sweep): the data is decoded once and the
# training step compiled once. OUT is the folder results are written to (out/gpu):
# recipe.log, table.txt, and recipe.tar in parts under 15 MB with SHA256SUMS (the best
# final run's weights and reports, every run's summary, metrics and config, sweep.json);
# scripts/gpu_fetch.sh joins and checks them wherever they are copied. The runs themselves
# stay in runs/recipe.
#
# Data: data/cifar10.pack, or data/cifar10.pack.xz + .sha256 (scripts/gpu_prepare_data.sh)
# copied from another machine. On the GPU host:
#   PY=.venv/bin/python scripts/gpu_recipe_job.sh
# Rehearsal on the CPU (a tiny slice, 1 epoch per run, no compile):
#   DEVICE=cpu LIMIT=2 ABL_EPOCHS=1 FINAL_EPOCHS=1 PY=.venv/bin/python OUT=/tmp/gpu \
#       scripts/gpu_recipe_job.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out/gpu}
PACK=${PACK:-data/cifar10.pack}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
RECIPE=${RECIPE:-v2}
BUDGET=${BUDGET:-460}          # wall seconds for the sweep, data decoding included
RUN_BUDGET=${RUN_BUDGET:-100}  # seconds of training per final run, compilation included
ABL_EPOCHS=${ABL_EPOCHS:-8}
ABL_SEEDS=${ABL_SEEDS:-2}
FINAL_SEEDS=${FINAL_SEEDS:-3}
FINAL_EPOCHS=${FINAL_EPOCHS:-}  # empty: what fits RUN_BUDGET
VARIANTS=${VARIANTS:-}          # empty: the whole ablation, in its order
COMPILE_MODE=${COMPILE_MODE:-default}
if [ "$DEVICE" = cuda ]; then COMPILE=${COMPILE---compile}; else COMPILE=${COMPILE-}; fi
LIMIT=${LIMIT:+--limit-per-class $LIMIT}
RUNS=runs/recipe
. scripts/gpu_lib.sh
mkdir -p "$OUT" runs
rm -rf "$RUNS"

{
    device_info
    ensure_pack "$PACK" || exit 1
    $PY -m training sweep --recipe "$RECIPE" --ablation v2 ${VARIANTS:+--variants "$VARIANTS"} \
        --data "$PACK" --device "$DEVICE" --out "$RUNS" \
        --ablation-epochs "$ABL_EPOCHS" --ablation-seeds "$ABL_SEEDS" \
        --final-seeds "$FINAL_SEEDS" ${FINAL_EPOCHS:+--final-epochs "$FINAL_EPOCHS"} \
        --run-budget "$RUN_BUDGET" --budget "$BUDGET" \
        $COMPILE ${COMPILE:+--compile-mode "$COMPILE_MODE"} $LIMIT
} 2>&1 | tee "$OUT/recipe.log"

# the table the sweep printed last, on its own
[ -f "$RUNS/table.txt" ] || { echo "no table: the sweep did not finish" >&2; exit 1; }
cp "$RUNS/table.txt" "$OUT/table.txt"
best=$($PY -c "
import json, sys
runs = [r for r in json.load(open(sys.argv[1]))['runs'] if r['phase'] == 'final']
print(max(runs, key=lambda r: r['test_accuracy'])['out'] if runs else '')" "$RUNS/sweep.json")
files=("$RUNS/sweep.json")
for f in "$RUNS"/*/*/summary.json "$RUNS"/*/*/metrics.jsonl "$RUNS"/*/*/config.json; do
    [ -f "$f" ] && files+=("$f")
done
if [ -n "$best" ]; then
    echo "best final run: $best"
    for f in "$best"/model.safetensors "$best"/*.png "$best"/confusion_matrix.json \
        "$best"/attention_per_class.json "$best"/test_predictions.json; do
        [ -f "$f" ] && files+=("$f")
    done
fi
pack_results recipe "${files[@]}"
