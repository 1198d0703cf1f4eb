#!/usr/bin/env bash
# Here, before a device call: the packed data set in a form that travels.
#
# The device tool sends the working tree (tracked files, untracked files git does not
# ignore) plus the carried paths, 64 MiB in all. The tracked tree is about 45 MiB (mostly
# models/*/weights.safetensors) and data/cifar10.pack 53 MiB: together too much. The 60,000
# small JPEGs repeat the same headers, so xz takes the pack to about 17 MiB, which fits.
# The job scripts unpack data/cifar10.pack.xz on the device and check it against
# data/cifar10.pack.sha256 (scripts/gpu_lib.sh).
#
#   scripts/gpu_prepare_data.sh      # then carry data/cifar10.pack.xz data/cifar10.pack.sha256
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
    printf "travels: working tree %.1f MiB + data %.1f MiB = %.1f MiB of %d MiB\n", t / m, d / m, total, l
    exit (total > l) }' || { echo "too much travels: leave out untracked files or carry less" >&2; exit 1; }
echo "carry: data/cifar10.pack.xz data/cifar10.pack.sha256"
