#!/usr/bin/env bash
# Before a GPU training job on another host: the packed data set, compressed for the copy.
#
# The training jobs read data/cifar10.pack (53 MiB; a host that has the JPEG copy can build
# it there with `python -m training pack-data`). The 60,000 small JPEGs repeat the same
# headers, so xz takes the pack to about 17 MiB. The job scripts unpack
# data/cifar10.pack.xz on the GPU host and check it against data/cifar10.pack.sha256
# (scripts/gpu_lib.sh). The script also prints what the copy weighs (the working tree:
# tracked files and untracked files git does not ignore, about 45 MiB, mostly
# models/*/weights.safetensors; plus the compressed data) and fails above LIMIT_MIB (64 MiB,
# for a transfer with that cap; set it higher where there is none).
#
#   scripts/gpu_prepare_data.sh      # then copy data/cifar10.pack.xz and .sha256 with the checkout
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SRC=${SRC:-../shared/cifar10}
LIMIT_MIB=${LIMIT_MIB:-64}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -f data/cifar10.pack ] || $PY -m training pack-data "$SRC" data/cifar10.pack
(cd data && sha256sum cifar10.pack > cifar10.pack.sha256)
if [ ! -f data/cifar10.pack.xz ] || [ data/cifar10.pack -nt data/cifar10.pack.xz ]; then
    xz -9 -T0 -k -f data/cifar10.pack
fi
tree=$(git ls-files -z --cached --others --exclude-standard \
    | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
data=$(stat -c %s data/cifar10.pack.xz data/cifar10.pack.sha256 | awk '{s += $1} END {print s}')
awk -v t="$tree" -v d="$data" -v l="$LIMIT_MIB" 'BEGIN {
    m = 1048576; total = (t + d) / m
    printf "the copy: working tree %.1f MiB + data %.1f MiB = %.1f MiB of %d MiB\n", t / m, d / m, total, l
    exit (total > l) }' || { echo "the copy is over LIMIT_MIB: leave out untracked files, or raise LIMIT_MIB" >&2; exit 1; }
echo "copy with the checkout: data/cifar10.pack.xz data/cifar10.pack.sha256"
