"""`POST /v1/chat`: a chat sent as a multipart form (curl -F), answered as a chat completion."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.core.answers import check_model, sampling_fields
from server.core.chat import check_chat
from server.entrypoints.chat_completions.protocol import ChatCompletion
from server.entrypoints.chat_completions.router import respond
from server.entrypoints.chat_form.parse import chat_from_form, form_fields, form_stop, form_uploads
from server.entrypoints.chat_form.protocol import FORM_BODY
from server.entrypoints.chats import fetcher_of
from server.entrypoints.forms import read_form
from server.entrypoints.protocol import STREAM_RESPONSE
from server.errors import InputError
from server.traffic.routes import chat_route

router = APIRouter()


@router.post("/v1/chat", response_model=ChatCompletion, responses=STREAM_RESPONSE, openapi_extra=FORM_BODY)
@chat_route
async def chat(request: Request) -> Response:
    if not request.headers.get("content-type", "").startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise InputError(415, "POST /v1/chat takes multipart/form-data (curl -F); JSON goes to /v1/chat/completions")
    settings = request.app.state.settings
    # an image with its depth or normal map is one attachment in two files
    async with read_form(request, settings.max_file_bytes, 2 * settings.max_attachments, 64) as form:
        texts, uploads = await form_uploads(form, fetcher_of(request), settings.max_attachments)
    fields = form_fields(texts)
    check_model(request.app.state.service, fields.model)
    chat = chat_from_form(fields.prompt, fields.messages, uploads, {"imu_sample_rate": fields.imu_sample_rate})
    check_chat(chat, settings, fields.max_tokens, text_param="messages" if fields.messages else "prompt")
    stop = form_stop(fields.stop)
    return await respond(request, chat, sampling_fields(fields.max_tokens, fields.temperature, fields.top_p, stop,
                                                        fields.seed), fields.stream, include_usage=False)
