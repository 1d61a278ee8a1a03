#!/usr/bin/env bash
# `onellm` with the container's arguments (default: serve). Serving with no model folder
# yet says how to make one instead of failing deep inside the model loader.
set -euo pipefail

if [ "${1:-}" = "serve" ] && [ ! -f "${ONELLM_MODEL:-}/model.json" ]; then
    echo "onellm-entrypoint: no model folder at ${ONELLM_MODEL:-<ONELLM_MODEL unset>}" >&2
    echo "convert OneLLM-7B into it first: docker compose --profile convert run --rm convert" >&2
    exit 1
fi
exec onellm "$@"
