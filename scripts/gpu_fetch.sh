#!/usr/bin/env bash
# After a GPU job, wherever its results were copied to: join the tar parts, check every
# checksum, unpack. RESULTS is the job's OUT folder (or a copy of it).
#
#   scripts/gpu_fetch.sh RESULTS [DEST]      # DEST defaults to runs/gpu
#
# Each NAME.tar.partNN and each joined NAME.tar must match SHA256SUMS (written on the GPU
# host by scripts/gpu_lib.sh pack_results, or by scripts/gpu_job.sh); a mismatch stops
# with an error and nothing unpacked.
set -euo pipefail
src=${1:?usage: scripts/gpu_fetch.sh RESULTS [DEST]}
dest=${2:-runs/gpu}
sums="$src/SHA256SUMS"
[ -f "$sums" ] || { echo "no SHA256SUMS in $src" >&2; exit 1; }
mkdir -p "$dest"
names=$(cd "$src" && ls -- *.tar.part* 2>/dev/null | sed 's/\.tar\.part[0-9]*$//' | sort -u)
[ -n "$names" ] || { echo "no *.tar.part* files in $src" >&2; exit 1; }
expected() {  # expected FILE: the sum SHA256SUMS gives for FILE (matched by base name)
    awk -v f="$1" '{ n = $2; sub(/^\*/, "", n); sub(/.*\//, "", n); if (n == f) print $1 }' "$sums" | tail -n 1
}
for name in $names; do
    for part in "$src/$name".tar.part*; do
        want=$(expected "$(basename "$part")")
        got=$(sha256sum "$part" | cut -d' ' -f1)
        [ -n "$want" ] && [ "$want" = "$got" ] || { echo "checksum mismatch: $part" >&2; exit 1; }
    done
    cat "$src/$name".tar.part* > "$dest/$name.tar"
    want=$(expected "$name.tar")
    got=$(sha256sum "$dest/$name.tar" | cut -d' ' -f1)
    [ -n "$want" ] && [ "$want" = "$got" ] || { echo "checksum mismatch: joined $name.tar" >&2; exit 1; }
    tar -xf "$dest/$name.tar" -C "$dest"
    echo "$name.tar: $(ls "$src/$name".tar.part* | wc -l) part(s), sha256 ok, unpacked into $dest"
done
