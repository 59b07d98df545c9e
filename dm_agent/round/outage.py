"""Log flood control: an outage of Docker or of the master is one ERROR, not one a round."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("dm_agent")


def fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Outage:
    """Log flood control for one source: the first failure at ERROR, repeats at DEBUG
    (one WARNING if the failure changes kind, one summary an hour), recovery at INFO."""

    SUMMARY_EVERY = 3600.0

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.clock = clock
        self.kind: str | None = None
        self.message = ""
        self.count = 0
        self.since = 0.0
        self._summary_at = 0.0
        self._changed = False

    @property
    def active(self) -> bool:
        return self.kind is not None

    def failed(self, kind: str, message: str) -> None:
        now = self.clock()
        self.message = message
        if self.kind is None:
            log.error("%s", message)
            self.kind, self.count, self.since, self._summary_at = kind, 1, now, now
            self._changed = False
            return
        self.count += 1
        if kind != self.kind and not self._changed:
            self._changed = True
            self.kind = kind
            log.warning("%s still failing, now: %s", self.what, message)
        elif now - self._summary_at >= self.SUMMARY_EVERY:
            self._summary_at = now
            log.warning("%s still failing: %d attempts in %s; last: %s", self.what,
                        self.count, fmt_duration(now - self.since), message)
        else:
            log.debug("%s failed again (%d): %s", self.what, self.count, message)

    def recovered(self) -> None:
        if self.kind is None:
            return
        log.info("%s recovered after %d failed attempt%s over %s", self.what, self.count,
                 "" if self.count == 1 else "s", fmt_duration(self.clock() - self.since))
        self.kind = None
        self.count = 0
