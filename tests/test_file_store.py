"""The Redis file store (--files-url) against a real redis-server."""

import asyncio

import media
from server.api.files import RedisFileStore


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
