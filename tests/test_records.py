"""The records a gateway keeps itself (media uuids, stored responses): per tenant, bounded in bytes,
least recently used out first, gone after their TTL."""

import asyncio
import time

import pytest

from server.api.records import MediaReferences, Records
from server.errors import InputError


def run(coroutine):
    return asyncio.run(coroutine)


def test_tenants_do_not_see_each_other():
    records = Records("t:", 1 << 20, 60, None)
    run(records.put("alice", "k", b"hers"))
    assert run(records.get("alice", "k")) == b"hers"
    assert run(records.get("bob", "k")) is None


def test_the_least_recently_used_goes_first_when_full():
    value = b"x" * 100
    entry = len("t:") + 64 + len(value)  # the namespace, a sha256 hex name, the value
    records = Records("t:", 3 * entry, 60, None)
    for key in "abc":
        run(records.put("-", key, value))
    assert run(records.get("-", "a")) == value  # now the most recent
    run(records.put("-", "d", value))
    assert [run(records.get("-", k)) is not None for k in "abcd"] == [True, False, True, True]
    assert records.size == 3 * entry
    run(records.put("-", "big", b"y" * (4 * entry)))  # larger than the whole bound: not kept
    assert run(records.get("-", "big")) is None and records.size == 3 * entry


def test_records_expire():
    records = Records("t:", 1 << 20, 1, None)
    run(records.put("-", "k", b"v"))
    assert run(records.get("-", "k")) == b"v"
    time.sleep(1.1)
    assert run(records.get("-", "k")) is None and records.size == 0


def test_a_reference_names_modality_and_key_and_an_unknown_one_is_media_not_found():
    references = MediaReferences(Records("r:", 1 << 20, 60, None))
    run(references.remember("-", "clip", "video", "abc"))
    assert run(references.resolve("-", "clip", "p")) == ("video", "abc")
    with pytest.raises(InputError) as raised:
        run(references.resolve("other", "clip", "messages[0].content[0]"))
    assert raised.value.status == 400 and raised.value.code == "media_not_found"
    assert raised.value.param == "messages[0].content[0]"
