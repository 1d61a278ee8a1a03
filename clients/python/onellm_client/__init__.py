"""Python client for OneLLM Serve: `Client`, `AsyncClient`, multi-turn sessions and typed errors."""

__version__ = "0.1.0"

from onellm_client._wire import UPLOAD_FIELDS, ChatResult
from onellm_client.async_client import AsyncClient, AsyncSession
from onellm_client.client import Client, Session
from onellm_client.errors import (APIConnectionError, APITimeoutError, AuthenticationError, BadRequestError,
                                  InternalServerError, MediaNotFoundError, NotFoundError, OneLLMError, RateLimitError,
                                  RequestTooLargeError, ServiceUnavailableError, UnprocessableError,
                                  UnsupportedMediaError)
from onellm_client.streams import AsyncChatStream, ChatStream

__all__ = ["UPLOAD_FIELDS", "APIConnectionError", "APITimeoutError", "AsyncChatStream", "AsyncClient", "AsyncSession",
           "AuthenticationError", "BadRequestError", "ChatResult", "ChatStream", "Client", "InternalServerError",
           "MediaNotFoundError", "NotFoundError", "OneLLMError", "RateLimitError", "RequestTooLargeError",
           "ServiceUnavailableError", "Session", "UnprocessableError", "UnsupportedMediaError"]
