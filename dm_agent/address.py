"""The Docker address announced to the master: configured, Docker's TCP endpoint, or
the IP of the interface that routes to the master (docs/design.md §1)."""

from __future__ import annotations

import socket

from .config import Settings
from .net import route_address, tcp_address


class Announcer:
    """The address announced for one configuration. Only a real one is kept: the
    host-name fallback (no route and no interface address yet, e.g. started before the
    network was up) is looked for again every round."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._found: str | None = None

    def address(self) -> str:
        s = self.settings
        tcp = tcp_address(s.docker)
        if tcp:
            return s.address or tcp
        if s.address:
            return s.address
        if self._found is None:
            self._found = route_address(s.master)
            if self._found is None:
                return socket.gethostname()
        return self._found
