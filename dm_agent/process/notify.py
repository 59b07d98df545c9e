"""systemd's watchdog (sd_notify(3), sd_watchdog_enabled(3)): the few lines the agent needs.

The protocol is one datagram, ``WATCHDOG=1``, on the unix socket that ``$NOTIFY_SOCKET``
names (a path, or ``@name`` in the abstract namespace). No library: python-systemd is a
C extension built against each distribution's libsystemd (more to freeze, and a
dependency for a single ``sendto``); PyPI's ``sdnotify`` is these same lines.

The loop pings after each iteration it completes, never from a timer thread, so a
SIGSTOPped or deadlocked agent stops pinging and systemd kills and restarts it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Collection, Mapping

log = logging.getLogger("dm_agent")

#: The loop pings at least this many times per WatchdogSec, so one slow iteration
#: (a round is bounded to half of the unit's WatchdogSec, see round.bounds.ROUND_MAX)
#: never misses.
PINGS_PER_PERIOD = 4
#: systemd learns a forking daemon's PID from its pidfile once the starter has exited,
#: and until then refuses (with a warning in the journal) what the daemon sends under
#: NotifyAccess=main. Its watchdog runs only from then on, so the first ping waits.
FIRST_PING_AFTER = 1.0


def _address(name: str) -> str:
    return "\0" + name[1:] if name.startswith("@") else name


class Watchdog:
    """Pings systemd's watchdog over ``$NOTIFY_SOCKET`` every ``period`` seconds at most."""

    def __init__(self, socket_name: str, usec: int) -> None:
        self.address = _address(socket_name)
        self.timeout = usec / 1_000_000
        self.period = self.timeout / PINGS_PER_PERIOD
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._failed = False
        self._armed_at = time.monotonic() + min(FIRST_PING_AFTER, self.period)

    @classmethod
    def from_env(cls, pids: Collection[int],
                 env: Mapping[str, str] | None = None) -> Watchdog | None:
        """The unit's watchdog, if it has one (``WatchdogSec=``) and it is meant for us.

        systemd sets ``WATCHDOG_PID`` to the process it started; a forking daemon is
        that process's grandchild, so ``pids`` lists every PID the agent has been."""
        env = os.environ if env is None else env
        name, usec, pid = env.get("NOTIFY_SOCKET"), env.get("WATCHDOG_USEC"), \
            env.get("WATCHDOG_PID")
        if not name or not usec or not usec.isdigit() or int(usec) == 0:
            return None
        if pid and (not pid.isdigit() or int(pid) not in pids):
            return None
        return cls(name, int(usec))

    def ping(self) -> None:
        """``WATCHDOG=1``. A failure is logged once and never raises into the loop."""
        if time.monotonic() < self._armed_at:
            return
        try:
            self._sock.sendto(b"WATCHDOG=1", self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd's watchdog at %s: %s",
                            self.address.replace("\0", "@"), exc.strerror or exc)
            self._failed = True
        else:
            self._failed = False

    def close(self) -> None:
        self._sock.close()
