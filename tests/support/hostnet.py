"""The address docs/registration.md promises an agent announces when Docker is on a unix socket
and the master on loopback: the first IPv4 address of a real interface.

Read from ``ip -j`` (iproute2), not from the agent's own code, so that a test comparing
the two checks the rule rather than repeating it.
"""

from __future__ import annotations

import fnmatch
import json
import subprocess

#: interfaces that are not "real" (docs/registration.md, *address*): loopback,
#: containers' and bridges'
NOT_REAL = ("lo", "veth*", "docker*", "br-*")


def first_real_ipv4() -> str:
    """The first IPv4 address, by interface name, of an interface not in ``NOT_REAL``."""
    out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True,
                         check=True).stdout
    for iface in sorted(json.loads(out), key=lambda i: i["ifname"]):
        if any(fnmatch.fnmatch(iface["ifname"], p) for p in NOT_REAL):
            continue
        for addr in iface.get("addr_info", []):
            if addr.get("family") == "inet" and not addr["local"].startswith("127."):
                return str(addr["local"])
    raise AssertionError(f"this machine has no real interface with an IPv4 address: {out}")
