"""The agent: one registration round, from the parts one configuration builds.

A round reads the node (``source``), the host's figures and the address to announce,
and hands the body to the ``sink``; it comes back as one ``Outcome``, which the loop
(``process.loop``) applies: ``settle`` logs it, the state file and the schedule take it.
A reload (``process.reload``) swaps in the parts of the new configuration.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from collections.abc import Callable
from typing import IO, Any, NamedTuple

from ..collectors.docker import NodeInfo
from ..collectors.events import EventWatcher
from ..collectors.host import HostCollector
from ..config.settings import Settings
from ..errors import internal_kind
from ..net import redact
from . import nodename, payload
from .address import Announcer, unmanaged
from .bounds import Progress, Timeouts, timeouts
from .outage import Outage
from .sink import Failure, MasterSink, Printer
from .source import NodeSource

log = logging.getLogger("dm_agent")


def describe(settings: Settings) -> str:
    """What the start line says at INFO (docs/design.md §4): the master, the host, the
    interval; the runner adds the gateway's part. The node's name is Docker's, known at
    the first registration, which its own line names; no Docker call delays the start."""
    return (f"master {settings.master or '(dry run)'}, host {socket.gethostname()}, "
            f"interval {settings.interval}s")


class Outcome(NamedTuple):
    """What one round came to, handed back whole to the loop that applies it."""

    #: the registration it built; None when it built none (or was abandoned)
    body: dict[str, Any] | None
    #: (kind, message) of its failure; None when the master took it, or it was printed
    failure: Failure | None

    @property
    def ok(self) -> bool:
        return self.failure is None


class Parts:
    """What one configuration builds, replaced whole by a reload: its limits (every
    timeout of a round, computed here once) and the parts that use them."""

    def __init__(self, limits: Timeouts, source: NodeSource, sink: MasterSink | Printer,
                 announcer: Announcer) -> None:
        self.limits, self.source, self.sink, self.announcer = limits, source, sink, announcer

    def renew(self) -> None:
        """Fresh Docker and master clients, after a round was abandoned with them."""
        self.source.renew()
        self.sink.renew()

    def close(self) -> None:
        self.source.close()
        self.sink.close()


class Agent:
    """Collects and registers, one round at a time; keeps the outages and what the state
    file reports of it (``report``)."""

    def __init__(self, settings: Settings, dry_run: bool = False,
                 out: IO[str] | None = None) -> None:
        self.settings = settings
        self.dry_run = dry_run
        self.out = out or sys.stdout
        self.progress = Progress()
        # Outages outlive a reload: a Docker still down is not a new failure.
        self.docker_outage = Outage("Docker")
        self.master_outage = Outage("registration")
        #: the master generation, for the state file: None, as the default body is read
        #: by both generations, so the agent never needs to find out (docs/registration.md,
        #: Masters and engines)
        self.master_generation: str | None = None
        self._refused_name: str | None = None
        #: (node, master, ttl) of the last registration logged at INFO
        self._registered_as: tuple[str, str, int] | None = None
        self.parts = self._build(settings, None)
        self.host = HostCollector(settings.net_exclude, self.parts.limits.disk)

    @property
    def time_format(self) -> str:
        """The ``time`` format in use (``utc`` or ``local``), for the state file."""
        return self.settings.time_format

    @property
    def events(self) -> EventWatcher | None:
        return self.parts.source.events

    def announced(self) -> str:
        """The address the registrations announce now (the current configuration's)."""
        return self.parts.announcer.address()

    def follow_events(self, on_change: Callable[[str], None]) -> None:
        """Follow Docker's event stream of the current configuration's source."""
        self.parts.source.start_events(on_change)

    def report(self) -> dict[str, Any]:
        """What the state file says of the agent itself (``dm-agent status``)."""
        s = self.settings
        docker_error = None
        if self.docker_outage.active:
            docker_error = redact(self.docker_outage.message, s.secret)
        return {
            "config_file": s.config_file,
            "master": s.master,
            "interval": s.interval,
            "ttl": s.ttl,
            "docker": {"reachable": docker_error is None, "error": docker_error},
            "stuck_mounts": self.host.disks.stuck,
            "time_format": self.time_format,
            "master_generation": self.master_generation,
            "unmanaged": unmanaged(s),
        }

    def _build(self, s: Settings, last: NodeInfo | None) -> Parts:
        limits = timeouts(s.interval)
        source = NodeSource(s, self.progress, self.docker_outage, limits.docker, last)
        sink: MasterSink | Printer = Printer(self.out)
        if s.master and not self.dry_run:
            sink = MasterSink(s, self.progress, limits.http)
        return Parts(limits, source, sink, Announcer(s))

    def swap(self, new: Settings) -> Parts:
        """Put the parts of ``new`` in place; returns the old ones, for the caller to close."""
        old, self.parts = self.parts, self._build(new, self.parts.source.last)
        self.settings = new
        self.host.net_exclude = new.net_exclude
        self.host.disks.deadline = self.parts.limits.disk
        return old

    def close(self) -> None:
        self.parts.close()

    def register(self, deadline: float | None = None) -> Outcome:
        """One registration, and what it came to: accepted (or printed), or why not.

        Never raises: whatever a collector, the encoder or the reporter raises is a
        failed round (``internal:<Name>``), described with what was being done.
        ``deadline`` (monotonic) bounds the master's whole answer."""
        body: dict[str, Any] | None = None
        try:
            self.progress.doing("starting")
            parts = self.parts
            body = self.build_body(parts)
            self._check_name(body["name"])
            if log.isEnabledFor(logging.DEBUG):
                log.debug("do registration with %s", json.dumps(body, ensure_ascii=False))
            return Outcome(body, parts.sink.send(body, deadline))
        except Exception as exc:
            reason = redact(f"{type(exc).__name__}: {exc}", self.settings.secret)
            if self.progress.live():
                log.debug("the failure's traceback:", exc_info=True)
            return Outcome(body, (internal_kind(exc),
                                  f"registration failed while {self.progress.stage}: {reason}"))

    def build_body(self, parts: Parts) -> dict[str, Any]:
        node = parts.source.collect()
        self.progress.doing("reading the host's figures")
        system = self.host.collect()
        self.progress.doing("finding the address to announce")
        return payload.build(node, parts.announcer.address(), system, self.settings.time_format)

    def settle(self, outcome: Outcome) -> None:
        """Log what a round came to, as the loop applies it (an abandoned round's never
        comes here): a failure through the master's outage (the first at ERROR, repeats
        at DEBUG), an accepted registration as its recovery, and at INFO when what the
        master knows of the node changes."""
        if outcome.failure is not None:
            kind, message = outcome.failure
            if kind != "stopped":  # not sent, the agent stopping: no news of the master
                self.master_outage.failed(kind, message)
            return
        sink = self.parts.sink
        if isinstance(sink, MasterSink) and outcome.body is not None:
            name = outcome.body["name"]
            self.master_outage.recovered()
            log.debug("registered %s with ttl=%d", name, sink.settings.ttl)
            self._accepted(name, sink.settings)

    def _accepted(self, name: str, s: Settings) -> None:
        """The first accepted registration at INFO, and again only when what the master
        knows changes (the node's name, the master, the ttl): never a line a round, so a
        healthy node's journal says it is registered in a handful of lines a day."""
        now = (name, s.master or "", s.ttl)
        if now != self._registered_as:
            self._registered_as = now
            log.info("registered as %s with %s (ttl %ds)", name, s.master, s.ttl)

    def _check_name(self, name: str) -> None:
        """Say once, at ERROR, that the master will refuse this node name, and why."""
        if name == self._refused_name:
            return
        why = nodename.problem(name)
        self._refused_name = name if why else None
        if why:
            log.error("node name %r (Docker's Name, the Engine host's hostname) will be "
                      "refused by the master: %s; give the host a valid DNS name "
                      "(hostnamectl set-hostname) and restart the Engine", name, why)
