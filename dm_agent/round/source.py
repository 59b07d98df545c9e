"""Where a round's node comes from: Docker, read only as much as the event stream says
is needed, and the last known node while Docker is unreachable."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from ..collectors.docker import DockerCollector, DockerTLS, NodeInfo, connect
from ..collectors.events import EventWatcher
from ..config.settings import Settings
from ..errors import DockerError
from .bounds import Progress
from .outage import Outage

# With a live event stream the container list is re-read only after a change, and at
# least this often (seconds) in case the stream missed something.
RELIST_EVERY = 600.0


class NodeSource:
    """The Docker collector, the event watcher, the relist policy and Docker's outage.

    ``timeout`` bounds each call to Docker (``bounds.Timeouts.docker``). ``outage`` and
    ``last`` (the last node read) outlive a reload: an outage goes on being one, and the
    node keeps its name while Docker is down."""

    def __init__(self, settings: Settings, progress: Progress, outage: Outage, timeout: float,
                 last: NodeInfo | None = None, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.settings = settings
        self.progress = progress
        self.outage = outage
        self.last = last
        self.clock = clock
        s = settings
        self.tls = DockerTLS(s.docker_tls_ca, s.docker_tls_cert, s.docker_tls_key) \
            if s.docker_tls_cert and s.docker_tls_key else None
        self.timeout = timeout
        self.docker = DockerCollector(s.docker, self.tls, self.timeout)
        self.events: EventWatcher | None = None
        self._listed_generation, self._listed_at = -1, 0.0
        self._info_connects, self._info_at = -1, 0.0

    def start_events(self, on_change: Callable[[str], None]) -> None:
        """Follow Docker's event stream (``docker_events = yes``) in a daemon thread."""
        s, tls, timeout = self.settings, self.tls, self.timeout
        if s.docker_events and self.events is None:
            self.events = EventWatcher(lambda: connect(s.docker, tls, timeout), on_change)
            self.events.start()

    def renew(self) -> None:
        """A fresh Docker client, after a round was abandoned with the old one."""
        self.docker.close()
        self.docker = DockerCollector(self.settings.docker, self.tls, self.timeout)

    def close(self) -> None:
        if self.events is not None:
            self.events.stop()
            self.events = None
        self.docker.close()

    def relist(self) -> tuple[bool, int]:
        """Whether this round must re-read the container list, and the event generation
        to remember: only while the event stream has been connected with no change since
        the last read is the old list kept, and never longer than RELIST_EVERY."""
        events = self.events
        if events is None:
            return True, -1
        generation = events.generation
        stale = self.clock() - self._listed_at >= max(RELIST_EVERY, self.settings.interval)
        return stale or not events.current(self._listed_generation), generation

    def reinfo(self) -> tuple[bool, int]:
        """Whether this round must re-read ``/info`` (name, labels), and the stream's
        connect count to remember: always, but for a round within half an interval of
        the last read while the event stream stayed connected (so an event-triggered
        round skips it, and every periodic round still reads it)."""
        events = self.events
        if events is None or not events.connected:
            return True, -1
        connects = events.connects
        recent = self.clock() - self._info_at < self.settings.interval / 2
        return not (recent and connects == self._info_connects), connects

    def collect(self) -> NodeInfo:
        """The node; while Docker fails, the last one's name and labels, no containers."""
        relist, generation = self.relist()
        reinfo, connects = self.reinfo()
        docker, live = self.docker, self.progress.live
        self.progress.doing(f"reading Docker at {docker.endpoint}")
        try:
            node = docker.collect(relist=relist, reinfo=reinfo)
            if relist and live():
                self._listed_generation, self._listed_at = generation, self.clock()
            if reinfo and live():
                self._info_connects, self._info_at = connects, self.clock()
        except DockerError as exc:
            last = self.last
            name = last.name if last else socket.gethostname()
            if live():
                message = str(exc)
                if not self.outage.active:
                    message += (f"; reporting host figures only, as node {name!r} "
                                "with no containers")
                self.outage.failed(exc.kind, message)
            return NodeInfo(name=name, labels=dict(last.labels) if last else {}, containers=[])
        if live():
            self.outage.recovered()
            self.last = node
        return node
