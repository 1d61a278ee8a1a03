"""What counting per-key limits in Redis costs a request: the admit script on the way in and the
lease's release on the way out, timed one after another (a benchmark).

    redis-server --port 6390 --save '' --appendonly no &
    uv run python bench/shared_quotas.py --url redis://127.0.0.1:6390/0

Each request admits under `max_concurrent` and `per_minute` (both scripts' branches), then
releases its lease; `--callers` keys take turns. Prints a markdown table of milliseconds.
"""

import argparse
import asyncio
import statistics
import time

from server.cache.redis_client import SharedRedis
from server.metrics import Metrics
from server.traffic.shared_quotas import SharedQuotas


def row(name: str, samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return (f"| {name} | {statistics.mean(ms):.3f} | {ms[len(ms) // 2]:.3f} | {ms[int(len(ms) * 0.99)]:.3f} |")


async def measure(url: str, requests: int, callers: int) -> None:
    redis = SharedRedis(url, 1.0, Metrics())
    await redis.start()
    quotas = SharedQuotas(redis, 30.0, redis.metrics)
    admits, releases = [], []
    for n in range(requests):
        started = time.perf_counter()
        verdict, lease = await quotas.admit(f"bench-{n % callers}", 10**6, 10**6)
        admitted = time.perf_counter()
        assert verdict is not None and verdict.limit is None, verdict
        await quotas.release(lease)
        admits.append(admitted - started)
        releases.append(time.perf_counter() - admitted)
    await quotas.close()
    await redis.close()
    print(f"{requests} requests, {callers} callers\n\n| step | mean ms | p50 ms | p99 ms |\n|---|---:|---:|---:|")
    print(row("admit (Lua script)", admits))
    print(row("release (ZREM)", releases))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a Redis to count in (its onellm:quota:* keys are written)")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--callers", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(measure(args.url, args.requests, args.callers))


if __name__ == "__main__":
    main()
