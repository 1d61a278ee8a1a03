#!/usr/bin/env bash
# Create .venv-torchaudio: the authors' resampler (torchaudio) for the test that checks ours
# against it. Tests only: the gateway never imports torchaudio, since no torchaudio build
# matches the torch the gateway locks. Idempotent.
#
#   scripts/torchaudio-env.sh          # uses python3.11 / python3 from PATH
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${TORCHAUDIO_VENV:-.venv-torchaudio}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import torchaudio" 2>/dev/null; then
    echo "$VENV: torchaudio already importable, nothing to do"
    exit 0
fi

# torch 2.9.1 is the release the reference fixtures were made with; on x86-64 PyPI has only its
# CUDA build (about 7 GB with its libraries), which runs on the CPU as well.
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet torch==2.9.1 torchaudio==2.9.1 numpy
"$VENV/bin/python" -c "import torchaudio; print('torchaudio', torchaudio.__version__)"
