"""Admission's two priorities: a waiting online request always gets the next slot before a waiting
batch line, whoever waited first; batch lines do not fill the online queue, and start beside online
requests only as far as `batch_beside_online` allows, free slots or not. Below admission, the work
of a request knows its priority, and the online requests holding a slot are counted for the batch
lines already running to yield to."""

import asyncio

import httpx
from fastapi import FastAPI, Request

from server.engines.priority import request_priority
from server.entrypoints.batches.lines import line_sender
from server.metrics import Metrics
from server.traffic.admission import BATCH, ONLINE, Admission, ChatGuard, Overloaded
from server.traffic.routes import chat_route


async def _holding(admission: Admission, caller: str, priority: int, order: list[str], go: asyncio.Event):
    async with admission.slot(caller, priority):
        order.append(caller)
        await go.wait()


def test_an_online_request_is_admitted_before_batch_lines_that_waited_longer():
    async def scenario() -> list[str]:
        admission, order, go = Admission(max_concurrent=1, max_queued=1), [], asyncio.Event()
        tasks = [asyncio.create_task(_holding(admission, "first", ONLINE, order, go))]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(_holding(admission, f"line{i}", BATCH, order, go)) for i in range(3)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(_holding(admission, "online", ONLINE, order, go)))
        await asyncio.sleep(0)
        assert (admission.waiting_at(ONLINE), admission.waiting_at(BATCH)) == (1, 3)
        go.set()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["first", "online", "line0", "line1", "line2"]


def test_batch_lines_wait_beyond_max_queued_and_online_requests_do_not():
    async def scenario() -> None:
        admission, order, go = Admission(max_concurrent=1, max_queued=1), [], asyncio.Event()
        tasks = [asyncio.create_task(_holding(admission, "first", ONLINE, order, go))]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(_holding(admission, f"line{i}", BATCH, order, go)) for i in range(5)]
        tasks.append(asyncio.create_task(_holding(admission, "queued", ONLINE, order, go)))
        await asyncio.sleep(0)
        try:
            async with admission.slot("one too many", ONLINE):
                raise AssertionError("admitted past max_queued")
        except Overloaded:
            pass
        go.set()
        await asyncio.gather(*tasks)
        assert len(order) == 7 and admission.waiting_at(BATCH) == 0

    asyncio.run(scenario())


async def _started(admission: Admission, holders: dict[str, asyncio.Event], caller: str, priority: int,
                   order: list[str]) -> asyncio.Task:
    holders[caller] = asyncio.Event()
    task = asyncio.create_task(_holding(admission, caller, priority, order, holders[caller]))
    await asyncio.sleep(0)
    return task


def test_batch_lines_wait_while_online_requests_run_even_with_slots_free_and_all_start_after():
    async def scenario() -> None:
        admission, order, holders = Admission(max_concurrent=4, max_queued=4), [], {}
        tasks = [await _started(admission, holders, "online", ONLINE, order)]
        tasks += [await _started(admission, holders, f"line{i}", BATCH, order) for i in range(2)]
        assert order == ["online"] and admission.waiting_at(BATCH) == 2
        tasks.append(await _started(admission, holders, "another", ONLINE, order))
        assert order == ["online", "another"]  # online traffic passes the waiting lines
        holders["online"].set()
        await asyncio.sleep(0)
        assert order == ["online", "another"]  # one online request still runs
        holders["another"].set()
        for _ in range(3):
            await asyncio.sleep(0)
        assert order == ["online", "another", "line0", "line1"]  # the last one's end starts both
        for holder in holders.values():
            holder.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_batch_beside_online_lets_that_many_lines_run_beside_online_requests():
    async def scenario() -> None:
        admission, order, holders = Admission(max_concurrent=4, max_queued=4, batch_beside_online=1), [], {}
        tasks = [await _started(admission, holders, "online", ONLINE, order)]
        tasks += [await _started(admission, holders, f"line{i}", BATCH, order) for i in range(3)]
        assert order == ["online", "line0"] and admission.waiting_at(BATCH) == 2
        holders["line0"].set()
        for _ in range(3):
            await asyncio.sleep(0)
        assert order == ["online", "line0", "line1"]  # line0's end lets the next one in, not two
        holders["online"].set()
        for _ in range(3):
            await asyncio.sleep(0)
        assert order == ["online", "line0", "line1", "line2"]
        for holder in holders.values():
            holder.set()
        await asyncio.gather(*tasks)
        assert admission.waiting_at(BATCH) == 0 and admission._free == 4

    asyncio.run(scenario())


def test_live_traffic_counts_the_online_requests_holding_a_slot_and_no_batch_line():
    async def scenario() -> None:
        admission, order, holders = Admission(max_concurrent=4, max_queued=4), [], {}
        tasks = [await _started(admission, holders, "online", ONLINE, order)]
        tasks.append(await _started(admission, holders, "line", BATCH, order))
        tasks.append(await _started(admission, holders, "another", ONLINE, order))
        assert admission.live.serving == 2
        holders["online"].set()
        holders["another"].set()
        for _ in range(3):
            await asyncio.sleep(0)
        assert order[-1] == "line" and admission.live.serving == 0  # the line runs, counted nowhere
        holders["line"].set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_the_work_behind_admission_runs_at_its_request_priority():
    app = FastAPI()

    @app.post("/v1/chat/completions")
    @chat_route
    async def priority_seen() -> dict:  # what every layer below reads
        return {"priority": request_priority.get()}

    app.add_middleware(ChatGuard, admission=Admission(max_concurrent=2, max_queued=2), timeout_s=30,
                       metrics=Metrics(), stream_error=str)

    async def scenario() -> tuple[dict, dict]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway") as client:
            online = (await client.post("/v1/chat/completions", json={})).json()
        _, line = await line_sender(app)("-", "caller", "/v1/chat/completions", b"{}", "req-1")
        return online, line

    assert asyncio.run(scenario()) == ({"priority": ONLINE}, {"priority": BATCH})


def test_a_batch_lines_deadline_stands_still_while_online_requests_are_served():
    """A running line takes no step while online traffic is served; the time it waits is not counted
    against request_timeout_s. Without online traffic the deadline still ends it."""
    app = FastAPI()
    admission = Admission(max_concurrent=2, max_queued=2)
    started = asyncio.Event()

    @app.post("/v1/chat/completions")
    @chat_route
    async def slow(request: Request) -> dict:
        await request.body()  # admitted once its body is read, as every chat endpoint does
        started.set()
        await asyncio.sleep(1.2)
        return {"done": True}

    app.add_middleware(ChatGuard, admission=admission, timeout_s=0.6, metrics=Metrics(), stream_error=str)

    async def scenario() -> tuple[int, int]:
        send = line_sender(app)
        line = asyncio.create_task(send("-", "caller", "/v1/chat/completions", b"{}", "req-1"))
        await started.wait()
        admission.live.enter()  # an online request served for 1 s: the line waits that long
        await asyncio.sleep(1.0)
        admission.live.leave()
        paused, _ = await line
        started.clear()
        alone, _ = await send("-", "caller", "/v1/chat/completions", b"{}", "req-2")
        return paused, alone

    assert asyncio.run(scenario()) == (200, 504)
