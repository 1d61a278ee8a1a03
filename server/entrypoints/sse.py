"""Server-Sent Events as the streaming endpoints send them: `data:` lines (chat completions) or
named events (Responses), and a stream that fails after it started ends with an `error` event,
then `data: [DONE]`."""

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from server.core.answers import Answer, counted
from server.errors import RequestError

# no caching, and no buffering by a proxy (nginx) in front: each event goes out as it is made
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


def data_event(data: str) -> str:
    return f"data: {data}\n\n"


def named_event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def error_event(error: RequestError) -> str:
    """How a stream that has started reports a failure: an `error` event, then the usual end."""
    return named_event("error", error.body()) + DONE


def event_stream(events: AsyncIterator[str], answer: Answer, headers: dict[str, str]) -> StreamingResponse:
    """The response streaming `answer`'s events, counted in the metrics once it ends."""
    return StreamingResponse(counted(events, answer), media_type="text/event-stream",
                             headers={**SSE_HEADERS, **headers})
