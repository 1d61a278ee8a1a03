"""Helpers of the deployment tests, which check deployment files with the real tools: HAProxy,
kubectl kustomize, kubernetes-validate, promtool. A tool that is missing skips its tests, or
fails them when CI is set."""

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def unavailable(message: str):
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def tool(name: str, install_hint: str) -> str:
    """The path of a command, looked for in the venv first (kubectl comes as a wheel)."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if found is None:
        unavailable(f"{name} not found: {install_hint}")
    return found
