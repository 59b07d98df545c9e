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


def _in(ns: str, *args: str) -> None:
    """A command inside namespace ``ns`` (iptables, sysctl)."""
    proc = subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=30)
    if proc.returncode != 0:
        raise AssertionError(f"in {ns}: {' '.join(args)}: {proc.stderr.strip()}")


class NatSite:
    """The tunnel's world (docs/tunnel.md): a segment where the master (this host's
    namespace, ``master_ip``) and the relay (namespace ``relay``, ``relay_ip``) meet, and
    a node (namespace ``node``, ``node_ip``) behind a NAT (namespace ``nat``, public
    address ``nat_ip`` on the segment) that masquerades the node's connections out and
    drops every connection coming in.

    The segment is a bridge in a namespace of its own, so this host gets one veth end
    and one route (to the node's private subnet, through the NAT: the master could dial
    the node's own address if the NAT let it), both removed with the namespaces.
    ``cut()``/``restore()`` drop every packet through the NAT, a dead link for both ends.
    """

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        third = random.randrange(1, 255)
        self.tag = tag
        self.seg, self.relay, self.nat, self.node = (f"dms{n}-{tag}" for n in "grtn")
        self.master_ip, self.relay_ip, self.nat_ip = (f"10.215.{third}.{n}" for n in (1, 2, 3))
        self.inside_gw, self.node_ip = f"10.216.{third}.1", f"10.216.{third}.2"
        self.inside_net = f"10.216.{third}.0/24"
        self._host_if = f"dmsm{tag}"
        self._made: list[str] = []

    def __enter__(self) -> NatSite:
        try:
            for ns in (self.seg, self.relay, self.nat, self.node):
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", self.seg, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.seg, "link", "set", "br0", "up")
            # the segment's members: this host (the master), the relay, the NAT's outside
            for ns, ifname, addr in ((None, self._host_if, self.master_ip),
                                     (self.relay, "eth0", self.relay_ip),
                                     (self.nat, "wan0", self.nat_ip)):
                port = f"p{len(self._made)}{ifname[:4]}"
                where = ("-n", ns) if ns else ()
                _ip(*where, "link", "add", ifname, "type", "veth", "peer", "name", port,
                    "netns", self.seg)
                _ip(*where, "addr", "add", f"{addr}/24", "dev", ifname)
                _ip(*where, "link", "set", ifname, "up")
                _ip("-n", self.seg, "link", "set", port, "master", "br0")
                _ip("-n", self.seg, "link", "set", port, "up")
                self._made.append(port)
            # the node's link to the NAT, its only way out
            _ip("-n", self.nat, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0",
                "netns", self.node)
            _ip("-n", self.nat, "addr", "add", f"{self.inside_gw}/24", "dev", "lan0")
            _ip("-n", self.nat, "link", "set", "lan0", "up")
            _ip("-n", self.node, "addr", "add", f"{self.node_ip}/24", "dev", "eth0")
            _ip("-n", self.node, "link", "set", "eth0", "up")
            _ip("-n", self.node, "route", "add", "default", "via", self.inside_gw)
            _ip("route", "add", self.inside_net, "via", self.nat_ip, "dev", self._host_if)
            _in(self.nat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            _in(self.nat, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan0",
                "-j", "MASQUERADE")
            _in(self.nat, "iptables", "-A", "FORWARD", "-i", "wan0", "-m", "conntrack",
                "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
            _in(self.nat, "iptables", "-A", "FORWARD", "-i", "wan0", "-j", "DROP")
            _in(self.nat, "iptables", "-A", "INPUT", "-i", "wan0", "-m", "conntrack",
                "--ctstate", "NEW", "-j", "DROP")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def exec(self, ns: str) -> list[str]:
        """The prefix that runs a command in namespace ``ns``."""
        return ["ip", "netns", "exec", ns]

    def cut(self) -> None:
        """The node's link dies: every packet through the NAT is dropped, no RST."""
        _in(self.nat, "iptables", "-I", "FORWARD", "1", "-j", "DROP")

    def restore(self) -> None:
        _in(self.nat, "iptables", "-D", "FORWARD", "1")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for ns in reversed([n for n in self._made if n.startswith("dms")]):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=30)
        subprocess.run(["ip", "link", "del", self._host_if], capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=30)
        self._made = []
