"""The id of the request being served: set by traffic's RequestIds middleware for each request,
read by whatever writes a log line or an error message for it."""

import contextvars

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
