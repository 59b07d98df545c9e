"""The gateway's listener: the accept thread, the connection cap, the deadlines
(docs/design.md §6).

Each accepted connection gets a thread of its own (``relay.Connection``). The accept
thread also reaps: twice a second it cuts the connections whose TLS handshake or
request head is overdue (slowloris), so no connection needs a timer of its own and
a stream, once its head is in, has no timeout at all.

A stop drains, as Go's ``http.Server.Shutdown`` with a deadline does: the listening
socket closes at once, idle connections are cut at once, and an exchange in flight (the
master's ``POST /containers/create`` or ``/start``, relayed to Docker) may finish within
GRACE seconds, so that an agent restart (an upgrade, a configuration push) does not leave
the master guessing whether Docker did it. What is left then (streams) is cut.
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
#: Seconds a stop lets the exchanges in flight finish before it cuts what is still open
#: (streams never finish: ``events``, ``logs -f``). It bounds the stop, and the container
#: image's ``docker stop`` must end within 2 s: not longer.
GRACE = 1.0
#: Seconds a stop then waits for the connections' threads (blocking calls on their cut
#: sockets return at once; a thread still there is a daemon and does not hold the exit).
JOIN = 0.5
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
        #: notified under ``_lock`` when a connection is gone (a stop waits on it)
        self._changed = threading.Condition(self._lock)
        #: a stop has decided which connections are idle: no request is relayed any more
        self._closing = False
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
        self._closing = False
        self._thread = threading.Thread(target=self._accept, name="gateway-accept",
                                        daemon=True)
        self._thread.start()

    def reconfigure(self, context: ssl.SSLContext, authenticator: Authenticator,
                    upstream: Upstream, *, read_only: bool) -> None:
        """A reload: new handshakes and new requests use these (open streams go on)."""
        self.context, self.authenticator = context, authenticator
        self.upstream, self.read_only = upstream, read_only

    def stop(self) -> None:
        """Stop listening and end every connection, within about GRACE + JOIN seconds.

        1. The listening socket is shut at once (which wakes the accept thread).
        2. Under the lock, every connection is marked closing; the idle ones (in their
           handshake, awaiting a request head, kept alive between requests, or hijacked:
           see ``Connection._switch``) are cut now. A connection that has begun an
           exchange (``exchange_begins``) finishes it (its answer says ``Connection:
           close`` unless its head went before), then ends with close_notify instead
           of reading another request. Since the same lock decides both, a request is never relayed
           to Docker once its connection was found idle here.
        3. After GRACE seconds whatever is still open is cut, and the threads joined."""
        self._stopping.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # a blocked accept() returns now
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=2 * TICK)
        if sock is not None:
            sock.close()
        with self._lock:
            self._closing = True
            open_now = list(self._open)
            for conn in open_now:
                conn.closing = True
            idle = [conn for conn in open_now if not conn.busy]
        for conn in idle:
            conn.abort()
        with self._changed:
            self._changed.wait_for(lambda: not self._open, timeout=GRACE)
            left = list(self._open)
        if left:
            log.debug("gateway: stopping: %d connection(s) still open after %gs: cut",
                      len(left), GRACE)
        for conn in left:
            conn.abort()
        end = time.monotonic() + JOIN
        for conn in left:
            thread = conn.thread
            if thread is not None:
                thread.join(timeout=max(0.0, end - time.monotonic()))

    def exchange_begins(self, conn: Connection) -> bool:
        """``conn`` has read a request's head: True, and a stop now waits for its
        exchange (up to GRACE); False when a stop has already found it idle (it must
        relay nothing, and end)."""
        with self._lock:
            if conn.closing:
                return False
            conn.busy = True
            return True

    def exchange_ends(self, conn: Connection) -> bool:
        """``conn``'s exchange is over (answered, or switched to a raw stream): True
        when it may go on, False when a stop is under way (it ends now)."""
        with self._lock:
            conn.busy = False
            return not conn.closing

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            count = len(self._open)
        return {"connections": count, "connections_total": self.connections_total,
                "refused_at_cap": self.refused_at_cap}

    def gone(self, conn: Connection) -> None:
        with self._changed:
            self._open.discard(conn)
            self._changed.notify_all()

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
            if self._closing:  # a stop took its list of connections: this one is not in it
                raw.close()
                return
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
