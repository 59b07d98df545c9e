"""The Docker address announced to the master: configured, Docker's TCP endpoint, or
the IP of the interface that routes to the master."""

from __future__ import annotations

import socket

import psutil

from .collectors.docker import tcp_address
from .config import Settings, is_excluded


def master_endpoint(master: str) -> tuple[str | None, int]:
    """Host and port of the master's URL; without a port, the scheme's (443 for https)."""
    from urllib.parse import urlsplit

    url = urlsplit(master)
    return url.hostname, url.port or (443 if url.scheme == "https" else 80)


def route_address(master: str | None) -> str | None:
    """IP of the interface that routes to the master (a UDP connect sends no packet)."""
    if master:
        try:
            infos = socket.getaddrinfo(*master_endpoint(master), type=socket.SOCK_DGRAM)
            family, _, _, _, sockaddr = infos[0]
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect(sockaddr)
                ip = str(sock.getsockname()[0])
                if ip and not ip.startswith("127.") and ip != "::1":
                    return ip
        except (OSError, IndexError, ValueError):
            pass
    return first_host_ip()


def first_host_ip() -> str | None:
    """First IPv4 address of a real interface (not lo, veth*, docker*, br-*)."""
    try:
        interfaces = psutil.net_if_addrs()
    except OSError:  # e.g. AF_NETLINK refused by a sandbox: the address stays a gap
        return None
    for name, addrs in sorted(interfaces.items()):
        if is_excluded(name, ("lo", "veth*", "docker*", "br-*")):
            continue
        for addr in addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                return str(addr.address)
    return None


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
