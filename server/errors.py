"""The errors a request can end with; the API turns each into `{"error": {"type", "message",
"param", "code"}}` with its status. A client's mistake (4xx) and the server's failures (5xx) are
different types, so that code catching one never swallows the other."""


class RequestError(Exception):
    """What a request ended with: `status`, a message, the field it concerns (`param`), and
    `code`, a stable name for the failures a client may act on (e.g. resend an attachment)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "request_too_large", 415: "unsupported_media_type", 422: "unprocessable_content",
             408: "request_timeout", 429: "rate_limit_exceeded", 500: "internal_error", 503: "service_unavailable", 504: "timeout"}

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}  # e.g. Retry-After on a 429 or 503
        self.code = code

    @property
    def type(self) -> str:
        return self.TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"type": self.type, "message": self.message, "param": self.param, "code": self.code}}


class InputError(RequestError):
    """A client mistake (4xx): what the request sent, or sent too much or too fast of."""


class ServerError(RequestError):
    """A failure of the server's own (5xx), with the status of its kind."""

    status = 500

    def __init__(self, message: str, param: str | None = None, headers: dict[str, str] | None = None,
                 code: str | None = None):
        super().__init__(type(self).status, message, param, headers, code)


class InternalError(ServerError):
    """500: a bug, or a failure nothing else explains."""


class Unavailable(ServerError):
    """503: a part the request needs is down or full right now; a retry may succeed."""

    status = 503


class TimedOut(ServerError):
    """504: the request took longer than the server allows it."""

    status = 504


class Cancelled(Exception):
    """Work stopped because nobody waits for its result any more (its request failed, timed out or
    its client left): not the client's mistake, so not an InputError."""
