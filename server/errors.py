"""The one error type the request path raises for bad input; the API turns it into JSON."""


class InputError(Exception):
    """A client mistake: becomes `{"error": {"type", "message", "param", "code"}}` with `status`;
    `code` is a stable name for the mistakes a client may act on (e.g. resend an attachment)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "request_too_large", 415: "unsupported_media_type", 422: "unprocessable_content",
             408: "request_timeout", 429: "rate_limit_exceeded", 500: "internal_error", 503: "service_unavailable", 504: "timeout"}

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}  # e.g. Retry-After on a 429
        self.code = code

    @property
    def type(self) -> str:
        return self.TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"type": self.type, "message": self.message, "param": self.param, "code": self.code}}


class Cancelled(Exception):
    """Work stopped because nobody waits for its result any more (its request failed, timed out or
    its client left): not the client's mistake, so not an InputError."""
