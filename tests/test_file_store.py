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
