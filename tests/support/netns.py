"""A network namespace of the test's own, joined to this host by a veth pair, for a
dockerd with Docker's real bridge networking (``-p``, NAT, docker-proxy) that touches
none of this host's interfaces or firewall (support.dockerd's ``netns``).

The host end of the pair is ``host_ip``; the namespace's end is ``ns_ip``, with its
default route through ``host_ip``. A container on the dockerd's bridge reaches a server
listening on ``host_ip`` (Docker masquerades it as ``ns_ip``), and this host reaches a
published port at ``ns_ip:PORT``, as another machine of the cluster would reach the node.
"""

from __future__ import annotations

import random
import secrets
import subprocess
from types import TracebackType


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=30)
    if proc.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


class Netns:
    """``ip netns add`` + a veth /30 from 10.213.0.0/16; the bridge subnet Docker should
    use is ``bip`` (from 10.214.0.0/16, the same third octet). Removed on exit (deleting
    the namespace removes both ends of the pair)."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name = f"dmt-{tag}"
        self._host_if, self._ns_if = f"dmh{tag}", f"dmn{tag}"
        third, fourth = random.randrange(1, 255), random.randrange(0, 64) * 4
        self.host_ip = f"10.213.{third}.{fourth + 1}"
        self.ns_ip = f"10.213.{third}.{fourth + 2}"
        self.bip = f"10.214.{third}.1/24"
        self._made = False

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def __enter__(self) -> Netns:
        _ip("netns", "add", self.name)
        self._made = True
        try:
            _ip("link", "add", self._host_if, "type", "veth", "peer", "name", self._ns_if)
            _ip("link", "set", self._ns_if, "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self._host_if)
            _ip("link", "set", self._host_if, "up")
            inside = ("-n", self.name)
            _ip(*inside, "addr", "add", f"{self.ns_ip}/30", "dev", self._ns_if)
            _ip(*inside, "link", "set", self._ns_if, "up")
            _ip(*inside, "link", "set", "lo", "up")
            _ip(*inside, "route", "add", "default", "via", self.host_ip)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._made:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=30)
            subprocess.run(["ip", "link", "del", self._host_if], capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=30)
            self._made = False
