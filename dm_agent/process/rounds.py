"""The thread that runs each round, under the round's deadline (``round.bounds``).

Past the deadline the round is abandoned: its thread is left to its blocked call, and
fresh clients serve the next rounds. A stop lets a round already sending end its
exchange (``STOP_GRACE``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..round.bounds import Progress, timeouts
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
        #: the end of the round a stop interrupted (``finish()`` waits for it)
        self.in_flight: threading.Event | None = None

    def run(self, register: Callable[[float], bool], interval: int, signals: Signals,
            failed: Callable[[str, str], None], abandoned: Callable[[], None]) -> bool | None:
        """``register(deadline)``'s outcome; None when a stop came first.

        Past the deadline it is a failed round (``failed(kind, message)``), and
        ``abandoned()`` gives the next rounds fresh clients."""
        self.stuck = [(t, what) for t, what in self.stuck if t.is_alive()]
        if len(self.stuck) >= MAX_STUCK:
            failed("stuck", f"registration not attempted: {MAX_STUCK} earlier rounds are "
                   "still blocked, " + "; ".join(what for _, what in self.stuck))
            return False
        limits, waker = timeouts(interval), signals.waker
        started = time.monotonic()
        give_up = started + limits["abandon"]
        result: list[bool] = []
        done = threading.Event()

        def work() -> None:
            try:
                result.append(register(started + limits["round"]))
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
                failed("timeout", f"registration abandoned: not done within "
                       f"{limits['abandon']:g}s, while {stage}")
                abandoned()
                return False
            # Wakes for the round's end or any signal; a kick that arrives meanwhile is
            # in the schedule and a signal in the pending list, so draining loses nothing.
            waker.wait(min(0.5, give_up - now))
            if signals.stop_requested():  # other signals wait until the round is over
                self.in_flight = done
                return None
        self.progress.worker = None
        return bool(result and result[0])

    def finish(self, by: float) -> bool:
        """After a stop: wait until ``by`` (monotonic) for the round it interrupted to
        end its exchange; True when no round is left in flight."""
        if self.in_flight is None:
            return True
        return self.in_flight.wait(max(0.0, by - time.monotonic()))
