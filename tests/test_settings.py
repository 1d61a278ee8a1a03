"""Settings read from the environment: a value a setting cannot take stops `onellm serve` before it
loads anything, with a line that names the variable (a typo must not pass for the default)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, value, told", [
    ("ONELLM_CACHE_SCOPE", "shared", "'shared': not one of tenant, all"),
    ("ONELLM_DTYPE", "fp8", "'fp8': not one of auto, float32, float16, bfloat16"),
    ("ONELLM_MAX_UPLOADS", "lots", "ONELLM_MAX_UPLOADS='lots': invalid literal for int()"),
])
def test_a_value_a_setting_cannot_take_stops_serve_naming_the_variable(name, value, told):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONELLM_")}
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve"], cwd=REPO, env={**env, name: value},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("onellm serve: ") and name in result.stderr, result.stderr
    assert told in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_settings_given_in_code_are_held_to_the_same_choices():
    with pytest.raises(ValueError, match="cache_scope .* 'everyone': not one of tenant, all"):
        Settings(cache_scope="everyone")
    assert Settings(cache_scope="all").cache_scope == "all"
