"""The batch stores' contract, over the local one (a folder beside the uploaded files) and the Redis
one (a real redis-server): a batch is its key's own, its finished lines are kept one per custom_id
(the first stored), a cancel is kept apart from the batch, and everything outlives its store (a
restarted gateway); once a batch has ended, its results and cancel are dropped. Then what only the
shared store has: the lease that gives a batch to one gateway at a time."""

import asyncio
import itertools

import pytest

from server.storage.batch_records import LeaseLost
from server.storage.local_batches import LocalBatchStore
from server.storage.redis_batches import RedisBatchStore

_namespaces = itertools.count()


@pytest.fixture(params=["local", "redis"])
def new_store(request, tmp_path):
    """A function that opens a store over the same place each time it is called."""
    if request.param == "local":
        return lambda: LocalBatchStore(tmp_path)
    url, namespace = request.getfixturevalue("redis_server").url, f"test-batches-{next(_namespaces)}:"
    return lambda: RedisBatchStore(url, lease_ttl_s=30, namespace=namespace)


def _batch(batch_id: str, status: str = "in_progress") -> dict:
    return {"id": batch_id, "object": "batch", "status": status, "created_at": 1, "request_counts": {"total": 2}}


def _line(custom_id: str, answer: str) -> dict:
    return {"id": "batch_req_1", "custom_id": custom_id, "response": {"status_code": 200, "body": answer},
            "error": None}


async def _saved(store, tenant: str, batch: dict) -> None:
    assert await store.claim(batch["id"])
    await store.save(tenant, batch)


def test_a_batch_is_its_tenants_own_and_outlives_its_store(new_store):
    async def scenario():
        store = new_store()
        await _saved(store, "alice", _batch("batch_a1"))
        await _saved(store, "bob", _batch("batch_b1", "completed"))
        assert await store.get("alice", "batch_a1") == _batch("batch_a1")
        assert await store.get("bob", "batch_a1") is None  # another key's batch is as if it never was
        assert [b["id"] for b in await store.list("alice")] == ["batch_a1"]
        await store.close()
        again = new_store()
        try:
            assert await again.get("alice", "batch_a1") == _batch("batch_a1")
            assert sorted((t, b["id"]) for t, b in await again.all()) == [("alice", "batch_a1"), ("bob", "batch_b1")]
        finally:
            await again.close()

    asyncio.run(scenario())


def test_ids_that_are_not_batch_ids_never_become_paths(tmp_path):
    async def scenario():
        store = LocalBatchStore(tmp_path)
        try:
            (tmp_path / "secret.json").write_text('{"tenant": "alice", "batch": {"id": "x"}}')
            for batch_id in ("../secret", "batch_../../secret", "batch_a/b", "x" * 70):
                assert await store.get("alice", batch_id) is None
        finally:
            await store.close()

    asyncio.run(scenario())


def test_each_custom_id_is_one_result_the_first_stored(new_store):
    """A line answered twice (by a gateway that died before the batch went on and by the one that
    resumed it, or by two gateways) is one result: the first answer stored."""

    async def scenario():
        store = new_store()
        try:
            assert await store.claim("batch_a1")  # on a shared store only the lease's holder writes results
            await store.add_result("batch_a1", _line("one", "first"))
            await store.add_result("batch_a1", _line("two", "second"))
            await store.add_result("batch_a1", _line("one", "again"))
            results = await store.results("batch_a1")
            assert sorted(results) == ["one", "two"]
            assert results["one"]["response"]["body"] == "first"
            assert await store.results("batch_none") == {}
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_line_cut_short_by_a_crash_is_skipped(tmp_path):
    """The local store appends: a half-written last line (the process killed while appending) is
    not a result, and the next line is."""

    async def scenario():
        store = LocalBatchStore(tmp_path)
        try:
            await store.add_result("batch_a1", _line("one", "first"))
            with open(tmp_path / "batches" / "batch_a1.results", "ab") as out:
                out.write(b'{"id": "batch_req_2", "custom_id": "thr')
            await store.add_result("batch_a1", _line("four", "after the crash"))
            assert sorted(await store.results("batch_a1")) == ["four", "one"]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_cancel_is_kept_apart_from_the_batch(new_store):
    async def scenario():
        store = new_store()
        try:
            assert await store.cancelled_at("batch_a1") is None
            await _saved(store, "alice", _batch("batch_a1"))
            await store.cancel("batch_a1")
            await store.save("alice", _batch("batch_a1"))  # the runner's next save does not undo it
            assert isinstance(await store.cancelled_at("batch_a1"), int)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_an_ended_batchs_progress_is_forgotten_and_the_batch_kept(new_store):
    """Once a batch has ended its output file holds its lines: the store drops its own copy of them
    and the cancel asked, and keeps the batch."""

    async def scenario():
        store = new_store()
        try:
            await _saved(store, "alice", _batch("batch_a1"))
            await store.add_result("batch_a1", _line("one", "first"))
            await store.cancel("batch_a1")
            await store.save("alice", _batch("batch_a1", "cancelled"))
            await store.forget_progress("batch_a1")
            assert await store.results("batch_a1") == {}
            assert await store.cancelled_at("batch_a1") is None
            assert (await store.get("alice", "batch_a1"))["status"] == "cancelled"
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_batch_is_leased_to_one_gateway_at_a_time_until_its_lease_lapses(redis_server):
    """Two gateways' stores: the second cannot take a batch the first holds, nor write it; once the
    first stops renewing, the lease lapses, the second takes it, and the first can no longer write
    it (nor renew or release the second's lease)."""

    async def scenario():
        first, second = (RedisBatchStore(redis_server.url, lease_ttl_s=0.5, namespace="test-leases:")
                         for _ in range(2))
        try:
            await _saved(first, "alice", _batch("batch_a1"))
            assert not await second.claim("batch_a1")
            with pytest.raises(LeaseLost):
                await second.save("alice", _batch("batch_a1", "completed"))
            await asyncio.sleep(0.3)
            assert await first.renew("batch_a1")  # renewed: still the first's after its first TTL
            await asyncio.sleep(0.3)
            assert not await second.claim("batch_a1")
            await asyncio.sleep(0.6)  # not renewed: lapsed
            assert await second.claim("batch_a1")
            assert not await first.renew("batch_a1")
            with pytest.raises(LeaseLost):
                await first.save("alice", _batch("batch_a1", "cancelled"))
            with pytest.raises(LeaseLost):  # nor its results: once ended, the batch would not read them
                await first.add_result("batch_a1", _line("one", "late"))
            assert await second.results("batch_a1") == {}
            await first.release("batch_a1")  # not the first's to release
            await second.save("alice", _batch("batch_a1", "completed"))
            assert (await first.get("alice", "batch_a1"))["status"] == "completed"
            await second.release("batch_a1")
            assert await first.claim("batch_a1")  # released: free at once
        finally:
            await first.close()
            await second.close()

    asyncio.run(scenario())
