"""The local batch store (a folder beside the uploaded files): a batch is its key's own, its finished
lines are kept one per custom_id, and everything survives a new store over the same folder (a
restarted gateway)."""

import asyncio

from server.storage.local_batches import LocalBatchStore


def _batch(batch_id: str, status: str = "in_progress") -> dict:
    return {"id": batch_id, "object": "batch", "status": status, "request_counts": {"total": 2}}


def _line(custom_id: str, answer: str) -> dict:
    return {"id": "batch_req_1", "custom_id": custom_id, "response": {"status_code": 200, "body": answer},
            "error": None}


def test_a_batch_is_its_tenants_own_and_outlives_its_store(tmp_path):
    async def scenario():
        store = LocalBatchStore(tmp_path)
        await store.save("alice", _batch("batch_a1"))
        await store.save("bob", _batch("batch_b1", "completed"))
        assert await store.get("alice", "batch_a1") == _batch("batch_a1")
        assert await store.get("bob", "batch_a1") is None  # another key's batch is as if it never was
        assert [b["id"] for b in await store.list("alice")] == ["batch_a1"]
        await store.close()
        again = LocalBatchStore(tmp_path)
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


def test_each_custom_id_is_one_result_and_a_line_cut_by_a_crash_is_skipped(tmp_path):
    """A line answered again after a restart replaces the earlier answer; a half-written last line
    (the process killed while appending) is not a result."""

    async def scenario():
        store = LocalBatchStore(tmp_path)
        try:
            await store.add_result("batch_a1", _line("one", "first"))
            await store.add_result("batch_a1", _line("two", "second"))
            await store.add_result("batch_a1", _line("one", "again"))
            with open(tmp_path / "batches" / "batch_a1.results", "ab") as out:
                out.write(b'{"id": "batch_req_2", "custom_id": "thr')
            await store.add_result("batch_a1", _line("four", "after the crash"))
            results = await store.results("batch_a1")
            assert sorted(results) == ["four", "one", "two"]
            assert results["one"]["response"]["body"] == "again"
            assert await store.results("batch_none") == {}
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_cancel_is_kept_apart_from_the_batch(tmp_path):
    async def scenario():
        store = LocalBatchStore(tmp_path)
        try:
            assert await store.cancelled_at("batch_a1") is None
            await store.save("alice", _batch("batch_a1"))
            await store.cancel("batch_a1")
            await store.save("alice", _batch("batch_a1"))  # the runner's next save does not undo it
            assert isinstance(await store.cancelled_at("batch_a1"), int)
        finally:
            await store.close()

    asyncio.run(scenario())
