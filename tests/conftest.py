import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURE = SHARED / "fixtures" / "onellm-ref-tiny"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The authors' reference fixture; missing it is a failure in CI, a skip elsewhere."""
    if not (FIXTURE / "reference.json").exists():
        message = f"reference fixture not found at {FIXTURE}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return FIXTURE


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
    from server.convert import convert

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
        message = f"{CHROMIUM} not found (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()
