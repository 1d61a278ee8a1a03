"""The records a gateway keeps itself (media uuids, stored responses): per tenant, bounded in bytes,
least recently used out first, gone after their TTL; with a real redis-server stopped or paused,
writes made meanwhile survive the outage."""

import asyncio
import time

import pytest

from server.metrics import Metrics
from server.storage.records import MediaReferences, Records
from server.cache.redis_client import SharedRedis
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


async def until(condition, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.05)


async def shared_records(redis_server) -> tuple[SharedRedis, Records]:
    shared = SharedRedis(redis_server.url, 0.3, Metrics())
    await shared.start()
    return shared, Records("test:records:", 1 << 20, 60, shared)


def test_a_record_stored_while_redis_is_down_outlives_the_outage(redis_server):
    async def scenario():
        shared, records = await shared_records(redis_server)
        redis_server.stop()
        try:
            await records.put("-", "during", b"kept")  # Redis does not take it
            assert not shared.up
        finally:
            redis_server.start()  # empty: it keeps nothing across a restart
        await until(lambda: shared.up)
        assert await records.get("-", "during") == b"kept"
        with redis_server.client() as client:  # written back, so other gateways find it too
            await until(lambda: client.get(records._name("-", "during")) == b"kept")
        await shared.close()

    asyncio.run(scenario())


def test_a_record_deleted_while_redis_is_slow_stays_deleted_once_it_answers(redis_server):
    async def scenario():
        shared, records = await shared_records(redis_server)
        await records.put("-", "stored", b"old")
        name = records._name("-", "stored")
        with redis_server.client() as client:
            assert client.get(name) == b"old"
            client.execute_command("CLIENT", "PAUSE", 1500, "ALL")  # the delete waits past the timeout
            await records.delete("-", "stored")
            assert not shared.up
            assert await records.get("-", "stored") is None
            await until(lambda: shared.up)
            assert await records.get("-", "stored") is None
            await until(lambda: client.get(name) is None)  # the delete written back
        assert await records.get("-", "stored") is None
        await shared.close()

    asyncio.run(scenario())
