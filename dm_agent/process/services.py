"""The agent's background services, beside the registration loop (docs/design.md §4, §6).

A service starts after the host is primed and before the first round, follows every
reload with the new settings, stops when the loop ends, and says what it is doing for
``dm-agent status``. None may stop another, nor the rounds: whatever one raises is
logged and the others go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..config.settings import Settings

if TYPE_CHECKING:  # the agent is handed in, not imported at run time
    from ..round.agent import Agent

log = logging.getLogger("dm_agent")


class Service(Protocol):
    name: str

    def start(self) -> None: ...

    def reload(self, settings: Settings) -> None: ...

    def stop(self) -> None: ...

    def snapshot(self) -> dict[str, Any]: ...


class Services:
    """The list the loop is handed: each call reaches every service, in order (stop in
    reverse), and one service's failure is logged, never raised."""

    def __init__(self, items: Sequence[Service] = ()) -> None:
        self.items = list(items)

    def _each(self, what: str, call: Callable[[Service], None],
              items: Sequence[Service] | None = None) -> None:
        for service in self.items if items is None else items:
            try:
                call(service)
            except Exception as exc:
                log.error("%s: %s failed: %s: %s", service.name, what, type(exc).__name__, exc)
                log.debug("the failure's traceback:", exc_info=True)

    def start(self) -> None:
        self._each("start", lambda s: s.start())

    def reload(self, settings: Settings) -> None:
        self._each("reload", lambda s: s.reload(settings))

    def stop(self) -> None:
        self._each("stop", lambda s: s.stop(), list(reversed(self.items)))

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for service in self.items:
            try:
                out[service.name] = service.snapshot()
            except Exception as exc:  # status is for the operator; never break a round
                out[service.name] = {"error": f"{type(exc).__name__}: {exc}"}
        return out


class EventsService:
    """Docker's event stream (``docker_events``): a change registers at once. The watcher
    belongs to the node source, which a reload replaces, so a reload follows the new one."""

    name = "events"

    def __init__(self, agent: Agent, on_change: Callable[[str], None]) -> None:
        self.agent, self.on_change = agent, on_change

    def start(self) -> None:
        if not self.agent.dry_run:
            self.agent.follow_events(self.on_change)

    def reload(self, settings: Settings) -> None:
        self.start()

    def stop(self) -> None:
        """Nothing of its own: the watcher stops with the agent's parts."""

    def snapshot(self) -> dict[str, Any]:
        watcher = self.agent.events
        if watcher is None:
            return {"state": "disabled", "since": None, "last_event": None}
        return {"state": "connected" if watcher.connected else "down",
                "since": watcher.changed_at, "last_event": watcher.last_event}
