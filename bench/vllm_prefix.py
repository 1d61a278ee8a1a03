"""vLLM's prefix cache on prompt-embedding requests, read off vLLM's own counters (a benchmark,
not a test): chats whose turns grow by a few KV blocks each, sent straight to vLLM as the
gateway's engine sends them.

    make vllm-start MODEL=model_repo/tiny VLLM_PORT=8100     # add -- --block-size 32 to compare
    uv run python bench/vllm_prefix.py --vllm http://127.0.0.1:8100 --model model_repo/tiny

Each of `--chats` video chats has `--turns` turns; turn t's prompt is the whole chat so far (the
attachment, the questions, the answers), as every OpenAI client resends it. Every turn is sent
twice: cold, under a salt of its own (no block of it can be cached), then warm, under the chat's
salt (blocks of the chat's earlier turns can). Per turn: prompt rows, vLLM's prefix-cache queries
and hits of the warm request, and TTFT cold and warm.
"""

import argparse
import asyncio
import statistics
import time

import httpx

from load import completions_body, make_item, prompt_embeddings, scrape, served_model, spent, stream
from server.model.onellm import load_model

ANSWER = ("The clip shows a street at dusk: cars pass from left to right, a cyclist waits at the "
          "crossing, and the lights of the shops come on one after another along the pavement.")
QUESTIONS = ["What colour is the car that passes first, and where does it go?",
             "Is the cyclist still waiting when the clip ends, or has the light changed?",
             "Describe the shop fronts on the far side of the street, from left to right.",
             "How would the scene look an hour later, when it is fully dark?"]


async def send(client: httpx.AsyncClient, vllm: str, body: bytes) -> tuple[float, float, float]:
    """(TTFT in ms, prefix-cache queries, hits) of one request."""
    before = await scrape(client, vllm)
    result = await stream(client, f"{vllm}/v1/completions", body)
    after = await scrape(client, vllm)
    if result.error:
        raise SystemExit(f"vLLM refused the request: {result.error}")
    counted = [spent(before, after, f"vllm:prefix_cache_{kind}_total") for kind in ("queries", "hits")]
    return result.ttft * 1e3, *counted


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm", default="http://127.0.0.1:8100", help="vLLM OpenAI server")
    parser.add_argument("--model", default="model_repo/tiny", help="the model folder vLLM serves the LLM of")
    parser.add_argument("--chats", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4, help="at most len(QUESTIONS)")
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()

    model = load_model(args.model)
    served = await served_model(args.vllm)
    run = time.time_ns()  # salts of an earlier run against the same vLLM never match
    rows: dict[int, list[tuple]] = {t: [] for t in range(args.turns)}
    async with httpx.AsyncClient(timeout=600) as client:
        for chat in range(args.chats):
            item = make_item("video", 700_000 + chat)
            history: list[tuple[str, str]] = []
            for turn in range(args.turns):
                if turn:
                    history += [("assistant", ANSWER), ("user", QUESTIONS[turn - 1])]
                embeddings = prompt_embeddings(model, item, history)
                cold = await send(client, args.vllm, completions_body(
                    embeddings, served, args.max_tokens, f"cold-{run}-{chat}-{turn}"))
                warm = await send(client, args.vllm, completions_body(
                    embeddings, served, args.max_tokens, f"chat-{run}-{chat}"))
                rows[turn].append((embeddings.shape[0], cold[0], warm[0], warm[1], warm[2]))

    print(f"{args.chats} chats, {args.max_tokens} tokens each, vLLM {args.vllm}\n")
    print("| turn | prompt rows | warm: queried / hit tokens (sum) | TTFT cold p50 (ms) | TTFT warm p50 (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for turn, samples in rows.items():
        length, cold, warm, queries, hits = zip(*samples)
        print(f"| {turn + 1} | {statistics.median(length):.0f} | {sum(queries):.0f} / {sum(hits):.0f} "
              f"| {statistics.median(cold):.1f} | {statistics.median(warm):.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
