"""The one wiring of a running agent, foreground or daemon: the agent, its services, the
state file, the signals and the loop (docs/design.md §4).

``cli`` runs it in the foreground, ``daemon`` in the detached grandchild; what differs
between the two (where logs go, the pidfile's owner, telling the starter) is passed in.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable

from ..config.settings import Settings
from ..round.address import is_loopback, unmanaged
from ..round.agent import Agent, describe
from . import loop
from .notify import Watchdog
from .services import EventsService, Services
from .signals import Signals, Waker
from .state import StateWriter

log = logging.getLogger("dm_agent")


def build_services(agent: Agent, nudges: loop.Nudges) -> Services:
    """Docker's event stream, the gateway and the tunnel to it. The gateway's parser,
    bcrypt and TLS modules, and the tunnel's SSH library, are imported only when they are
    configured: a node without them keeps the agent's memory budget."""
    from ..gateway.service import Gateway, state_directory
    from ..tunnel.service import Tunnel

    return Services([EventsService(agent, nudges), Gateway(agent.settings, agent.announced),
                     Tunnel(agent.settings, state_directory)])


def serve(settings: Settings, reload: Callable[[], Settings] | None, *, dry_run: bool = False,
          state_file: str | None = None, watchdog: Watchdog | None = None,
          on_ready: Callable[[], None] | None = None, started: str = "started") -> int:
    """Run the agent until a stop signal; returns the exit code. ``state_file`` is where
    ``dm-agent status`` reads this agent (beside its pidfile); ``on_ready`` is called once
    the services started and the state says "running", before the first round."""
    agent = Agent(settings, dry_run=dry_run)
    signals = Signals(Waker())
    nudges = loop.Nudges(signals.waker)
    services = build_services(agent, nudges)
    writer = StateWriter(state_file, services=services) if state_file else None
    signals.install()

    def ready() -> None:
        if writer is not None:
            writer.write(agent)  # running, not registered yet
        log.info("%s: %s, %s", started, describe(settings), gateway_line(agent))
        if on_ready is not None:
            on_ready()

    try:
        return loop.run(agent, signals, reload, on_first=ready, watchdog=watchdog,
                        state=writer, services=services, nudges=nudges)
    finally:
        signals.restore()
        if writer is not None:
            writer.remove()


def announces_loopback(url: str) -> bool:
    """Whether the announced ``https://HOST:PORT`` names a loopback host, which the master
    replaces with the registration's source address (docs/design.md §1: the image's
    setting, docs/container.md)."""
    host = urllib.parse.urlsplit(url).hostname
    return host is not None and is_loopback(host)


def gateway_line(agent: Agent) -> str:
    """The gateway's part of the start line; while it is off, whether the master can
    manage the node at all (the start line is what the journal keeps of a start)."""
    settings = agent.settings
    if settings.gateway:
        announced = agent.announced()
        line = (f"gateway on {settings.gateway} ({settings.gateway_access} access), "
                f"announced as {announced}")
        if settings.tunnel:
            line += f" through the tunnel to {settings.tunnel}"
        elif announces_loopback(announced):
            line += (" (the master puts the address this node's registrations come from in "
                     "place of a loopback host)")
        return line
    off = "gateway off"
    if settings.gateway_off_reason:
        off += ": " + settings.gateway_off_reason
    note = unmanaged(settings)
    return f"{off}; {note}" if note else off
