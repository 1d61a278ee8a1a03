import json
import subprocess
from pathlib import Path

import pytest

from missing import unavailable
from vllm_server import VLLM_PYTHON

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURE = SHARED / "fixtures" / "onellm-ref-tiny"
PREPROCESS_FIXTURE = SHARED / "fixtures" / "preprocess-ref"


def shared_fixture(folder: Path, marker: str) -> Path:
    """A fixture folder of ../shared; missing it is a failure in CI, a skip elsewhere."""
    if not (folder / marker).exists():
        unavailable(f"fixture not found: {folder / marker}")
    return folder


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The authors' reference fixture of the model."""
    return shared_fixture(FIXTURE, "reference.json")


@pytest.fixture(scope="session")
def preprocess_fixture() -> Path:
    """Real files with the tensors the authors' preprocessing made from them."""
    return shared_fixture(PREPROCESS_FIXTURE, "cases.json")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A freshly built `onellm make-tiny` model folder, shared by the whole session."""
    from server.cli import main

    out = tmp_path_factory.mktemp("models") / "tiny"
    assert main(["make-tiny", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def fixture_model(fixture_dir, tmp_path_factory) -> Path:
    """The reference fixture converted once into a model folder (float32, its 2 CLIP heads)."""
    from server.tools.convert import convert

    return convert(checkpoint=fixture_dir / "consolidated.00-of-01.pth", params=fixture_dir / "params.json",
                   tokenizer=fixture_dir / "tokenizer.model", out=tmp_path_factory.mktemp("models") / "fixture",
                   clip_heads=2, dtype="float32", name="fixture")


CHROMIUM = Path("/usr/bin/chromium")  # Debian's: Playwright's own browser download does not work here
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Playwright; missing it is a failure in CI, a skip elsewhere.

    Module-scoped: Playwright's sync API keeps an event loop running while it is open, and
    `asyncio.run` in any later test would then fail."""
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} not found (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server for the session; a test that stops it starts it again."""
    from redis_server import RedisServer, require_redis_server

    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vllm_installed() -> Path:
    """The python of .venv-vllm, checked to have vLLM."""
    if not VLLM_PYTHON.exists():
        unavailable(f"{VLLM_PYTHON.parent.parent} not found: run `make vllm-env` (scripts/vllm-env.sh)")
    has_vllm = subprocess.run([str(VLLM_PYTHON), "-c", "import importlib.util, sys; "
                               "sys.exit(importlib.util.find_spec('vllm') is None)"])
    if has_vllm.returncode != 0:
        unavailable(f"vllm is not installed in {VLLM_PYTHON.parent.parent}: run `make vllm-env`")
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def vllm_model_dir(fixture_dir: Path, tmp_path_factory) -> Path:
    """The reference fixture converted to a model folder (float32); vLLM serves its llm/."""
    from server.tools.convert import convert

    clip_heads = json.loads((fixture_dir / "reference.json").read_text())["clip"]["heads"]
    out = tmp_path_factory.mktemp("vllm-model") / "onellm-ref-tiny"
    return convert(checkpoint=fixture_dir / "consolidated.00-of-01.pth", params=fixture_dir / "params.json",
                   tokenizer=fixture_dir / "tokenizer.model", out=out, clip_heads=clip_heads,
                   dtype="float32", name="onellm-ref-tiny")
