"""Waiting on a live server's state (a metric, a count in Redis) instead of sleeping."""

import time


def until(condition, within: float, what: str) -> None:
    """Returns once `condition()` is true; fails naming `what` if it is not within `within` s."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        time.sleep(0.05)
