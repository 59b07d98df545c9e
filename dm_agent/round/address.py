"""The Docker address announced to the master: configured, Docker's TCP endpoint, or
the IP of the interface that routes to the master (docs/design.md §1)."""

from __future__ import annotations

import ipaddress
import socket

from ..config.settings import Settings
from ..net import route_address, tcp_address


class Announcer:
    """The address announced for one configuration. Only a real one is kept: the
    host-name fallback (no route and no interface address yet, e.g. started before the
    network was up) is looked for again every round."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._found: str | None = None

    def address(self) -> str:
        s = self.settings
        if s.gateway:
            return self.gateway_url()
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

    def gateway_url(self) -> str:
        """``https://ADDR:PORT`` of the gateway (docs/design.md §6): a tunnel's
        ``tunnel_listen`` on the relay (§8), else a configured ``address`` (a bare host
        gets the gateway's port, an ``https://`` URL is taken as it is), then the gateway's
        own listen host when it is one address, then the address that routes to the
        master. The master keeps the first address a node
        registers, so this is all a node with a gateway ever registers."""
        s = self.settings
        assert s.gateway
        if s.tunnel_listen:  # the relay's port: the master cannot dial this node itself
            return "https://" + s.tunnel_listen
        host, _, port = s.gateway.rpartition(":")
        if s.address:
            if s.address.startswith("https://"):
                return s.address
            if s.address.count(":") == 1 or s.address.startswith("["):
                return "https://" + s.address
            return f"https://{s.address}:{port}"
        bare = host.strip("[]")
        if bare and bare not in WILDCARDS and not is_loopback(bare):
            return f"https://{host}:{port}"
        found = self._found = self._found or route_address(s.master)
        found = found or socket.gethostname()
        return f"https://[{found}]:{port}" if ":" in found else f"https://{found}:{port}"


WILDCARDS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def unmanaged(settings: Settings) -> str | None:
    """Why the master can list this node but not manage it, and the fix; None when it
    can (a gateway, or Docker on TCP), or when no master is set."""
    if settings.gateway or not settings.master or tcp_address(settings.docker):
        return None
    if settings.gateway_off_reason:
        why = "the gateway is off: " + settings.gateway_off_reason
    else:
        why = (f"Docker is on a unix socket ({settings.docker.partition('://')[2]}), which "
               "the master cannot reach, and the gateway is off")
    return (f"the master cannot manage this node's Docker: {why}; set gateway = 0.0.0.0:8771 "
            "and gateway_password_hash (docs/gateway.md)")
