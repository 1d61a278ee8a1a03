"""What kind of traffic a route is. A route declares it where it is written (`@chat_route`,
`@download_route`), and the guards that act on one kind only ask `kind_of`: admission and the
request timeout take chats, the per-key quotas count chats and downloads, the request metrics count
chats. A new endpoint opts in with a decorator instead of an entry in a list of paths elsewhere."""

from collections.abc import Callable
from typing import Literal

from fastapi.routing import iter_route_contexts
from starlette.routing import Match
from starlette.types import Scope

Kind = Literal["chat", "download"]


def _declaring(kind: Kind) -> Callable[[Callable], Callable]:
    def declare(endpoint: Callable) -> Callable:
        endpoint.traffic_kind = kind
        return endpoint
    return declare


chat_route = _declaring("chat")  # a chat is answered: admitted, timed, counted
download_route = _declaring("download")  # a stored file's bytes go out: counted under the key's concurrency


def kind_of(scope: Scope) -> Kind | None:
    """The kind the endpoint this request goes to declared (path and method), None if it declared none."""
    if scope["type"] != "http" or "app" not in scope:
        return None
    for route in iter_route_contexts(scope["app"].router.routes):  # routers' routes included
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return getattr(route.endpoint, "traffic_kind", None)
    return None
