"""When the next round is, and why: the loop's schedule, with no clock or thread of its own.

A fixed grid (ticks at origin + k × interval, so a slow round does not make the
schedule drift; ticks a long round or outage overran are skipped, not made up), retries
with capped exponential backoff and jitter in place of the ticks while failing, and
requests for a round at once (SIGUSR1, a reload, the start) or soon (a Docker event:
debounced, and spaced so a burst of changes makes a handful of rounds). The clock and
the random source are given, so every behaviour is tested without waiting
(``tests/test_schedule.py``); only ``kick`` and ``event`` may be called from another thread.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

# A container change is registered after EVENT_DEBOUNCE s (so a burst coalesces), and
# event-driven registrations are at least EVENT_SPACING s apart: 100 containers started
# together make a handful of registrations, a lone change is at the master within 1 s.
EVENT_DEBOUNCE = 0.2
EVENT_SPACING = 1.0


def backoff(failures: int, interval: float, rand: Callable[[], float] = random.random) -> float:
    """Delay before retry number ``failures``: 1, 2, 4 … s capped at the interval,
    scaled by a random factor in [0.5, 1) so a fleet does not retry in step."""
    cap = min(float(interval), 2.0 ** max(0, failures - 1))
    return cap * (0.5 + 0.5 * rand())


def first_tick(start: float, interval: float, jitter: bool,
               rand: Callable[[], float] = random.random) -> float:
    """When the periodic schedule begins, after the immediate first registration:
    at a random offset within the interval (so a fleet started together spreads out),
    or one interval later without jitter. The grid then runs fixed from there."""
    return start + (rand() * interval if jitter else interval)


class Schedule:
    """The grid, the retry backoff and the queue of requested rounds.

    ``due()`` says whether a round is due now and why (and takes a request it answers);
    ``finished(ok)`` moves the schedule on; ``next()`` says when to look again."""

    def __init__(self, interval: float, jitter: bool,
                 clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random) -> None:
        self.jitter = jitter
        self.clock = clock
        self.rand = rand
        self._lock = threading.Lock()
        self._kick_at: float | None = None
        self._kick_is_event = False
        self._last_event_round = -EVENT_SPACING
        self.restart(interval)

    def restart(self, interval: float) -> None:
        """At the start and after a reload: a round at once, then the grid from a new
        offset — a fleet-wide configuration push must not make every node report in the
        same second — and no retry pending."""
        self.interval = float(interval)
        self.tick = first_tick(self.clock(), self.interval, self.jitter, self.rand)
        self.failures = 0
        self.retry_at: float | None = None
        self.kick()

    def kick(self, delay: float = 0.0, event: bool = False) -> None:
        """Ask for a round within ``delay`` seconds (requests coalesce into the earliest)."""
        at = self.clock() + delay
        with self._lock:
            if self._kick_at is None or at < self._kick_at:
                self._kick_at = at
                self._kick_is_event = event

    def event(self) -> float:
        """A container changed: ask for a round after the debounce, and no sooner than
        EVENT_SPACING after the last event round. Returns the delay."""
        now = self.clock()
        with self._lock:
            at = max(now + EVENT_DEBOUNCE, self._last_event_round + EVENT_SPACING)
        self.kick(at - now, event=True)
        return at - now

    def due(self) -> str | None:
        """Why a round is due now — ``requested``, ``event``, ``retry``, ``tick`` — or None."""
        now = self.clock()
        with self._lock:
            if self._kick_at is not None and now >= self._kick_at:
                reason = "event" if self._kick_is_event else "requested"
                if self._kick_is_event:
                    self._last_event_round = now
                self._kick_at = None
                return reason
        if self.retry_at is not None:
            return "retry" if now >= self.retry_at else None
        return "tick" if now >= self.tick else None

    def finished(self, ok: bool) -> None:
        """A round ended: a failure is retried after a backoff (the ticks wait meanwhile),
        and ticks the round overran are skipped, so the grid never drifts."""
        now = self.clock()
        if ok:
            self.failures, self.retry_at = 0, None
        else:
            self.failures += 1
            self.retry_at = now + backoff(self.failures, self.interval, self.rand)
        if self.tick <= now:
            self.tick += self.interval * (int((now - self.tick) // self.interval) + 1)

    def next(self) -> tuple[float, str]:
        """When the next round is (clock time), and why."""
        at, why = (self.retry_at, "retry") if self.retry_at is not None else (self.tick, "tick")
        with self._lock:
            if self._kick_at is not None and self._kick_at < at:
                at, why = self._kick_at, "event" if self._kick_is_event else "requested"
        return at, why
