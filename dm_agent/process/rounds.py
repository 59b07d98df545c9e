"""The thread that runs each round, under the round's deadline (``round.bounds``).

Past the deadline the round is abandoned: its thread is left to its blocked call, and
fresh clients serve the next rounds. A stop lets a round already sending end its
exchange (``STOP_GRACE``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..round.agent import Outcome
from ..round.bounds import Progress, Timeouts
from ..round.outage import fmt_duration
from .signals import Signals

# Rounds abandoned at their deadline whose threads are still blocked (in a DNS lookup
# or on a peer that dribbles its answer): past this many no new round is started, so
# threads never pile up on a peer that holds each one for ever.
MAX_STUCK = 2
# On a stop, what a round in flight may still take to end its exchange with the master
# (the gateway drains its connections meanwhile): the exit never cuts a request between
# its headers and its body, which the master would see as a truncated request. A round
# still blocked past it (a master that does not read) is left, as before.
STOP_GRACE = 1.0


class RoundThread:
    """Runs each round in a worker thread, waiting for it, a stop, or its deadline."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.stuck: list[tuple[threading.Thread, str]] = []
        #: the round a stop interrupted: its end, and its outcome once it has one
        #: (``finish()`` waits for it)
        self.in_flight: tuple[threading.Event, list[Outcome]] | None = None

    def run(self, register: Callable[[float], Outcome], limits: Timeouts, signals: Signals,
            abandoned: Callable[[], None]) -> Outcome | None:
        """What ``register(deadline)`` came to; None when a stop came first.

        Past the deadline (``limits.abandon``) it is a failed round, whatever the worker
        does later, and ``abandoned()`` gives the next rounds fresh clients."""
        self.stuck = [(t, what) for t, what in self.stuck if t.is_alive()]
        if len(self.stuck) >= MAX_STUCK:
            return Outcome(None, ("stuck", f"registration not attempted: {MAX_STUCK} earlier "
                                  "rounds are still blocked, "
                                  + "; ".join(what for _, what in self.stuck)))
        waker = signals.waker
        started = time.monotonic()
        give_up = started + limits.abandon
        result: list[Outcome] = []
        done = threading.Event()

        def work() -> None:
            try:
                result.append(register(started + limits.round))
            finally:
                done.set()  # before the wake-up: the loop below must see it when it wakes
                waker.wake()

        worker = threading.Thread(target=work, name="round", daemon=True)
        self.progress.worker = worker
        worker.start()
        while not done.is_set():
            now = time.monotonic()
            if now >= give_up:
                stage = self.progress.stage
                self.progress.worker = None
                self.stuck.append((worker, f"{stage} (since {fmt_duration(now - started)})"))
                abandoned()
                return Outcome(None, ("timeout", f"registration abandoned: not done within "
                                      f"{limits.abandon:g}s, while {stage}"))
            # Wakes for the round's end or any signal; a kick that arrives meanwhile is
            # in the schedule and a signal in the pending list, so draining loses nothing.
            waker.wait(min(0.5, give_up - now))
            if signals.stop_requested():  # other signals wait until the round is over
                self.in_flight = done, result
                return None
        self.progress.worker = None
        return _only(result)

    def finish(self, by: float) -> Outcome | None:
        """After a stop: wait until ``by`` (monotonic) for the round it interrupted to
        end its exchange; what it came to, or None (no round in flight, or not ended)."""
        if self.in_flight is None:
            return None
        done, result = self.in_flight
        return _only(result) if done.wait(max(0.0, by - time.monotonic())) else None


def _only(result: list[Outcome]) -> Outcome:
    """The worker's outcome (``register`` never raises; should it, the round failed)."""
    return result[0] if result else Outcome(None, ("unknown", "the round failed"))
