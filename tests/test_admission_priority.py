"""Admission's two priorities: a waiting online request always gets the next slot before a waiting
batch line, whoever waited first; batch lines do not fill the online queue."""

import asyncio

from server.traffic.admission import BATCH, ONLINE, Admission, Overloaded


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
