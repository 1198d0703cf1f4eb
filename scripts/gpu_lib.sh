# Shared by the GPU job scripts (sourced, not run): the packed data set on the GPU host, and
# the results as tar parts under 15 MB (for copies with a file-size cap) with SHA256SUMS,
# which scripts/gpu_fetch.sh checks on the machine they are copied to.

device_info() {  # what ran the job
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
}

ensure_pack() {  # ensure_pack PACK: the packed data set, unpacked from PACK.xz if needed
    local pack=$1
    if [ ! -f "$pack" ] && [ -f "$pack.xz" ]; then
        echo "unpacking $pack.xz"
        xz -dc "$pack.xz" > "$pack.tmp" 2>/dev/null \
            || $PY -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$pack.xz" "$pack.tmp" \
            || return 1
        mv "$pack.tmp" "$pack"
    fi
    [ -f "$pack" ] || { echo "no data: $pack (nor $pack.xz); see scripts/gpu_prepare_data.sh" >&2; return 1; }
    if [ -f "$pack.sha256" ]; then  # written by scripts/gpu_prepare_data.sh
        (cd "$(dirname "$pack")" && sha256sum -c "$(basename "$pack").sha256") || return 1
    fi
}

pack_results() {  # pack_results NAME PATHS...: NAME.tar in parts under 15 MB, in $OUT
    local name=$1; shift
    mkdir -p runs
    tar -cf "runs/$name.tar" "$@" || return 1
    split -b 15000000 -d "runs/$name.tar" "$OUT/$name.tar.part"
    (cd "$OUT" && sha256sum "$name".tar.part* >> SHA256SUMS)
    local sum; sum=$(cd runs && sha256sum "$name.tar") && echo "$sum" >> "$OUT/SHA256SUMS"
    echo "packed $name.tar ($(stat -c %s "runs/$name.tar") bytes) into $(ls "$OUT/$name".tar.part* | wc -l) part(s)"
}
