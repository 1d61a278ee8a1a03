#!/usr/bin/env bash
# Build the local Debian + Python 3.11 base image that the CPU images start FROM, where no
# container registry can be reached: debootstrap from Debian's packages, then `docker import`.
# The machine's CA bundle (the one pip uses) goes in, so that builds on this base reach the
# package registries through the same proxy the host does.
#
#   docker/cpu/base.sh [IMAGE]      IMAGE defaults to onellm-cpu-base:bookworm
#
# Honours DOCKER_HOST. Needs root, debootstrap and a Debian mirror (DEBIAN_MIRROR).
set -euo pipefail

IMAGE=${1:-onellm-cpu-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-$(python3 -m pip config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)}

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base.sh: $IMAGE already exists"
    exit 0
fi

ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/onellm-base.XXXXXX")
trap 'rm -rf "$ROOTFS"' EXIT
# python3.11 and venv for uv's environment; curl for health checks; tini reaps and forwards
# signals so that SIGTERM reaches the server
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,curl,tini \
    bookworm "$ROOTFS" "$MIRROR"
cp "$CA_BUNDLE" "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV LANG=C.UTF-8 SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["/bin/bash"]' - "$IMAGE"
echo "base.sh: built $IMAGE"
