"""The state file: what the running daemon last did, for ``dm-agent status`` to read.

The daemon rewrites it after every round (a temporary name, then a rename, so a reader
never sees half a file) next to its pidfile: ``/run/dm-agent/dm-agent.state.json``
under the unit. It is 0640, group ``dm-agent`` when that group exists and the agent
runs as root (the unit runs it as that group already), and it holds no secret: the
master's URL cannot hold a password (config refuses one). ``status`` reads it without asking
the agent anything, so a hung agent is judged by the file's age.

Times are Unix times (float seconds, UTC); the schema is in docs/operator-guide.md (Status).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..net import redact

if TYPE_CHECKING:  # the agent is handed in, not imported at run time
    from ..round.agent import Agent, Outcome
    from .services import Services

log = logging.getLogger("dm_agent")

SCHEMA = 1
GROUP = "dm-agent"
MODE = 0o640


def state_path(pidfile: str) -> str:
    """The state file of the daemon whose pidfile is ``pidfile``: same directory, same stem."""
    stem = pidfile[:-4] if pidfile.endswith(".pid") else pidfile
    return stem + ".state.json"


def _group_id() -> int:
    """The dm-agent group for a root agent (so its members can read), else -1 (keep)."""
    if os.geteuid() != 0:
        return -1
    import grp

    try:
        return grp.getgrnam(GROUP).gr_gid
    except KeyError:
        return -1


class StateWriter:
    """Writes the state file; ``round_done`` once per round. It never raises: a state
    that cannot be written is logged once (and again when it works again), and the
    agent goes on registering."""

    def __init__(self, path: str, started: float | None = None,
                 services: Services | None = None) -> None:
        self.path = path
        self.services = services
        self.started = time.time() if started is None else started
        self.last_success: dict[str, Any] | None = None
        self.last_failure: dict[str, Any] | None = None
        self.failures = 0
        #: of the last registration a round built: the node's name, the address it
        #: announced and its number of containers
        self.reported: dict[str, Any] = {"node": None, "address": None, "containers": 0}
        self._gid = _group_id()
        self._broken = False

    def round_done(self, agent: Agent, outcome: Outcome, duration: float) -> None:
        """Record what a round that took ``duration`` seconds came to, then write."""
        now = time.time()
        body = outcome.body
        if body is not None:
            self.reported = {"node": body["name"], "address": body["address"],
                             "containers": len(body["containers"])}
        if outcome.failure is None:
            self.failures = 0
            self.last_success = {"time": now, "duration": round(duration, 3),
                                 "ttl": agent.settings.ttl}
        else:
            self.failures += 1
            kind, message = outcome.failure
            message = redact(message, agent.settings.secret)
            self.last_failure = {"kind": kind, "message": message, "time": now}
        self.write(agent, now)

    def snapshot(self, agent: Agent, now: float) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "pid": os.getpid(),
            "version": __version__,
            "started": self.started,
            "written": now,
            **agent.report(),
            **self.reported,
            "last_success": self.last_success,
            "last_failure": self.last_failure,
            "consecutive_failures": self.failures,
            **(self.services.snapshot() if self.services is not None else {}),
        }

    def write(self, agent: Agent, now: float | None = None) -> None:
        now = time.time() if now is None else now
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            data = json.dumps(self.snapshot(agent, now), ensure_ascii=False, indent=1) + "\n"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, MODE)
            try:
                os.fchmod(fd, MODE)  # whatever the umask (the unit's is 0077)
                if self._gid >= 0:
                    os.fchown(fd, -1, self._gid)
                os.write(fd, data.encode("utf-8"))
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except Exception as exc:  # the state is for status; registering matters more
            _unlink(tmp)
            if not self._broken:
                self._broken = True
                log.error("cannot write the state file %s: %s", self.path, exc)
            return
        if self._broken:
            self._broken = False
            log.info("state file %s written again", self.path)

    def remove(self) -> None:
        """On a clean exit: nothing is left that describes a process that is gone."""
        _unlink(self.path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
