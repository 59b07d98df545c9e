"""The tunnel: reach through a relay for a node the master cannot dial (docs/design.md §8,
docs/tunnel.md).

The node keeps one outbound SSH connection to a stock OpenSSH ``sshd`` (the relay) and
asks it to listen on ``tunnel_listen``; what the master sends there comes back through the
connection to the node's gateway. TLS is end to end: the relay carries ciphertext only.
The parts, each in its own module:

- ``keys``: the node's key (made in the state directory on first use) and the relay's
  ``authorized_keys`` line for it;
- ``session``: one connection to the relay and its forward, on asyncssh's event loop;
- ``service``: the service the runner adds (start, reload, stop, snapshot), its thread,
  the reconnection with jittered backoff, and what it says.

The settings' text (the relay, the listen address, the pinned host key) is
``config.relay``'s; ``dm-agent tunnel-key`` is ``commands.tunnel_key``. ``check`` refuses,
where the settings are loaded, a ``tunnel_key`` the agent could not use.

Nothing here imports the SSH library at import time: an agent without ``tunnel`` loads
none of it.
"""

from __future__ import annotations

from ..config.settings import Settings
from ..errors import ConfigError


def check(settings: Settings) -> None:
    """Refuse a configured ``tunnel_key`` that is not a private key the agent can use
    (unreadable, protected by a passphrase, not a key), naming where it came from, so a
    start, a reload and ``--check-config`` refuse alike. cryptography is imported only
    then."""
    if not settings.tunnel or not settings.tunnel_key:
        return
    from .keys import public_line

    try:
        public_line(settings.tunnel_key)
    except ValueError as exc:
        raise ConfigError(f"{settings.sources['tunnel_key']}: invalid tunnel_key: "
                          f"{exc}") from None
