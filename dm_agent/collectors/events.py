"""Docker's event stream: tell the loop the moment a container changes.

One daemon thread follows ``GET /events`` (containers only). Each change calls
``on_change``; the agent coalesces those into a registration within a second. When
the stream drops (dockerd restarted, network), the watcher reconnects with backoff,
resuming with ``since=`` the last event it saw, so no change in between is missed;
a reconnect itself counts as a change, because the Engine may have been down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("dm_agent.events")

# Actions that leave the container list as the master sees it (id, name, image, labels,
# and whether the container exists): frequent on busy nodes, so they trigger nothing.
# Every other action does, so one an engine adds or names differently (Podman's
# ``remove``, ``init``, ``cleanup``; ``prune``) refreshes the list instead of being
# missed until the periodic relist. Docker's ``exec_create: sh`` and
# ``health_status: healthy`` carry a detail after the colon.
# Besides these, every ``exec_*`` action (Docker's ``exec_create`` … ``exec_die``).
NOISE = frozenset({"exec", "health_status", "attach", "detach", "top", "resize", "copy",
                   "archive-path", "extract-to-dir", "export", "commit", "sync"})


def is_change(action: str) -> bool:
    """True for an event action that may change the container list."""
    base = action.split(":", 1)[0].strip()
    return bool(base) and base not in NOISE and not base.startswith("exec_")


def _container_name(event: dict[str, Any]) -> str | None:
    actor = event.get("Actor")
    attributes = actor.get("Attributes") if isinstance(actor, dict) else None
    name = attributes.get("name") if isinstance(attributes, dict) else None
    return name if isinstance(name, str) else None


def since_param(time_nano: int) -> str:
    """Docker's ``since`` for an event time in nanoseconds: ``seconds.nanoseconds``."""
    return f"{time_nano // 1_000_000_000}.{time_nano % 1_000_000_000:09d}"


class EventWatcher:
    """Follows container events; ``connect`` returns a Docker ``APIClient``."""

    def __init__(self, connect: Callable[[], Any], on_change: Callable[[str], None],
                 max_backoff: float = 30.0) -> None:
        self._connect = connect
        self.on_change = on_change
        self.max_backoff = max_backoff
        self._stop = threading.Event()
        self._stream: Any = None
        self._thread: threading.Thread | None = None
        self.last_nano: int | None = None
        self.connects = 0
        #: bumped on every change and reconnect: a container list read while it stayed
        #: the same, with the stream connected all along, is still current
        self.generation = 0
        self.connected = False
        #: for the state file: when the stream last connected or dropped (Unix time,
        #: the watcher's start until the first connect), and the last change seen
        self.changed_at = time.time()
        self.last_event: dict[str, Any] | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)
        self._thread.start()

    def current(self, generation: int) -> bool:
        """True when nothing changed since ``generation`` was read, as far as we know."""
        return self.connected and generation == self.generation

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            try:
                stream.close()  # shuts the socket down: the blocked read returns
            except Exception:
                pass

    def _follow(self, since: str) -> None:
        client = self._connect()
        try:
            self._stream = client.events(since=since, filters={"type": "container"},
                                         decode=True)
            self.connects += 1
            self.generation += 1
            self.connected, self.changed_at = True, time.time()
            if self.connects > 1:
                log.info("Docker event stream resumed since %s", since)
                self.on_change("reconnect")
            for event in self._stream:
                if self._stop.is_set():
                    return
                if not isinstance(event, dict):
                    continue
                nano = event.get("timeNano")
                if isinstance(nano, int) and nano > 0:
                    self.last_nano = nano
                action = event.get("Action") or event.get("status")
                if isinstance(action, str) and is_change(action):
                    self.generation += 1
                    self.last_event = {"action": action, "time": time.time(),
                                       "container": _container_name(event)}
                    self.on_change(action)
        finally:
            if self.connected:
                self.connected, self.changed_at = False, time.time()
            self.generation += 1
            self._stream = None
            try:
                client.close()
            except Exception:
                pass

    def _run(self) -> None:
        started = time.time_ns()
        delay = 1.0
        while not self._stop.is_set():
            since = since_param(self.last_nano + 1 if self.last_nano else started)
            before = self.connects
            try:
                self._follow(since)
            except Exception as exc:  # any failure: reconnect later, never die
                log.debug("Docker event stream: %s", exc)
            if self._stop.is_set():
                return
            if self.connects > before:
                delay = 1.0  # it worked for a while: start the backoff again
            self._stop.wait(delay)
            delay = min(self.max_backoff, delay * 2)
