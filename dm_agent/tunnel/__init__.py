"""The tunnel: reach through a relay for a node the master cannot dial (docs/design.md §8,
docs/tunnel.md).

The node keeps one outbound SSH connection to a stock OpenSSH ``sshd`` (the relay) and
asks it to listen on ``tunnel_listen``; what the master sends there comes back through the
connection to the node's gateway. TLS is end to end: the relay carries ciphertext only.
The parts, each in its own module:

- ``spec``: the settings' converters (``tunnel``, ``tunnel_listen``, ``tunnel_host_key``)
  and the pinned host key, with nothing of the SSH library;
- ``keys``: the node's key (made in the state directory on first use) and the relay's
  ``authorized_keys`` line for it;
- ``session``: one connection to the relay and its forward, on asyncssh's event loop;
- ``service``: the service the runner adds (start, reload, stop, snapshot), its thread,
  the reconnection with jittered backoff, and what it says;
- ``command``: ``dm-agent tunnel-key``.

Nothing here imports the SSH library at import time: an agent without ``tunnel`` loads
none of it.
"""
