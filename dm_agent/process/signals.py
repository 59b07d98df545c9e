"""Signal handling that only records: handlers note the signal, the loop acts on it.

A self-pipe wakes the loop: the C-level wakeup fd is written the moment a signal
arrives, and worker threads write to the same pipe when they finish, so the main
thread can sleep in ``select`` and still react within milliseconds.
"""

from __future__ import annotations

import os
import select
import signal
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class Waker:
    """A non-blocking self-pipe: ``wake()`` from anywhere, ``wait()`` in the main thread."""

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        try:
            os.write(self.wfd, b"\0")
        except (BlockingIOError, OSError):
            pass  # a full pipe already wakes the reader

    def wait(self, timeout: float | None) -> bool:
        """Sleep until woken or ``timeout`` seconds; True when woken. Drains the pipe."""
        if timeout is not None and timeout < 0:
            timeout = 0
        ready, _, _ = select.select([self.rfd], [], [], timeout)
        if not ready:
            return False
        try:
            while os.read(self.rfd, 4096):
                pass
        except BlockingIOError:
            pass
        return True


class Signals:
    """Installs the handlers; ``take()`` hands the loop what arrived since last time."""

    def __init__(self, waker: Waker) -> None:
        self.waker = waker
        self._pending: list[int] = []

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._pending.append(signum)  # list.append is atomic; no locks in a handler

    def install(self) -> None:
        for sig in HANDLED:
            signal.signal(sig, self._record)
        signal.set_wakeup_fd(self.waker.wfd, warn_on_full_buffer=False)

    def restore(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_DFL)

    def stop_requested(self) -> bool:
        return any(sig in (signal.SIGTERM, signal.SIGINT) for sig in self._pending)

    def take(self) -> list[int]:
        taken: list[int] = []
        while self._pending:  # pop() is atomic: a signal arriving now is not lost
            taken.append(self._pending.pop(0))
        return taken
