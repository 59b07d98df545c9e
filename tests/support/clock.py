"""A clock the test sets by hand, for the parts that take one (``Schedule``, ``Outage``)."""

from __future__ import annotations


class Clock:
    """Call it for the time; move it with ``clock.now += seconds``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
