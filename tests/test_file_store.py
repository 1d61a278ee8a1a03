"""The Redis file store (--files-url) against a real redis-server."""

import asyncio
import random

import media
from server.storage.file_records import PIECE_BYTES
from server.storage.local_files import LocalFileStore
from server.storage.redis_files import RedisFileStore


def test_a_redis_restart_costs_no_request(redis_server):
    """A restarted Redis has closed every pooled connection: the next request retries on a new one
    rather than failing with a 503. (This Redis keeps nothing across the restart, so the file is
    gone; the deployments' files store keeps its data on disk.)"""
    data = media.image("png", seed=1601)

    async def scenario():
        store = RedisFileStore(redis_server.url)
        try:
            before = await store.add("key", data, "a.png", "vision", 3600, "image")
            assert await store.get("key", before.id) == before
            redis_server.stop()
            redis_server.start()
            assert await store.get("key", before.id) is None
            after = await store.add("key", data, "a.png", "vision", 3600, "image")
            assert await store.content("key", after.id) == (after, data)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_both_stores_stream_a_file_in_pieces_of_at_most_piece_bytes(redis_server, tmp_path):
    """A download reads the blob a piece at a time (a file of 2.5 pieces: three, the last short),
    and the pieces are the stored bytes; a file that is not there streams nothing."""
    data = random.Random(1602).randbytes(PIECE_BYTES * 5 // 2)

    async def pieces_of(store) -> list[bytes]:
        try:
            record = await store.add("key", data, "blob.bin", "user_data", 3600, "")
            assert await store.stream("other-key", record.id) is None
            found, pieces = await store.stream("key", record.id)
            assert found == record
            return [piece async for piece in pieces]
        finally:
            await store.close()

    for store in (LocalFileStore(tmp_path), RedisFileStore(redis_server.url)):
        pieces = asyncio.run(pieces_of(store))
        assert [len(piece) for piece in pieces] == [PIECE_BYTES, PIECE_BYTES, PIECE_BYTES // 2], store.name
        assert b"".join(pieces) == data, store.name


def test_bytes_another_tenant_stored_are_written_again_and_kept_once(redis_server, tmp_path):
    """An upload whose bytes a store already holds does the work of new bytes: skipping it would
    answer sooner, telling the uploader that someone (another tenant too) had uploaded the same
    file. The bytes are still kept once."""
    data = media.image("png", seed=1603)

    async def local_inodes() -> list[int]:
        store = LocalFileStore(tmp_path)
        try:
            inodes = []
            for tenant in ("key:a", "key:b"):
                record = await store.add(tenant, data, "a.png", "vision", 3600, "image")
                inodes.append((tmp_path / "blobs" / record.sha256).stat().st_ino)
            assert len(list((tmp_path / "blobs").iterdir())) == 1
            return inodes
        finally:
            await store.close()

    async def redis_writes() -> list[tuple[int, bool]]:
        """For each upload: the SETs Redis ran (the blob's and, in the script, the record's) and
        whether the bytes reached it."""
        store = RedisFileStore(redis_server.url, namespace="onellm:files-twice:")

        async def counts() -> tuple[int, int]:
            return ((await store.client.info("commandstats")).get("cmdstat_set", {}).get("calls", 0),
                    (await store.client.info("stats"))["total_net_input_bytes"])

        try:
            writes = []
            for tenant in ("key:a", "key:b"):
                sets, received = await counts()
                record = await store.add(tenant, data, "a.png", "vision", 3600, "image")
                sets_after, received_after = await counts()
                writes.append((sets_after - sets, received_after - received > len(data)))
                assert await store.content(tenant, record.id) == (record, data)
            blob = f"onellm:files-twice:blob:{record.sha256}".encode()
            assert await store.client.keys("onellm:files-twice:blob:*") == [blob]
            return writes
        finally:
            await store.close()

    first, second = asyncio.run(local_inodes())
    assert first != second  # the blob was written again (and replaced whole)
    assert asyncio.run(redis_writes()) == [(2, True), (2, True)]
