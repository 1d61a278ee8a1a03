"""Typed errors carrying the server's `{"error": {"type", "message", "param", "code"}}` body."""

import json
from contextlib import contextmanager

import httpx


class OneLLMError(Exception):
    """Any failure talking to OneLLM Serve. `status` is the HTTP status (None when no response came)."""

    def __init__(self, message: str, status: int | None = None, type: str | None = None,
                 param: str | None = None, body: object = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.body = body
        self.code = code  # the server's finer reason, e.g. "media_not_found"; None for most errors

    def __str__(self) -> str:
        return f"{self.message} (param: {self.param})" if self.param else self.message


class APIConnectionError(OneLLMError):
    """The server could not be reached, or the connection broke."""


class APITimeoutError(APIConnectionError):
    """The server did not answer within the client's timeout."""


class BadRequestError(OneLLMError):  # 400
    pass


class MediaNotFoundError(BadRequestError):
    """A reference (`<field>_ref`, a part's `uuid`) the server no longer holds: send the file's bytes again."""


class AuthenticationError(OneLLMError):  # 401, 403
    pass


class NotFoundError(OneLLMError):  # 404: an unknown model or route
    pass


class RequestTooLargeError(OneLLMError):  # 413
    pass


class UnsupportedMediaError(OneLLMError):  # 415: a file that is not what its field expects
    pass


class UnprocessableError(OneLLMError):  # 422: the right kind of file, but unreadable
    pass


class RateLimitError(OneLLMError):  # 429
    pass


class InternalServerError(OneLLMError):  # 500 and other 5xx
    pass


class ServiceUnavailableError(InternalServerError):  # 503: the LLM engine is down or not ready
    pass


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError,
              413: RequestTooLargeError, 415: UnsupportedMediaError, 422: UnprocessableError,
              429: RateLimitError, 503: ServiceUnavailableError}
# an `error` event in a stream has no HTTP status of its own: the body's type says which it would have been
_STATUS_BY_TYPE = {"invalid_request_error": 400, "authentication_error": 401, "not_found_error": 404,
                   "request_too_large": 413, "unsupported_media_type": 415, "unprocessable_content": 422,
                   "rate_limit_exceeded": 429, "internal_error": 500, "service_unavailable": 503}
# codes that a caller acts on, so they get a class of their own
_BY_CODE = {"media_not_found": MediaNotFoundError}


def error_from_body(body: object, status: int | None = None) -> OneLLMError:
    """The typed error for an error body; `status` None means it came as an event mid-stream."""
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        text = body if isinstance(body, str) and body.strip() else None
        return _class_for(status)(text[:500] if text else f"HTTP {status}", status, body=body)
    kind = detail.get("type")
    if status is None:
        status = _STATUS_BY_TYPE.get(kind)
    message = str(detail.get("message") or kind or f"HTTP {status}")
    code = detail.get("code")
    cls = _BY_CODE.get(code) or _class_for(status)
    return cls(message, status, kind, detail.get("param"), body, code)


def error_from_response(response: httpx.Response) -> OneLLMError:
    """Call after the body was read."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = response.text
    return error_from_body(body, response.status_code)


def _class_for(status: int | None) -> type[OneLLMError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status is not None and status >= 500:
        return InternalServerError
    return OneLLMError


@contextmanager
def transport_errors(url: object):
    """httpx's own exceptions -> ours, so callers catch one family."""
    try:
        yield
    except httpx.TimeoutException as e:
        raise APITimeoutError(f"timed out waiting for {url}") from e
    except httpx.HTTPError as e:
        raise APIConnectionError(f"could not talk to {url}: {e or type(e).__name__}") from e
