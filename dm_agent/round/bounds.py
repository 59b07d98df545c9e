"""Every round is bounded: its limits, and what it is doing.

A round runs in a worker thread under a wall-clock deadline shorter than the interval
(``process.rounds.RoundThread``). Past it, the round is abandoned: its thread is left to
its blocked call (a DNS lookup, a peer that dribbles its answer), and what it does when it
wakes up is neither logged nor kept (``Progress.live``).
"""

from __future__ import annotations

import threading
from typing import NamedTuple

# The longest a round may take, in seconds, whatever the interval: the unit's
# WatchdogSec (60 s) is twice that, so only a hung agent misses the watchdog.
ROUND_MAX = 30.0


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


class Timeouts(NamedTuple):
    """Bounds of every network call and probe of a round, all shorter than the interval.

    ``round`` bounds the whole exchange with the master (the body it sends back
    included); ``abandon`` bounds the whole round as the loop sees it — DNS lookups of
    the master and of a TCP Docker, which no socket timeout covers, included."""

    docker: float
    #: (connect, read) of each request to the master
    http: tuple[float, float]
    disk: float
    round: float
    abandon: float


def timeouts(interval: int) -> Timeouts:
    """The bounds of a round at this interval: computed once per configuration (the
    agent's ``Parts``), which hands each part its own."""
    return Timeouts(
        docker=_clamp(0.8 * interval, 0.5, 10.0),
        http=(_clamp(0.4 * interval, 0.4, 5.0), _clamp(0.5 * interval, 0.5, 15.0)),
        disk=_clamp(0.25 * interval, 0.2, 1.0),
        round=_clamp(0.8 * interval, 0.8, ROUND_MAX - 5.0),
        abandon=_clamp(0.95 * interval, 0.95, ROUND_MAX),
    )


class Progress:
    """The round in progress: which thread runs it, and what it is doing (for the
    message when its deadline passes)."""

    def __init__(self) -> None:
        self.worker: threading.Thread | None = None
        self.stage = "starting"
        #: set when the agent is stopping: a round that has not sent yet sends nothing
        self.stopping = threading.Event()

    def live(self) -> bool:
        """False in a round abandoned at its deadline: its outcome is no one's business."""
        current = threading.current_thread()
        return current is self.worker or current is threading.main_thread()

    def doing(self, stage: str) -> None:
        if self.live():
            self.stage = stage
