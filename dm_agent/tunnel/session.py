"""One connection to the relay and its reverse forward, on asyncssh (docs/design.md §8).

``connect_and_forward`` authenticates with the node's key against the pinned host key
only, asks the relay to listen on ``tunnel_listen``, and forwards what arrives there to
the gateway. It returns when the connection ends; every way it can fail is raised as a
:class:`TunnelError` whose message is the operator's sentence. Imported only when the
tunnel is configured: asyncssh, asyncio and their modules cost memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import warnings
from collections.abc import Callable
from typing import Any

from cryptography.utils import CryptographyDeprecationWarning

with warnings.catch_warnings():
    # asyncssh names DSA in its type hints, which newer cryptography releases warn about
    # at import; the tunnel never uses DSA, and the warning would reach the journal.
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
    import asyncssh

from ..config.relay import HostKey, Listen, Relay

# asyncssh logs every connection at INFO on its own logger; the agent says what matters
# in its own words, and nothing of asyncssh's reaches the journal.
_lib_log = logging.getLogger("asyncssh")
_lib_log.addHandler(logging.NullHandler())
_lib_log.propagate = False

#: Seconds between keepalives to the relay, and how many may go unanswered: a link that
#: died is given up after about a minute, as the relay's ClientAlive* does on its side.
KEEPALIVE_INTERVAL = 15.0
KEEPALIVE_COUNT_MAX = 3
#: AES-GCM first: one call into OpenSSL per packet (AES-NI on amd64, the ARMv8 crypto
#: extensions on arm64), where asyncssh's ChaCha20-Poly1305 takes several.
ENCRYPTION = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
              "chacha20-poly1305@openssh.com")
#: Seconds to reach the relay's TCP port, then to finish the key exchange and the login.
CONNECT_TIMEOUT = 15.0
LOGIN_TIMEOUT = 20.0


class TunnelError(Exception):
    """A failed attempt, in the operator's words. ``kind`` groups repeats of one cause
    (logged once); ``permanent`` ones wait longer before the next attempt."""

    def __init__(self, kind: str, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.kind, self.permanent = kind, permanent


class _Client(asyncssh.SSHClient):
    """Keeps the host key the relay showed when it is not the pinned one, for the ERROR,
    and why the connection ended."""

    def __init__(self) -> None:
        self.shown: asyncssh.SSHKey | None = None
        self.lost: Exception | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        self.shown = key
        return False  # pinned: nothing but tunnel_host_key is trusted


def _shown(client: _Client) -> str:
    key = client.shown
    if key is None:
        return "another key"
    return f"{key.get_fingerprint('sha256')} ({key.get_algorithm()})"


async def connect_and_forward(relay: Relay, listen: Listen, host_key: HostKey, key_path: str,
                              target: tuple[str, int], on_up: Callable[[], None],
                              stopping: asyncio.Event) -> None:
    """Hold one tunnel until the connection ends (TunnelError) or ``stopping`` is set
    (returns)."""
    client = _Client()
    try:
        pinned = asyncssh.import_public_key(host_key.line)
        node_key = asyncssh.read_private_key(key_path)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise TunnelError("key", f"cannot use tunnel_key {key_path}: {exc}",
                          permanent=True) from None
    options: dict[str, Any] = dict(
        username=relay.user, client_keys=[node_key], known_hosts=([pinned], [], []),
        # nothing from the environment or the home directory: no ssh-agent, no
        # ~/.ssh/config, no other way to log in than the node's key
        agent_path=None, config=None, password=None, kbdint_auth=False,
        gss_host=None, preferred_auth="publickey", x509_trusted_certs=None,
        encryption_algs=list(ENCRYPTION), compression_algs=None,
        keepalive_interval=KEEPALIVE_INTERVAL, keepalive_count_max=KEEPALIVE_COUNT_MAX,
        connect_timeout=CONNECT_TIMEOUT, login_timeout=LOGIN_TIMEOUT)
    where = f"{relay.host}:{relay.port}"
    try:
        conn = await asyncssh.connect(relay.host, relay.port,
                                      client_factory=lambda: client, **options)
    except asyncssh.HostKeyNotVerifiable:
        raise TunnelError(
            "host-key", f"the relay {where} showed host key {_shown(client)}, not the "
            f"pinned tunnel_host_key {host_key.fingerprint} ({host_key.kind}): not "
            "authenticating to it; if the relay's host key was replaced, set the new one "
            "in tunnel_host_key", permanent=True) from None
    except asyncssh.PermissionDenied:
        raise TunnelError(
            "refused", f"the relay {where} refused this node's key ({key_path}) for user "
            f"{relay.user}: its authorized_keys needs the line 'dm-agent tunnel-key' "
            "prints", permanent=True) from None
    except asyncssh.KeyExchangeFailed as exc:
        raise TunnelError("kex", f"no common algorithm with the relay {where} (does it have "
                                 f"a {host_key.kind} host key?): {exc.reason}",
                          permanent=True) from None
    except asyncssh.DisconnectError as exc:
        raise TunnelError("disconnect", f"the relay {where} closed the connection before "
                                        f"the login: {exc.reason or type(exc).__name__}") from None
    except (asyncio.TimeoutError, TimeoutError):
        raise TunnelError("timeout", f"the relay {where} did not answer within "
                                     f"{CONNECT_TIMEOUT:g} s") from None
    except socket.gaierror as exc:
        raise TunnelError("resolve", f"cannot resolve the relay {relay.host}: "
                                     f"{exc.strerror or exc}") from None
    except OSError as exc:
        raise TunnelError("connect", f"cannot reach the relay {where}: "
                                     f"{_oserror(exc)}") from None
    try:
        try:
            await conn.forward_remote_port(listen.host, listen.port, *target)
        except asyncssh.ChannelListenError:
            raise TunnelError(
                "listen", f"the relay {where} refused to listen on {listen}: it still holds "
                "the port for this node's previous connection (freed when its "
                "ClientAliveInterval × ClientAliveCountMax run out), or the key's "
                f"permitlisten is not \"{listen}\", or something else listens there") from None
        on_up()
        closed = asyncio.ensure_future(conn.wait_closed())
        stop = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({closed, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if stopping.is_set():
            return
        raise TunnelError("lost", f"the connection to the relay {where} was lost"
                                  f"{_why(client)}")
    finally:
        conn.close()
        try:
            await asyncio.wait_for(conn.wait_closed(), 1.0)
        except (asyncio.TimeoutError, TimeoutError, OSError, asyncssh.Error):
            pass


def _oserror(exc: OSError) -> str:
    """``Connection refused`` rather than asyncio's ``Connect call failed (…)``."""
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _why(client: _Client) -> str:
    """Why the connection ended, as asyncssh told the client, if it said."""
    exc = client.lost
    if exc is None:
        return ""
    reason = getattr(exc, "reason", "") or str(exc) or type(exc).__name__
    return f": {reason}"
