"""Many users sending the same new file at once (a benchmark): a shared link, a demo picture.

    uv run onellm serve --port 8180 &            # any gateway; the embedded engine is enough
    uv run python bench/burst.py --url http://127.0.0.1:8180 --clients 16 --modality video

For each of `--rounds` rounds a new file (bytes never sent before, so the prefix cache cannot
answer) goes to the gateway from `--clients` streaming clients at the same moment. Reported:
their time to first token, and from the gateway's /metrics how many decodes and encoder runs
the burst cost, and how many requests waited for another's run of the same bytes.
"""

import argparse
import asyncio
import json

import httpx

from load import chat_body, content_parts, percentiles, run_clients, scrape, spent, stream
from media import MIX, make_item

SEED = 900_000


async def burst(url: str, clients: int, modality: str, seed: int, max_tokens: int) -> dict:
    body = chat_body([{"role": "user", "content": content_parts(make_item(modality, seed))}], max_tokens)
    results = []
    gate = asyncio.Barrier(clients)

    async def send(client: httpx.AsyncClient) -> None:
        await client.get(f"{url}/health")  # connected before the barrier: the requests leave together
        await gate.wait()
        results.append(await stream(client, f"{url}/v1/chat/completions", body))

    async with httpx.AsyncClient() as client:
        before = await scrape(client, url)
        await run_clients(clients, send)
        after = await scrape(client, url)
    if errors := [r.error for r in results if r.error]:
        raise SystemExit(f"{len(errors)} requests failed, the first: {errors[0]}")

    def grew(name: str) -> float:
        return spent(before, after, name, modality=modality)

    counted = {"decodes": grew("onellm_preprocess_seconds_count"), "encoder_runs": grew("onellm_encoder_runs_total"),
               "shared": grew("onellm_prefix_shared_runs_total"), "cache_hits": grew("onellm_prefix_cache_hits_total")}
    return {"ttft": [r.ttft for r in results], **counted}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--modality", default="video", choices=MIX)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="a second run against the same gateway needs another")
    args = parser.parse_args()

    first = SEED + 1000 * args.seed  # each run's files apart from another seed's
    await burst(args.url, 1, args.modality, first + 999, args.max_tokens)  # warm-up
    rounds = [await burst(args.url, args.clients, args.modality, first + k, args.max_tokens)
              for k in range(args.rounds)]
    per_round = {name: sum(r[name] for r in rounds) / len(rounds)
                 for name in ("decodes", "encoder_runs", "shared", "cache_hits")}
    print(json.dumps({"clients": args.clients, "modality": args.modality, "rounds": args.rounds,
                      "per_round": per_round,
                      "ttft_ms": percentiles([t for r in rounds for t in r["ttft"]], (50, 95))}))


if __name__ == "__main__":
    asyncio.run(main())
