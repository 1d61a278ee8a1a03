"""One chat being answered, for any endpoint's way of sending it: started once its first text is
there (so a down engine is still a plain 503), and counted in the metrics once it ends, however it
ends (done, failed, or the client gone)."""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from server import tracing
from server.metrics import Metrics
from server.core.service import ChatService, Generation
from server.core.chat import Chat
from server.core.request_id import REQUEST_ID
from server.engines.base import EngineUnavailable, Sampling
from server.errors import InputError, InternalError, RequestError, Unavailable

log = logging.getLogger("onellm.gateway")
# each stop string is matched against the text of every token: its length bounds that work
MAX_STOPS, MAX_STOP_CHARS = 4, 1024


@dataclass
class Answer:
    generation: Generation
    deltas: AsyncIterator[str]  # the text after `first`
    first: str | None  # None: the answer is empty
    label: str  # the chat's modality, as the metrics name it (modality_label)
    metrics: Metrics


async def start_answer(service: ChatService, chat: Chat, sampling_fields: dict, tenant: str,
                       started: float) -> Answer:
    metrics = service.metrics
    label = modality_label(chat)
    if log.isEnabledFor(logging.DEBUG):  # what people send is theirs: it is logged only when asked for
        log.debug("chat of %d messages, the last %r, attachments %s", len(chat.turns), chat.turns[-1].text[:500],
                  [(a.modality, a.reference or sum(map(len, a.files.values()))) for t in chat.turns for a in t.attachments])
    metrics.in_flight.inc()
    tracing.told_request(service.model.name, sampling_fields)
    try:
        prepared = await service.prepare(chat, sampling_fields.pop("max_tokens"), tenant)
        sampling = Sampling(max_tokens=prepared.max_tokens, **sampling_fields)
        generation = Generation(prepared, started=started)
        deltas = service.generate(generation, sampling)
        try:  # the first delta comes before the response starts, so a down engine is a plain 503
            first = await anext(deltas, None)
        except BaseException:
            await deltas.aclose()
            raise
    except BaseException as e:  # cancelled too: the client left or the request timed out
        metrics.requests.labels(label, status_label(e)).inc()
        metrics.in_flight.dec()
        raise
    return Answer(generation, deltas, first, label, metrics)


def modality_label(chat: Chat) -> str:
    """The `modality` label of a chat: its attachments' one modality, "mixed" for several, "text"
    for none. Never built from the order or number of attachments, which would let a client add
    series to /metrics without bound."""
    modalities = {a.modality for t in chat.turns for a in t.attachments}
    if len(modalities) > 1:
        return "mixed"
    return next(iter(modalities), "text")


async def whole_text(answer: Answer) -> str:
    try:
        text = answer.first or ""
        async with aclosing(answer.deltas):
            async for delta in answer.deltas:
                text += delta
    except BaseException as e:
        answer.metrics.requests.labels(answer.label, status_label(e)).inc()
        raise
    finally:
        answer.metrics.in_flight.dec()
    answer.metrics.requests.labels(answer.label, "200").inc()
    return text


async def text_deltas(answer: Answer) -> AsyncIterator[str]:
    """The answer's text as it comes."""
    async with aclosing(answer.deltas):
        if answer.first is None:
            return
        yield answer.first
        async for delta in answer.deltas:
            yield delta


def stream_failure(error: Exception) -> RequestError:
    """A failure after a stream started, as its client is told of it: a message that is the same
    every time (the error's own status, 503 for an engine that failed, else 500), its detail in
    the log."""
    if isinstance(error, RequestError):
        log.warning("stream ended by an error: %s", error.message)
        return error
    if isinstance(error, EngineUnavailable):
        log.warning("the LLM engine failed mid-answer: %s", error)
        return engine_unavailable()
    log.error("the answer failed mid-stream", exc_info=error)
    return InternalError(f"the answer failed on the server (request {REQUEST_ID.get()})")


def engine_unavailable() -> Unavailable:
    """What a client is told of an engine that is down or failed: why is for the operators to read
    in the log (it names the backends' URLs); the request id tells them which line."""
    return Unavailable(f"the LLM engine is unavailable; retry shortly (request {REQUEST_ID.get()})",
                       headers={"Retry-After": "1"}, code="engine_unavailable")


class StreamFailed(Exception):
    """Raised by an event stream after it has sent its error event."""

    def __init__(self, status: int):
        self.status = status


async def counted(events: AsyncIterator[str], answer: Answer) -> AsyncIterator[str]:
    """`events` (the answer's stream, in some endpoint's events), counted once it ends."""
    status = "499"  # nginx's "client closed request", kept if the client disconnects
    try:
        async with aclosing(events):
            async for event in events:
                yield event
        status = "200"
    except StreamFailed as e:
        status = str(e.status)
    except Exception:  # an event stream's own fault, after its answer's: the client is cut off
        status = "500"
        raise
    finally:
        answer.metrics.requests.labels(answer.label, status).inc()
        answer.metrics.in_flight.dec()


def sampling_fields(max_tokens, temperature, top_p, stop, seed) -> dict:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise InputError(400, f"stop takes up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                              "characters each", "stop")
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
            "stop": tuple(dict.fromkeys(["###", *stops])), "seed": seed}


def check_model(service: ChatService, name: str | None) -> None:
    served = service.model.name
    if name not in (None, "", served):
        raise InputError(404, f"model '{name}' is not served here; this server serves '{served}'", "model")


def status_label(error: BaseException) -> str:
    """The status label of a request that ended with `error`."""
    if isinstance(error, RequestError):
        return str(error.status)
    if isinstance(error, EngineUnavailable):
        return "503"
    if isinstance(error, asyncio.CancelledError):
        return "499"  # nginx's "client closed request"; a timeout also lands here (and in rejected)
    return "500"
