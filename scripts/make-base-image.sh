#!/usr/bin/env bash
# Build a local Debian bookworm base image for the SeedNet Dockerfile on a host
# that cannot reach a container registry (so `FROM debian`/`FROM nvidia/cuda`
# cannot be pulled), using debootstrap and the Debian mirror apt already uses.
#
#   scripts/make-base-image.sh                 # -> local/debian:bookworm
#   BASE_IMAGE=local/debian:bookworm FORCE=1 scripts/make-base-image.sh
#
# The image holds python3 (3.11), python3-venv, python3-pip and the host's CA
# certificates (so pip and apt work through a TLS-intercepting proxy), with
# PIP_CERT / SSL_CERT_FILE / REQUESTS_CA_BUNDLE pointing at the bundle.
# Idempotent: does nothing if the image already exists (FORCE=1 rebuilds).
# Needs root, debootstrap and a running Docker daemon.
set -euo pipefail

IMAGE="${BASE_IMAGE:-local/debian:bookworm}"
SUITE="${SUITE:-bookworm}"
FORCE="${FORCE:-0}"

log() { printf '[make-base-image] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (debootstrap and chroot)"; exit 1
fi
for tool in docker debootstrap; do
    command -v "$tool" >/dev/null || { log "missing: $tool"; exit 1; }
done
docker info >/dev/null 2>&1 || { log "no Docker daemon is running"; exit 1; }

if [ "$FORCE" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE already exists; skipping (FORCE=1 to rebuild)"
    exit 0
fi

# The Debian mirror apt uses here: MIRROR env, else the first URI for the main
# Debian archive in deb822 (*.sources) or one-line (*.list) apt sources.
find_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk 'tolower($1)=="uris:" {for (i=2;i<=NF;i++) print $i}' "$f" \
              | grep -E '/debian/?$' | head -n1 || true)
        [ -n "$uri" ] && { echo "${uri%/}"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri=$(awk '$1=="deb" {for (i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; break}}' "$f" \
              | grep -E '/debian/?$' | head -n1 || true)
        [ -n "$uri" ] && { echo "${uri%/}"; return; }
    done
    echo "http://deb.debian.org/debian"
}
MIRROR="${MIRROR:-$(find_mirror)}"
SECURITY_MIRROR="${SECURITY_MIRROR:-${MIRROR%/debian}/debian-security}"
log "mirror: $MIRROR (security: $SECURITY_MIRROR)"

ROOTFS=$(mktemp -d /tmp/seednet-rootfs.XXXXXX)
cleanup() {
    # never leave bind mounts behind, then drop the tree
    for m in proc sys dev; do
        mountpoint -q "$ROOTFS/$m" 2>/dev/null && umount -l "$ROOTFS/$m" || true
    done
    rm -rf --one-file-system "$ROOTFS"
}
trap cleanup EXIT

start=$(date +%s)
log "debootstrap --variant=minbase $SUITE -> $ROOTFS"
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >/tmp/seednet-debootstrap.log 2>&1 || {
    log "debootstrap failed; tail of /tmp/seednet-debootstrap.log:"
    tail -n 30 /tmp/seednet-debootstrap.log >&2
    exit 1
}

# apt inside later builds uses the same mirror (plus updates and security)
cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF

# Host CA certificates (TLS proxy), then rebuild the bundle inside the tree.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
fi
chroot "$ROOTFS" /usr/sbin/update-ca-certificates --fresh >/dev/null

# pip: trust the bundle. The host's own index settings (find-links and
# file:// extra indexes under /opt) point at paths that do not exist in a
# container, so only the certificate setting is carried over; builds then use
# PyPI (https://pypi.org/simple) through the proxy.
cat >"$ROOTFS/etc/pip.conf" <<'EOF'
[global]
cert = /etc/ssl/certs/ca-certificates.crt
disable-pip-version-check = true
EOF

# keep the image small
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/tmp/* \
       "$ROOTFS"/var/log/*.log

log "importing as $IMAGE"
CA=/etc/ssl/certs/ca-certificates.crt
tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV SSL_CERT_FILE=$CA" \
    --change "ENV PIP_CERT=$CA" \
    --change "ENV REQUESTS_CA_BUNDLE=$CA" \
    --change 'CMD ["/bin/bash"]' \
    - "$IMAGE" >/dev/null

log "done in $(( $(date +%s) - start ))s: $(docker image inspect -f '{{.Id}} {{.Size}}' "$IMAGE")"
