"""The gateway's listener: the accept thread, the connection cap, the deadlines
(docs/design.md §6).

Each accepted connection gets a thread of its own (``relay.Connection``). The accept
thread also reaps: twice a second it cuts the connections whose TLS handshake or
request head is overdue (slowloris), so no connection needs a timer of its own and
a stream, once its head is in, has no timeout at all.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any

from .relay import Connection

if TYPE_CHECKING:
    from .auth import Authenticator
    from .upstream import Upstream

log = logging.getLogger("dm_agent")

#: Seconds between two looks at the deadlines (and at a stop).
TICK = 0.5
#: Seconds after which a new burst of connections over the cap is logged again.
CAP_QUIET = 60.0


class Listener:
    """Listens on ``bind`` with TLS and serves each connection in its own thread."""

    def __init__(self, bind: tuple[str, int], context: ssl.SSLContext,
                 authenticator: Authenticator, upstream: Upstream, *, read_only: bool,
                 max_connections: int = 1024, header_timeout: float = 10.0) -> None:
        self.bind = bind
        self.context = context
        self.authenticator = authenticator
        self.upstream = upstream
        self.read_only = read_only
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.connections_total = 0
        self.refused_at_cap = 0
        self._open: set[Connection] = set()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._cap_logged_at: float | None = None
        self._cap_burst = 0

    @property
    def address(self) -> tuple[str, int]:
        assert self._sock is not None, "not listening"
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and listen (OSError when the address is taken), then accept in a thread."""
        host, port = self.bind
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=128,
                                    dualstack_ipv6=family == socket.AF_INET6 and host == "::")
        sock.settimeout(TICK)
        self._sock = sock
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept, name="gateway-accept",
                                        daemon=True)
        self._thread.start()

    def reconfigure(self, context: ssl.SSLContext, authenticator: Authenticator,
                    upstream: Upstream, *, read_only: bool) -> None:
        """A reload: new handshakes and new requests use these (open streams go on)."""
        self.context, self.authenticator = context, authenticator
        self.upstream, self.read_only = upstream, read_only

    def set_context(self, context: ssl.SSLContext) -> None:
        self.context = context

    def stop(self) -> None:
        """Stop listening and end every connection; returns within about 2 s."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * TICK)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with self._lock:
            open_now = list(self._open)
        for conn in open_now:
            conn.abort()
        end = time.monotonic() + 1.0
        for conn in open_now:
            thread = conn.thread
            if thread is not None:
                thread.join(timeout=max(0.0, end - time.monotonic()))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            count = len(self._open)
        return {"connections": count, "connections_total": self.connections_total,
                "refused_at_cap": self.refused_at_cap}

    def gone(self, conn: Connection) -> None:
        with self._lock:
            self._open.discard(conn)

    # --- the accept thread

    def _accept(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stopping.is_set():
            self._reap()
            try:
                raw, peer = sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                log.debug("gateway: accept failed: %s", exc)
                time.sleep(TICK)  # e.g. EMFILE: let connections end before trying again
                continue
            try:
                self._start(raw, peer)
            except Exception as exc:  # never lose the listener to one connection
                log.debug("gateway: cannot serve %s: %s", peer, exc)
                raw.close()

    def _start(self, raw: socket.socket, peer: Any) -> None:
        with self._lock:
            full = len(self._open) >= self.max_connections
        if full:
            self._at_cap(peer[0])
            raw.close()
            return
        raw.settimeout(None)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(raw, (str(peer[0]), int(peer[1])), self)
        thread = threading.Thread(target=conn.run, name=f"gateway-{peer[0]}", daemon=True)
        conn.thread = thread
        with self._lock:
            self._open.add(conn)
            self.connections_total += 1
        thread.start()

    def _at_cap(self, client: str) -> None:
        """One line per burst of refusals (refusals less than CAP_QUIET apart), not one
        per connection; the next burst's line counts the previous one."""
        self.refused_at_cap += 1
        now = time.monotonic()
        last, self._cap_logged_at = self._cap_logged_at, now
        if last is not None and now - last <= CAP_QUIET:
            self._cap_burst += 1
            return
        before, self._cap_burst = self._cap_burst, 1
        log.warning("gateway: %d connections open, the cap: refusing new ones, the first "
                    "from %s%s", self.max_connections, client,
                    f" ({before} refused in the previous burst)" if before else "")

    def _reap(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [c for c in self._open if c.deadline is not None and c.deadline < now]
        for conn in late:
            log.debug("gateway: %s did not send its request in time: closed", conn.client)
            conn.deadline = None
            conn.abort()
