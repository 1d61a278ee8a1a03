"""The Batch API's runner: each batch's lines sent, at most `batch_max_in_flight` at once for all
batches together, through the same way in as an online request (`dispatch`: the app itself, where
admission serves every waiting online request before a batch line), each answer stored as it comes.

A batch goes validating -> in_progress -> finalizing -> completed (or failed, cancelling ->
cancelled, expired). Everything it needs is in the store, so a gateway that starts again picks up
every unfinished batch where its stored results end; a line answered but not yet stored when the
gateway died is sent again, and kept once.

A store shared by several gateways (Redis) gives each batch to one gateway at a time by a lease:
the runner renews it while the batch runs and releases it when it ends or the gateway stops; every
gateway looks every half lease for unfinished batches whose lease lapsed (their gateway died) and
takes them over. A cancel asked at any gateway is written to the store, where the runner sees it."""

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from server.core.batch_lines import BatchLine, answered_line, new_line_id, result_files, tally
from server.errors import RequestError
from server.metrics import Metrics
from server.storage.batch_records import FINAL_STATES, LeaseLost

log = logging.getLogger("onellm.batches")
# answers that say the gateway is busy (its upload places, memory budget, queue): the line is sent again
# after a pause, until the batch expires, rather than failed for what online traffic happened to take
BUSY, BUSY_RETRY_S = (429, 503), 1.0
# how often a runner on a shared store looks for a cancel asked at another gateway (and renews its lease)
CANCEL_CHECK_S = 1.0
# (tenant, caller, url, JSON body, request id) -> (HTTP status, JSON answer)
Dispatch = Callable[[str, str, str, bytes, str], Awaitable[tuple[int, dict]]]
# a batch's lines queue as the caller that created it (traffic/access.py caller_of), kept in the batch under
# this key and never shown: the Batch API's bodies leave it out
CALLER = "caller"
# (tenant, batch) -> its input lines, or the errors that make it fail (OpenAI's error objects, each naming its line)
ReadInput = Callable[[str, dict], Awaitable[tuple[list[BatchLine], list[dict]]]]


class BatchRunner:
    def __init__(self, store, files, settings, metrics: Metrics, dispatch: Dispatch, read_input: ReadInput,
                 stopping: Callable[[], bool]):
        self.store, self.files, self.metrics = store, files, metrics
        self.dispatch, self.read_input, self.stopping = dispatch, read_input, stopping
        self.output_ttl_s = settings.file_ttl_s
        self._in_flight = asyncio.Semaphore(settings.batch_max_in_flight)
        self._runs: dict[str, asyncio.Task] = {}
        self._sending: dict[str, list[asyncio.Task]] = {}  # each running batch's lines in flight
        self._batches: dict[str, dict] = {}  # each running batch, as its run has it: the one copy written
        self._cancelled: set[str] = set()
        self._states: Counter[str] = Counter()
        self._scan: asyncio.Task | None = None

    async def start(self) -> None:
        """Counts the stored batches by state, and resumes every unfinished one no other gateway runs;
        on a shared store, looks again every half lease for those whose gateway went silent."""
        try:
            await self._take_over()
        except RequestError as e:  # the shared store is down: the next look finds the batches
            log.error("batches not resumed yet: %s", e.message)
        if self.store.shared:
            self._scan = asyncio.create_task(self._keep_taking_over())

    async def close(self) -> None:
        for task in (self._scan, *self._runs.values()):
            if task is not None:
                task.cancel()
        await asyncio.gather(*self._runs.values(), return_exceptions=True)

    async def _take_over(self) -> None:
        stored = await self.store.all()
        self._recount(stored)
        for tenant, batch in stored:
            if batch["status"] in FINAL_STATES or batch["id"] in self._runs or self.stopping():
                continue
            if await self.store.claim(batch_id := batch["id"]):
                # read again under the lease: its runner may have finished it since the listing
                batch = await self.store.get(tenant, batch_id)
                if batch is None or batch["status"] in FINAL_STATES:
                    await self._release(batch_id)
                    continue
                if self.store.shared:
                    log.info("batch %s taken over (%d lines done)", batch["id"], sum(
                        batch["request_counts"][n] for n in ("completed", "failed")))
                self._launch(tenant, batch)

    async def _keep_taking_over(self) -> None:
        while True:
            await asyncio.sleep(self.store.lease_ttl_s / 2)
            try:
                await self._take_over()
            except RequestError as e:
                log.warning("could not look for batches to take over: %s", e.message)

    async def create(self, tenant: str, batch: dict) -> None:
        await self.store.claim(batch["id"])  # a new id: no other gateway holds it
        await self.store.save(tenant, batch)
        self._count(batch["status"], 1)
        self._launch(tenant, batch)

    async def cancel(self, tenant: str, batch: dict) -> dict:
        """Asks a batch to stop: no new line is sent, the finished ones are kept. A batch that another
        gateway runs (or that waits to be taken over) finds the cancel in the store."""
        await self.store.cancel(batch["id"])
        if batch["id"] not in self._batches:
            if batch["status"] in ("validating", "in_progress"):
                return {**batch, "status": "cancelling", "cancelling_at": int(time.time())}
            return batch
        batch = self._batches[batch["id"]]
        self._cancelled.add(batch["id"])
        for task in self._sending.get(batch["id"], ()):  # lines still waiting for a slot, or being answered
            task.cancel()
        if batch["status"] in ("validating", "in_progress"):
            await self._set_status(tenant, batch, "cancelling")
        return batch

    def _launch(self, tenant: str, batch: dict) -> None:
        run = asyncio.create_task(self._run(tenant, batch))
        self._runs[batch["id"]], self._batches[batch["id"]] = run, batch
        run.add_done_callback(lambda _: (self._runs.pop(batch["id"], None), self._batches.pop(batch["id"], None)))
        if self.store.shared:
            keeper = asyncio.create_task(self._keep_lease(tenant, batch, run))
            run.add_done_callback(lambda _: keeper.cancel())

    async def _keep_lease(self, tenant: str, batch: dict, run: asyncio.Task) -> None:
        """Renews the batch's lease while it runs, and passes a cancel asked elsewhere on to it; a lease
        lost (this gateway stalled past its TTL and another took the batch over) stops the run here."""
        while True:
            await asyncio.sleep(min(CANCEL_CHECK_S, self.store.lease_ttl_s / 3))
            try:
                lost = not await self.store.renew(batch["id"])
                if not lost and batch["id"] not in self._cancelled \
                        and await self.store.cancelled_at(batch["id"]) is not None:
                    await self.cancel(tenant, batch)
            except RequestError as e:  # the lease lapses if this goes on: another gateway takes over
                log.warning("batch %s: lease not renewed: %s", batch["id"], e.message)
                continue
            except LeaseLost:
                lost = True
            if lost:
                log.warning("batch %s: lease lost, another gateway runs it now", batch["id"])
                run.cancel()
                return

    async def _release(self, batch_id: str) -> None:
        try:
            await self.store.release(batch_id)
        except RequestError:
            pass  # the lease lapses by itself

    async def _run(self, tenant: str, batch: dict) -> None:
        try:
            if await self.store.cancelled_at(batch["id"]) is not None:
                self._cancelled.add(batch["id"])
            lines = await self._validated(tenant, batch)
            if batch["status"] == "in_progress":
                await self._answer_all(tenant, batch, lines)
            if batch["status"] in ("in_progress", "finalizing", "cancelling") and not self.stopping():
                await self._finish(tenant, batch, lines)
        # the store is unavailable: the batch stays as stored, resumed on a restart (or, in Redis, taken
        # over by the next look of any gateway once Redis answers)
        except RequestError as e:
            log.error("batch %s stopped: %s", batch["id"], e.message)
        except LeaseLost:
            log.warning("batch %s: another gateway runs it now (this one's lease lapsed)", batch["id"])
        finally:  # ended, or this gateway stops: another may take it over at once
            await self._release(batch["id"])

    async def _validated(self, tenant: str, batch: dict) -> list[BatchLine]:
        lines, errors = await self.read_input(tenant, batch)
        if batch["status"] != "validating":
            return lines
        if errors:
            batch["errors"] = {"object": "list", "data": errors}
            await self._set_status(tenant, batch, "failed")
        elif batch["id"] in self._cancelled:
            await self._set_status(tenant, batch, "cancelling")
        else:
            batch["request_counts"]["total"] = len(lines)
            await self._set_status(tenant, batch, "in_progress")
        return lines

    async def _answer_all(self, tenant: str, batch: dict, lines: list[BatchLine]) -> None:
        results = await self.store.results(batch["id"])
        tally(batch, results)
        sending = self._sending[batch["id"]] = []
        try:
            for line in (line for line in lines if line.custom_id not in results):
                await self._in_flight.acquire()
                if self._halted(batch):
                    self._in_flight.release()
                    break
                self.metrics.batch_lines_in_flight.inc()
                task = asyncio.create_task(self._answer(tenant, batch, line, results))
                task.add_done_callback(self._line_ended)  # also when cancelled before it started
                sending.append(task)
            if sending:
                await asyncio.wait(sending)
            # a failing store, or the lease lost: the batch stays as stored (every failure read, so none is
            # logged as never retrieved)
            failures = [task.exception() for task in sending if not task.cancelled() and task.exception()]
            if failures:
                raise failures[0]
        finally:  # the gateway stopping: the lines being answered are sent again when it starts
            for task in self._sending.pop(batch["id"]):
                task.cancel()

    def _halted(self, batch: dict) -> bool:
        return self.stopping() or batch["id"] in self._cancelled or time.time() >= batch["expires_at"]

    def _line_ended(self, _: asyncio.Task) -> None:
        self.metrics.batch_lines_in_flight.dec()
        self._in_flight.release()

    async def _answer(self, tenant: str, batch: dict, line: BatchLine, results: dict[str, dict]) -> None:
        line_id = new_line_id()
        status, body = await self.dispatch(tenant, batch.get(CALLER, ""), line.url, line.body, line_id)
        while status in BUSY and not self._halted(batch):  # the gateway's capacity, not the line, refused it
            await asyncio.sleep(BUSY_RETRY_S)
            status, body = await self.dispatch(tenant, batch.get(CALLER, ""), line.url, line.body, line_id)
        if self.stopping():  # a gateway shutting down refuses it: sent again after the restart
            return
        results[line.custom_id] = result = answered_line(line, line_id, status, body)
        await self.store.add_result(batch["id"], result)
        self.metrics.batch_lines.labels("completed" if status == 200 else "failed").inc()
        tally(batch, results)
        await self.store.save(tenant, batch)

    async def _finish(self, tenant: str, batch: dict, lines: list[BatchLine]) -> None:
        """The output and error files of what was answered, then the batch's last state: cancelled,
        expired (some lines never answered in time) or completed. The store's copy of the answered
        lines is then dropped: the files hold them, and expire (file_ttl_s); the store would keep them for good."""
        if batch["status"] == "in_progress":
            await self._set_status(tenant, batch, "finalizing")
        results = await self.store.results(batch["id"])
        tally(batch, results)
        expired = batch["status"] == "finalizing" and len(results) < len(lines)
        output, errors = result_files(lines, results, expired)
        for data, field, name in ((output, "output_file_id", "output"), (errors, "error_file_id", "errors")):
            if data:
                record = await self.files.add(tenant, data, f"{batch['id']}_{name}.jsonl", "batch_output",
                                              self.output_ttl_s, "text")
                batch[field] = record.id
        ending = "cancelled" if batch["status"] == "cancelling" else "expired" if expired else "completed"
        await self._set_status(tenant, batch, ending)
        # only once the ended batch is stored: a gateway dying before then finishes it again from its results
        await self.store.forget_progress(batch["id"])

    async def _set_status(self, tenant: str, batch: dict, status: str) -> None:
        self._count(batch["status"], -1)
        self._count(status, 1)
        batch["status"] = status
        batch[f"{status}_at"] = int(time.time())
        await self.store.save(tenant, batch)

    def _recount(self, stored: list[tuple[str, dict]]) -> None:
        """The batches by state as stored (on a shared store: every gateway's, as of this look)."""
        counts = Counter(batch["status"] for _, batch in stored)
        for state in set(self._states) | set(counts):
            self._states[state] = counts[state]
            self.metrics.batches.labels(state).set(counts[state])

    def _count(self, state: str, change: int) -> None:
        self._states[state] += change
        self.metrics.batches.labels(state).set(self._states[state])
