"""The tunnel's settings as text (docs/design.md §8): pure converters for the key table,
and the relay's pinned host key. Nothing here needs the SSH library, so that
``--check-config`` and ``dm-agent status`` stay cheap."""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import struct
from typing import NamedTuple

#: The relay's sshd port when ``tunnel`` names none.
SSH_PORT = 22

#: Host key types a pinned key may have (what OpenSSH 8+ offers as host keys).
HOST_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                  "ecdsa-sha2-nistp521", "ssh-rsa")

# A user name as sshd takes it, and a host name of DNS labels (or an IP literal).
_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,31}$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class Relay(NamedTuple):
    """``tunnel = USER@RELAY[:PORT]`` taken apart."""

    user: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"


def _host(text: str, what: str) -> str:
    """An IP literal (brackets allowed around IPv6) or a DNS name; returned bare."""
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"expected an IP address or a host name for {what}, got {text!r}")
    return host.rstrip(".").lower()


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"expected a port number 1-65535, got {text!r}")
    return int(text)


def _split_hostport(text: str) -> tuple[str, str | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` → (host text, port text or None)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {text!r}")
        rest = text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected [IPv6]:PORT, got {text!r}")
        return text[:end + 1], rest[1:] if rest else None
    if text.count(":") > 1:  # a bare IPv6 literal: no port can follow it unbracketed
        return text, None
    host, sep, port = text.partition(":")
    return host, port if sep else None


def split_tunnel(text: str) -> Relay:
    """``USER@RELAY[:PORT]`` → Relay; ValueError naming what is wrong."""
    value = text.strip()
    user, sep, rest = value.rpartition("@")
    if not sep or not user:
        raise ValueError(f"expected USER@RELAY[:PORT] (the relay's user for this node), "
                         f"got {value!r}")
    if not _USER.match(user):
        raise ValueError(f"expected a user name of letters, digits, '.', '_' or '-', "
                         f"got {user!r}")
    host, port = _split_hostport(rest)
    return Relay(user, _host(host, "the relay"), _port(port) if port is not None else SSH_PORT)


def parse_tunnel(text: str) -> str | None:
    """``tunnel``: empty (off) or ``USER@RELAY[:PORT]``, normalised with its port."""
    if not text.strip():
        return None
    return str(split_tunnel(text))


class Listen(NamedTuple):
    """``tunnel_listen = ADDR:PORT``: where the relay listens for the master."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def split_listen(text: str) -> Listen:
    value = text.strip()
    host, port = _split_hostport(value)
    if port is None:
        raise ValueError(f"expected ADDR:PORT (the address on the relay that the master "
                         f"dials), got {value!r}")
    bare = _host(host, "tunnel_listen")
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        ip = None
    if bare == "localhost" or (ip is not None and ip.is_loopback):
        raise ValueError(f"{bare} is a loopback address: the master would dial itself (it "
                         "puts a registration's source address in place of a loopback "
                         "host); give the relay's address that the master reaches")
    if ip is not None and ip.is_unspecified:
        raise ValueError(f"{bare} is not an address the master can dial; give the relay's "
                         "address that the master reaches")
    return Listen(bare, _port(port))


def parse_tunnel_listen(text: str) -> str | None:
    """``tunnel_listen``: empty or ``ADDR:PORT``, not loopback, not a wildcard."""
    if not text.strip():
        return None
    return str(split_listen(text))


class HostKey(NamedTuple):
    """A public key as OpenSSH writes it: type and base64 blob (the comment is dropped)."""

    kind: str
    blob: bytes

    @property
    def line(self) -> str:
        return f"{self.kind} {base64.b64encode(self.blob).decode()}"

    @property
    def fingerprint(self) -> str:
        """As ``ssh-keygen -l`` shows it: SHA256, base64 without padding."""
        digest = base64.b64encode(hashlib.sha256(self.blob).digest()).decode()
        return "SHA256:" + digest.rstrip("=")

    def __str__(self) -> str:
        return self.line


def decode_host_key(text: str) -> HostKey:
    """``TYPE BASE64 [comment]`` (an ``ssh_host_*_key.pub`` line), or a ``known_hosts``
    line ``HOST TYPE BASE64``; the type must match the one inside the blob."""
    fields = text.split()
    if len(fields) >= 3 and fields[0] not in HOST_KEY_TYPES and fields[1] in HOST_KEY_TYPES:
        fields = fields[1:]  # a known_hosts line: its host names are not needed
    if len(fields) < 2:
        raise ValueError("expected the relay's host public key, 'ssh-ed25519 AAAA…' (the "
                         "relay's /etc/ssh/ssh_host_ed25519_key.pub), or a file holding it")
    kind, data = fields[0], fields[1]
    if kind not in HOST_KEY_TYPES:
        raise ValueError(f"unknown host key type {kind!r}: expected one of "
                         f"{', '.join(HOST_KEY_TYPES)}")
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the {kind} key is not valid base64") from None
    if len(blob) < 4:
        raise ValueError(f"the {kind} key is truncated")
    (size,) = struct.unpack(">I", blob[:4])
    if blob[4:4 + size] != kind.encode():
        raise ValueError(f"the key's data is not a {kind} key (is it truncated or "
                         "another key's?)")
    return HostKey(kind, blob)


def parse_host_key(text: str) -> str | None:
    """``tunnel_host_key``: the key itself, or the absolute path of a file holding it (the
    first line that is not a comment). Returned as ``TYPE BASE64``."""
    value = text.strip()
    if not value:
        return None
    if value.startswith("/"):
        try:
            with open(value, encoding="utf-8") as fh:
                lines = [ln for ln in fh.read(65536).splitlines()
                         if ln.strip() and not ln.lstrip().startswith("#")]
        except OSError as exc:
            raise ValueError(f"cannot read the host key file {value}: "
                             f"{exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{value} is not a public key (not text)") from None
        if not lines:
            raise ValueError(f"{value} holds no public key")
        try:
            return decode_host_key(lines[0]).line
        except ValueError as exc:
            raise ValueError(f"{value}: {exc}") from None
    return decode_host_key(value).line
