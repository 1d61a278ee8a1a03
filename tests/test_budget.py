"""The memory budget and the stage limits that follow from it (server/budget.py)."""

import pytest

from server.budget import split_of
from server.config import Settings

MiB = 1 << 20


def test_the_default_budget_gives_the_limits_the_gateway_had_before_it():
    settings = Settings(preprocess_workers=8)
    assert settings.memory_budget_mb == 4096
    assert settings.max_buffered_bytes == 1024 * MiB
    assert settings.max_decode_mb == 256
    assert (settings.prefix_cache_mb, settings.stored_responses_mb, settings.references_mb) == (256, 64, 16)


def test_the_shares_follow_the_budget_and_the_decoding_workers():
    settings = Settings(memory_budget_mb=512, preprocess_workers=2)
    assert settings.max_buffered_bytes == 128 * MiB
    assert settings.max_decode_mb == 128
    assert split_of(settings).total <= 512 * MiB


def test_a_stage_given_its_own_limit_keeps_it_and_the_others_keep_their_shares():
    settings = Settings.from_env({"ONELLM_MEMORY_BUDGET_MB": "1024", "ONELLM_MAX_BUFFERED_BYTES": "1000"},
                                 preprocess_workers=4)
    assert settings.max_buffered_bytes == 1000
    assert settings.max_decode_mb == 128


@pytest.mark.parametrize("name", ["max_buffered_bytes", "max_decode_mb", "prefix_cache_mb", "stored_responses_mb",
                                  "references_mb"])
def test_every_share_read_from_the_environment_is_a_number(name):
    settings = Settings.from_env({f"ONELLM_{name.upper()}": "3"})
    assert getattr(settings, name) == 3 and not isinstance(getattr(settings, name), str)
