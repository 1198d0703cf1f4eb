#!/usr/bin/env bash
# An offline wheelhouse for a CUDA host without a package index (an air-gapped GPU host
# running a PyTorch CUDA image): run this on a machine that reaches the index; it collects
# what that image lacks, for scripts/gpu_serving_job.sh to install there without an index.
# A host with the project installed (scripts/setup.sh dev) needs none of this.
#
#   .whl/wheels/*.whl          the service's missing wheels for the image's Python (3.12,
#                              manylinux x86_64), derived from pyproject.toml by
#                              scripts/gpu_wheelhouse.py (reasons and sizes: .whl/WHEELS.txt)
#   .whl/perf_analyzer.tar.xz  bin/perf_analyzer (from the tritonclient 2.41.0 wheel,
#                              stripped) + lib/libcudart.so.12 (nvidia-cuda-runtime-cu12)
#                              + lib/libb64.so.0d (Debian's libb64-0d): nothing else of
#                              tritonclient is needed there
#   data/gpu-cifar10-slice.tar.gz  a slice of the CIFAR-10 JPEG copy (train: 16 per class
#                              for the tests' tiny models; test: 64 per class = 640 JPEGs
#                              for the tests, the golden sets and the load generators)
#
# Both paths are git-ignored: copy them to the GPU host with the checkout. `size` prints what
# that copy weighs (tracked + untracked-not-ignored files + these paths) and fails above
# LIMIT_MIB (64 MiB, the transfer cap the wheelhouse was sized for).
#
#   scripts/gpu_wheelhouse.sh                    # everything, for the GPU image (cp312)
#   PYVER=3.11 DEST=runs/whl-cp311 scripts/gpu_wheelhouse.sh wheels
#                                                # a cp311 set, to rehearse the install here
# Variables: PYVER (3.12), DEST (.whl), PIN_PYTHON (the venv whose versions are pinned:
# .venv/bin/python, else python3), SEEDNET_CIFAR10 (the JPEG copy, default ../shared/cifar10)
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}   # all | wheels | perf | data | size
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
PIN_PYTHON=${PIN_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PY=${PY:-$PIN_PYTHON}
CIFAR=${SEEDNET_CIFAR10:-../shared/cifar10}
SLICE=data/gpu-cifar10-slice.tar.gz
LIMIT_MIB=64
TRITON=tritonclient==2.41.0
CUDART=nvidia-cuda-runtime-cu12==12.9.79
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

wheels() {
    "$PY" scripts/gpu_wheelhouse.py --dest "$DEST/wheels" --python-version "$PYVER" \
        --pin-python "$PIN_PYTHON"
}

perf() {  # perf_analyzer and the two libraries it links that the image lacks
    local plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
                --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
        --implementation cp "${plat[@]}" -d "$tmp/dl" "$TRITON" "$CUDART"
    mkdir -p "$tmp/pa/bin" "$tmp/pa/lib"
    unzip -q -j -o "$tmp"/dl/tritonclient-*.whl '*/data/bin/perf_analyzer' -d "$tmp/pa/bin"
    command -v strip >/dev/null && strip "$tmp/pa/bin/perf_analyzer"  # 17.8 -> 13.2 MB
    unzip -q -j -o "$tmp"/dl/nvidia_cuda_runtime_cu12-*.whl '*/lib/libcudart.so.12' -d "$tmp/pa/lib"
    # libb64: Debian's package (a tiny C library, needs only libc); apt lists first if needed
    (cd "$tmp" && { apt-get download libb64-0d 2>/dev/null || { apt-get update -qq && apt-get download libb64-0d; }; })
    dpkg-deb -x "$tmp"/libb64-0d_*.deb "$tmp/deb"
    cp -L "$tmp"/deb/usr/lib/x86_64-linux-gnu/libb64.so.0d "$tmp/pa/lib/"
    mkdir -p "$DEST"
    tar -C "$tmp/pa" -cf - bin lib | xz -9 -T2 > "$DEST/perf_analyzer.tar.xz"
    # it must start here too (the CPU rehearsal uses this very copy)
    mkdir -p "$tmp/check" && tar -C "$tmp/check" -xJf "$DEST/perf_analyzer.tar.xz"
    LD_LIBRARY_PATH="$tmp/check/lib" "$tmp/check/bin/perf_analyzer" --version
}

data() {  # the first 16 train and 64 test JPEGs of each class, in the folder layout
    [ -d "$CIFAR/test" ] || { echo "no CIFAR-10 JPEG copy at $CIFAR (set SEEDNET_CIFAR10)" >&2; exit 2; }
    local list="$tmp/files"; : > "$list"
    for split_n in train:16 test:64; do
        local split=${split_n%%:*} n=${split_n##*:}
        for d in "$CIFAR/$split"/*/; do
            c=$(basename "$d")
            (cd "$CIFAR" && find "$split/$c" -maxdepth 1 -name '*.jpg' | sort | sed -n "1,${n}p") >> "$list"  # sed, not head: no SIGPIPE under pipefail
        done
    done
    mkdir -p data
    tar -C "$CIFAR" --transform 's,^,cifar10-slice/,' -czf "$SLICE" -T "$list"
    echo "$SLICE: $(wc -l < "$list") JPEGs, $(du -b "$SLICE" | cut -f1) bytes"
}

size() {  # what the copy weighs: tracked + untracked-not-ignored files + the wheelhouse and slice
    local tracked untracked extra total
    tracked=$(git ls-files -z | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
    untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
    extra=$(du -cb "$DEST" "$SLICE" 2>/dev/null | tail -1 | cut -f1)
    total=$(( tracked + ${untracked:-0} + extra ))
    printf '%-34s %10s\n' "tracked files" "$tracked" "untracked, not ignored" "${untracked:-0}"
    du -b "$DEST"/WHEELS.txt "$DEST"/perf_analyzer.tar.xz "$SLICE" 2>/dev/null | awk '{printf "%-34s %10s\n", $2, $1}'
    printf '%-34s %10s\n' "$DEST/wheels" "$(du -cb "$DEST"/wheels/*.whl 2>/dev/null | tail -1 | cut -f1)"
    printf '%-34s %10s  = %.1f MiB of %d MiB (%.1f MiB left)\n' "total to copy" "$total" \
        "$(echo "$total/1048576" | bc -l)" "$LIMIT_MIB" "$(echo "$LIMIT_MIB - $total/1048576" | bc -l)"
    [ "$total" -lt $(( LIMIT_MIB * 1048576 )) ] || { echo "over the ${LIMIT_MIB} MiB limit" >&2; exit 1; }
}

case "$what" in
    all) wheels; perf; data; size ;;
    wheels|perf|data|size) "$what" ;;
    *) echo "usage: $0 [all|wheels|perf|data|size]" >&2; exit 2 ;;
esac
