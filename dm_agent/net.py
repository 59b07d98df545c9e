"""Endpoints, trust and secrets in messages: the helpers every network part shares.

- the node's system CA store (the reporter's https master, the collector's https Engine);
- masking a secret or a URL's ``user:password@`` in whatever a message quotes;
- a Docker endpoint's TCP address, the master's host and port, and the IP that routes
  to the master (the address announced when nothing else says, docs/design.md §1).
"""

from __future__ import annotations

import fnmatch
import os
import re
import socket
import urllib.parse
from collections.abc import Mapping

SECRET_MASK = "********"

# Where distributions keep the system CA store (the list Go's crypto/x509 reads, too).
SYSTEM_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # RHEL 7+
    "/etc/ssl/ca-bundle.pem",  # SUSE
    "/etc/ssl/cert.pem",  # Alpine
)


#: Variables that other programs read and this agent does not, with what it reads
#: instead: a node's proxy and Docker settings never change where the agent connects
#: (docs/configuration.md, Proxies and DOCKER_HOST). Their lower-case spellings too.
IGNORED_ENVIRONMENT = {
    "HTTP_PROXY": "the master is reached directly, never through a proxy",
    "HTTPS_PROXY": "the master is reached directly, never through a proxy",
    "ALL_PROXY": "the master is reached directly, never through a proxy",
    "DOCKER_HOST": "Docker is the docker setting (-d, DM_AGENT_DOCKER)",
}


def ignored_environment(env: Mapping[str, str]) -> list[str]:
    """A warning for each variable of ``IGNORED_ENVIRONMENT`` set in ``env``, so that
    what is ignored on purpose is not ignored silently (the values are not shown: a
    proxy URL may carry a password)."""
    out = []
    for name, instead in IGNORED_ENVIRONMENT.items():
        for spelling in (name, name.lower()):
            if env.get(spelling):
                out.append(f"{spelling} is set but not used: {instead} "
                           "(docs/configuration.md#proxies-and-docker_host)")
    return out


def system_ca_bundle() -> str | bool:
    """The system CA store as a file; True (the bundled certifi store) if none is found.

    requests would otherwise use its bundled store, and a frozen program's OpenSSL has
    its own build-time default paths, neither of which is what the node's admin manages.
    """
    for path in SYSTEM_CA_FILES:
        if os.path.isfile(path):
            return path
    return True


def redact(text: str, secret: str | None) -> str:
    """``text`` without the secret, in whatever spelling an exception may quote it."""
    if not secret:
        return text
    spellings = {secret, repr(secret)[1:-1], ascii(secret)[1:-1],
                 secret.encode("unicode_escape").decode("ascii"),
                 urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
    for spelling in sorted(spellings, key=len, reverse=True):
        if spelling:
            text = text.replace(spelling, SECRET_MASK)
    return text


USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*://)?)([^/@]*)@")


def redact_userinfo(text: str) -> str:
    """The URL with a ``user:password@`` part masked, for messages (a token may be the
    user name alone, so the whole part goes)."""
    return USERINFO.sub(lambda m: f"{m.group(1)}{SECRET_MASK}@", text, count=1)


def tcp_address(endpoint: str) -> str | None:
    """``host:port`` of a TCP Docker endpoint (the address the master reaches), else None."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("tcp", "http", "https"):
        return rest.rstrip("/")
    return None


def master_endpoint(master: str) -> tuple[str | None, int]:
    """Host and port of the master's URL; without a port, the scheme's (443 for https)."""
    url = urllib.parse.urlsplit(master)
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


NOT_HOST_INTERFACES = ("lo", "veth*", "docker*", "br-*")


def first_host_ip() -> str | None:
    """First IPv4 address of a real interface (not lo, veth*, docker*, br-*)."""
    import psutil

    try:
        interfaces = psutil.net_if_addrs()
    except OSError:  # e.g. AF_NETLINK refused by a sandbox: the address stays a gap
        return None
    for name, addrs in sorted(interfaces.items()):
        if any(fnmatch.fnmatchcase(name, p) for p in NOT_HOST_INTERFACES):
            continue
        for addr in addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                return str(addr.address)
    return None
