"""Online requests before batch lines below admission: the embedded engine takes no step of a batch
stream while online traffic is served, the encoder's batches take online inputs first, and a batch
line's decoding and encoding start only while no online request is served; batch work alone still
runs to its end, and a paused batch stream answers as it would have unpaused, without its wait for
online traffic counting as the engine's stall."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from server.config import Settings
from server.core.service import Generation, Prepared, chat_service_for
from server.engines.base import EngineUnavailable, Sampling, Usage
from server.engines.local import LocalEngine
from server.engines.priority import BATCH, ONLINE, LiveTraffic, request_priority
from server.errors import Cancelled
from server.core.workers import Workers, one_core_threads
from server.metrics import Metrics
from server.model.batcher import EncoderBatcher
from server.model.onellm import load_model

# no stop and no EOS: every answer takes all its tokens, so the counts below are exact
LONG = Sampling(max_tokens=24, stop=(), ignore_eos=True)
SHORT = Sampling(max_tokens=8, stop=(), ignore_eos=True)


@pytest.fixture(scope="module")
def model(fixture_model):
    return load_model(fixture_model, dtype="float32")


@pytest.fixture(scope="module")
def embeddings(model):
    return model.embeddings(model.prompt_ids([("user", "Tell me a story.")]), [])


async def answer(engine: LocalEngine, embeddings, sampling: Sampling, priority: int, usage: Usage) -> str:
    request_priority.set(priority)  # this task's own context, as the admission sets a request's
    return "".join([delta async for delta in engine.stream(embeddings, sampling, usage)])


def test_a_batch_stream_takes_no_step_while_an_online_stream_runs(fixture_model, embeddings):
    engine = LocalEngine(fixture_model / "llm")
    batch_usage, online_usage = Usage(), Usage()

    async def scenario() -> int:
        batch = asyncio.create_task(answer(engine, embeddings, LONG, BATCH, batch_usage))
        while batch_usage.completion_tokens < 2:
            await asyncio.sleep(0.001)
        await answer(engine, embeddings, SHORT, ONLINE, online_usage)
        during = batch_usage.completion_tokens
        await batch
        return during

    during = asyncio.run(scenario())
    # interleaved step by step the batch stream would have taken about as many steps as the online one
    assert during <= 3, f"the batch stream took {during - 2} steps beside an online stream of {SHORT.max_tokens}"
    assert online_usage.completion_tokens == SHORT.max_tokens
    assert batch_usage.completion_tokens == LONG.max_tokens


def test_a_batch_stream_waits_for_the_online_requests_the_gateway_serves_and_answers_the_same(
        fixture_model, embeddings):
    live = LiveTraffic()
    engine = LocalEngine(fixture_model / "llm", live=live)
    alone, paused = Usage(), Usage()

    async def scenario() -> int:
        await answer(engine, embeddings, LONG, BATCH, alone)  # nobody else: it runs to its end
        live.enter()  # an online request admitted, still preparing its prompt
        batch = asyncio.create_task(answer(engine, embeddings, LONG, BATCH, paused))
        await asyncio.sleep(0.5)
        taken = paused.completion_tokens
        live.leave()
        await batch
        return taken

    assert asyncio.run(scenario()) == 0
    # its KV cache kept through the pause: the same tokens as when it ran alone
    assert paused.token_ids == alone.token_ids and len(alone.token_ids) == LONG.max_tokens


def images(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 224, 224, generator=g) for _ in range(n)]


def test_the_encoder_runs_an_online_input_before_batch_inputs_that_came_first(model):
    batcher = EncoderBatcher(model, ThreadPoolExecutor(1), ThreadPoolExecutor(1), max_batch=1, max_wait_s=0.001)
    done: list[str] = []

    async def encode(name: str, modality: str, x: torch.Tensor, priority: int) -> None:
        request_priority.set(priority)
        await batcher.encode(modality, x)
        done.append(name)

    async def scenario() -> None:
        # the first runs at once; the others queue behind it in the order they come
        first, line1, line2, online = images(4)
        await asyncio.gather(encode("first", "image", first, ONLINE), encode("line1", "image", line1, BATCH),
                             encode("line2", "image", line2, BATCH), encode("imu", "imu", torch.randn(6, 400), BATCH),
                             encode("online", "image", online, ONLINE))

    asyncio.run(scenario())
    assert done[:2] == ["first", "online"], done
    assert sorted(done[2:]) == ["imu", "line1", "line2"]


def test_batch_inputs_alone_run_in_one_batch(model):
    batcher = EncoderBatcher(model, ThreadPoolExecutor(1), ThreadPoolExecutor(1), max_batch=8, max_wait_s=0.05)

    async def encode(x: torch.Tensor) -> torch.Tensor:
        request_priority.set(BATCH)
        return await batcher.encode("image", x)

    async def scenario() -> list[torch.Tensor]:
        return await asyncio.gather(*(encode(x) for x in images(3)))

    assert len(asyncio.run(scenario())) == 3 and batcher.batch_sizes == [3]


def test_batch_lines_inputs_run_side_by_side_each_on_one_core(model, fixture_dir):
    """Two lines' inputs of different modalities, each its own batch, run at once on the batch lines'
    two threads, which compute on one core each, to the prefixes they have alone; threads started
    afterwards still take the process's count."""
    audio = load_file(fixture_dir / "reference.safetensors")["audio.input"][0]
    image = images(1)[0]
    alone = {"audio": model.encode("audio", audio[None])[0], "image": model.encode("image", image[None])[0]}
    process_count = torch.get_num_threads()
    batch_lines_threads = one_core_threads(2, "lines")
    batcher = EncoderBatcher(model, ThreadPoolExecutor(1), batch_lines_threads, max_batch=8, max_wait_s=0.001,
                             batch_lines_runs=2)
    at_once: list[int] = []

    async def scenario() -> list[torch.Tensor]:
        request_priority.set(BATCH)
        lines = [asyncio.create_task(batcher.encode(m, x)) for m, x in (("audio", audio), ("image", image))]
        while not all(line.done() for line in lines):
            at_once.append(batcher.running[BATCH])
            await asyncio.sleep(0.001)
        return [await line for line in lines]

    prefixes = asyncio.run(scenario())
    assert max(at_once) == 2, "the second line's input waited for the first one's run"
    for prefix, m in zip(prefixes, ("audio", "image")):
        torch.testing.assert_close(prefix, alone[m], atol=1e-5, rtol=1e-5)
    assert [batch_lines_threads.submit(torch.get_num_threads).result() for _ in range(4)] == [1] * 4
    assert ThreadPoolExecutor(1).submit(torch.get_num_threads).result() == process_count == torch.get_num_threads()


def test_an_encoder_run_of_batch_lines_waits_between_blocks_while_online_requests_are_served(model, fixture_dir):
    """An audio input goes through every block of the tiny encoder in some hundreds of milliseconds:
    an online input arriving meanwhile is encoded at once, the line's run takes no block while
    online requests are served, for twice as long as the whole run takes alone, and goes on once
    none is, to the prefix it would have had."""
    audio = load_file(fixture_dir / "reference.safetensors")["audio.input"][0]
    started = time.perf_counter()
    alone = model.encode("audio", audio[None])[0]
    hold_s = 2 * (time.perf_counter() - started)
    live = LiveTraffic()
    batcher = EncoderBatcher(model, ThreadPoolExecutor(1), ThreadPoolExecutor(1), max_batch=1, max_wait_s=0.001,
                             live=live)
    done: list[str] = []

    async def encode(name: str, modality: str, x: torch.Tensor, priority: int) -> torch.Tensor:
        request_priority.set(priority)
        prefix = await batcher.encode(modality, x)
        done.append(name)
        return prefix

    async def scenario() -> tuple[list[str], torch.Tensor]:
        line = asyncio.create_task(encode("line", "audio", audio, BATCH))
        while not batcher.running[BATCH]:  # its run has started
            await asyncio.sleep(0.001)
        live.enter()  # an online request admitted
        try:  # left whatever happens: a run paused for good would keep the process from exiting
            await encode("online", "image", images(1)[0], ONLINE)
            await asyncio.sleep(hold_s)
            held = list(done)
        finally:
            live.leave()
        return held, await line

    held, prefix = asyncio.run(scenario())
    assert held == ["online"], "the online input waited for the batch line's run, or the run went on beside it"
    torch.testing.assert_close(prefix, alone, atol=1e-6, rtol=1e-6)


def test_a_run_of_batch_lines_paused_for_good_ends_when_the_encoder_closes(model, fixture_dir):
    """A gateway shutting down while online requests are still counted: the lines' paused run stops
    (its line fails as cancelled, to be sent again after the restart) and frees its thread, which
    the process would otherwise wait for at exit."""
    audio = load_file(fixture_dir / "reference.safetensors")["audio.input"][0]
    live, batch_lines_thread = LiveTraffic(), ThreadPoolExecutor(1)
    batcher = EncoderBatcher(model, ThreadPoolExecutor(1), batch_lines_thread, max_batch=1, max_wait_s=0.001,
                             live=live)

    async def scenario() -> None:
        request_priority.set(BATCH)
        line = asyncio.create_task(batcher.encode("audio", audio))
        while not batcher.running[BATCH]:
            await asyncio.sleep(0.001)
        live.enter()  # never left: the run pauses at its next block and would wait for good
        try:
            await asyncio.sleep(0.2)
            assert not line.done(), "the run went on while an online request was served"
            batcher.close()
            with pytest.raises(Cancelled):
                await asyncio.wait_for(line, 10)
        finally:
            live.leave()

    asyncio.run(scenario())
    assert batch_lines_thread.submit(lambda: "free").result(timeout=10) == "free"


def test_a_batch_lines_decoding_and_encoding_wait_for_the_online_requests_served(model):
    live = LiveTraffic()
    workers = Workers(model, Metrics(), decoding_threads=1, live=live)
    done: list[str] = []

    async def work(name: str, job) -> None:
        request_priority.set(BATCH)
        await job
        done.append(name)

    async def scenario() -> list[str]:
        live.enter()  # an online request being served
        tasks = [asyncio.create_task(work("decode", workers.off_loop(sum, [1, 2]))),
                 asyncio.create_task(work("encode", workers.encode("image", images(1)[0])))]
        await asyncio.sleep(0.5)
        held = list(done)
        live.leave()
        await asyncio.gather(*tasks)
        return held

    try:
        assert asyncio.run(scenario()) == []
        assert sorted(done) == ["decode", "encode"]
    finally:
        workers.close()


class Hung:
    """An engine that never sends a token: the fault stall_timeout_s is for, which no real engine
    here can be made to show on cue."""
    name = "hung"

    async def stream(self, embeddings, sampling, usage=None, affinity=None, cache_salt=None):
        await asyncio.Event().wait()
        yield ""


def generation(embeddings) -> Generation:
    return Generation(Prepared(embeddings, LONG.max_tokens, [], affinity=""))


async def generated(service, of: Generation, priority: int) -> str:
    request_priority.set(priority)
    return "".join([delta async for delta in service.generate(of, LONG)])


def test_a_batch_line_paused_for_online_traffic_is_not_a_stalled_engine(fixture_model, model, embeddings):
    """The embedded engine holds a batch line's steps while an online request is served, for longer
    than stall_timeout_s here: the line still gets its whole answer. The same wait for a hung engine
    ends it, batch line or not, once no online request is being served."""
    live = LiveTraffic()
    settings = Settings(preprocess_workers=1, stall_timeout_s=0.3)
    paused_service = chat_service_for(settings, model, LocalEngine(fixture_model / "llm", live=live), Metrics(),
                                      live=live)
    hung_service = chat_service_for(settings, model, Hung(), Metrics(), live=live)
    paused = generation(embeddings)

    async def pause_a_line() -> int:
        line = asyncio.create_task(generated(paused_service, paused, BATCH))
        while paused.usage.completion_tokens < 2:
            await asyncio.sleep(0.001)
        live.enter()  # an online request served for 1 s: the line takes no step meanwhile
        await asyncio.sleep(1.0)
        taken = paused.usage.completion_tokens
        live.leave()
        await line
        return taken

    async def hung(priority: int) -> None:
        with pytest.raises(EngineUnavailable, match="stall_timeout_s"):
            await generated(hung_service, generation(embeddings), priority)

    try:
        assert asyncio.run(pause_a_line()) <= 3  # paused, not finished before the online request
        assert paused.usage.completion_tokens == LONG.max_tokens
        asyncio.run(hung(BATCH))
        asyncio.run(hung(ONLINE))
    finally:
        paused_service.close()
        hung_service.close()
