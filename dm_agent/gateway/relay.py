"""One client connection of the gateway, in its own thread (docs/design.md §6).

TLS handshake, then HTTP/1.1 requests parsed strictly (h11 and ``edge``), each checked
(authentication, read-only) and relayed to Docker over a connection of its own:

- request bodies, chunked or not, streamed as they arrive (``docker load`` of any size
  holds one buffer at a time);
- answers relayed as they come, chunk by chunk, with no idle timeout (``events``,
  ``logs -f``), while the client's side is watched so that a client that leaves ends
  its upstream stream;
- a switch of protocol (``Upgrade: tcp`` → 101, ``h2c``, WebSocket) or Docker's older raw
  200 answer to attach and exec turns the connection into two raw byte streams, with
  half-close: the client's end of stdin (``close_notify`` from the docker CLI's
  CloseWrite) ends the write side towards Docker, whose output is relayed until it ends.

A thread per connection with blocking sockets and a poll over the two, rather than
asyncio: asyncio's TLS transport closes the whole connection when the peer sends
``close_notify``, so it cannot carry a half-closed hijacked stream.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Protocol

import h11

from . import edge
from .upstream import BUFFER, Stream, Upstream

if TYPE_CHECKING:
    from .auth import Authenticator

log = logging.getLogger("dm_agent")

#: Seconds a kept-alive connection may wait for its next request.
KEEPALIVE_IDLE = 300.0
#: Seconds to connect to Docker.
CONNECT_TIMEOUT = 10.0
#: Seconds a closing connection reads what its client still sends (see drain()).
LINGER = 1.0
#: Bytes a client may send ahead while its answer is being relayed (then it is not read).
MAX_AHEAD = edge.MAX_HEAD
_HTTP_METHODS = (b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN")


class Listener(Protocol):
    """What a connection asks of the listener that accepted it (server.Listener)."""

    context: ssl.SSLContext
    authenticator: Authenticator
    upstream: Upstream
    read_only: bool
    header_timeout: float

    def exchange_begins(self, conn: Connection) -> bool: ...

    def exchange_ends(self, conn: Connection) -> bool: ...

    def gone(self, conn: Connection) -> None: ...


class ClientGone(Exception):
    """The client closed its connection, or it broke."""


class ClientStream(Stream):
    """The client's TLS connection."""

    sock: ssl.SSLSocket

    def __init__(self, sock: ssl.SSLSocket) -> None:
        super().__init__(sock)
        #: the end (close_notify or EOF) was read while reading on: said by the next recv
        self._ended = False

    def pending(self) -> int:
        return 1 if self._ended else self.sock.pending()

    def recv(self) -> bytes:
        """What has arrived, up to BUFFER bytes. A TLS read returns one record (16 KiB at
        most), so the records already there are read on without waiting: an upload is
        then relayed in large pieces, not one h11 event per record. An end found that way
        is kept for the next call (its close_notify is no longer on the socket to wake a
        poll)."""
        if self._ended:
            return b""
        try:
            data = self.sock.recv(BUFFER)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""
        if not data or len(data) >= BUFFER:
            return data
        pieces, size = [data], len(data)
        self.sock.setblocking(False)
        try:
            while size < BUFFER:
                more = self.sock.recv(BUFFER - size)
                if not more:
                    self._ended = True
                    break
                pieces.append(more)
                size += len(more)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            self._ended = True
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass
        finally:
            self.sock.setblocking(True)
        return b"".join(pieces)

    def recv_nb(self) -> bytes | None:
        if self._ended:
            return b""
        try:
            return self.sock.recv(BUFFER)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""

    def send_nb(self, data: bytes) -> int:
        # OpenSSL takes a retried write with the same first bytes (a moving buffer is
        # allowed): pump only ever appends to what it retries
        try:
            return self.sock.send(data)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return 0

    def abort(self) -> None:
        try:  # the plain socket's shutdown: SSLSocket.shutdown() drops its TLS state
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Say close_notify when the peer still listens, never wait for its own."""
        try:
            self.sock.setblocking(False)
            self.sock.unwrap()
        except (OSError, ValueError):
            pass
        drain(self.sock)
        self.sock.close()


def drain(sock: socket.socket) -> None:
    """End our side, then read (and drop) what the client still sends, for at most LINGER
    seconds, before the socket is closed: closing with unread bytes makes the kernel reset
    the connection, and the client could lose the answer it was just sent (an error
    answer to a request whose body it is still sending; the plain HTTP answer)."""
    end = time.monotonic() + LINGER
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        while (left := end - time.monotonic()) > 0 and poller.poll(left * 1000):
            if not socket.socket.recv(sock, BUFFER, socket.MSG_DONTWAIT):
                return
    except OSError:
        return


class Connection:
    """A client connection's whole life; ``run()`` is its thread's body."""

    def __init__(self, raw: socket.socket, peer: tuple[str, int], listener: Listener) -> None:
        self.raw = raw
        self.client = peer[0]
        self.listener = listener
        #: monotonic time by which the handshake or the request head must be in (the
        #: listener's reaper cuts the connection then), None while none is awaited
        self.deadline: float | None = time.monotonic() + listener.header_timeout
        self.stream: ClientStream | None = None
        self.up: Stream | None = None
        self.up_conn: h11.Connection | None = None
        self.cert_verified = False
        #: the listener is stopping (or cut it): no next request is read
        self.closing = False
        #: a request's exchange is under way: a stop lets it finish (the listener's lock)
        self.busy = False
        self.thread: threading.Thread | None = None

    # --- life

    def run(self) -> None:
        try:
            self._serve()
        except ClientGone:
            pass
        except (OSError, ssl.SSLError, h11.ProtocolError) as exc:
            log.debug("gateway: connection from %s ended: %s: %s", self.client,
                      type(exc).__name__, exc)
        except Exception as exc:  # never out of this thread: one connection is only itself
            log.debug("gateway: connection from %s failed: %s: %s", self.client,
                      type(exc).__name__, exc, exc_info=True)
        finally:
            self._close_upstream()
            if self.stream is not None:
                self.stream.close()
            else:
                drain(self.raw)
                self.raw.close()
            self.listener.gone(self)

    def abort(self) -> None:
        """From the reaper or ``Listener.stop()``: end the connection now."""
        self.closing = True
        for stream in (self.stream, self.up):
            if stream is not None:
                stream.abort()
        if self.stream is None:
            try:
                self.raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _handshake(self) -> ClientStream | None:
        first = self.raw.recv(5, socket.MSG_PEEK)
        if not first:
            return None
        if first[:4] in _HTTP_METHODS:  # plain HTTP to the TLS port, as Go answers it
            self.raw.sendall(b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\n"
                             b"Connection: close\r\n\r\nClient sent an HTTP request to an "
                             b"HTTPS server.\n")
            log.debug("gateway: plain HTTP from %s refused", self.client)
            self.raw.shutdown(socket.SHUT_WR)
            self.raw.settimeout(1.0)  # read what it sent, so that closing sends no RST
            try:
                while self.raw.recv(BUFFER):
                    pass
            except OSError:
                pass
            return None
        context = self.listener.context
        tls = context.wrap_socket(self.raw, server_side=True, do_handshake_on_connect=False)
        self.stream = ClientStream(tls)  # from here on, abort() reaches it
        try:
            tls.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            log.debug("gateway: TLS handshake with %s failed: %s", self.client, exc)
            return None
        self.cert_verified = context.verify_mode != ssl.CERT_NONE and bool(tls.getpeercert())
        return self.stream

    def _serve(self) -> None:
        if self._handshake() is None:
            return
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=edge.MAX_HEAD)
        while self._request(conn):
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            if not self.listener.exchange_ends(self):
                return  # the listener stops: end with close_notify, read no next request
            conn.start_next_cycle()
            self.deadline = time.monotonic() + KEEPALIVE_IDLE

    # --- reading the client

    def _client_data(self, conn: h11.Connection, head: bytearray | None) -> None:
        assert self.stream is not None
        data = self.stream.recv()
        if head is not None:
            if not head and data:  # the head's first byte: from now, header_timeout
                limit = time.monotonic() + self.listener.header_timeout
                self.deadline = limit if self.deadline is None else min(self.deadline, limit)
            head += data
        conn.receive_data(data)

    def _next(self, conn: h11.Connection, head: bytearray | None = None) -> object:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                self._client_data(conn, head)
                continue
            return event

    def _answer(self, conn: h11.Connection, status: int, message: str,
                headers: tuple[tuple[str, str], ...] = (), close: bool = False) -> None:
        """The gateway's own answer, in Docker's error shape."""
        assert self.stream is not None
        body = edge.error_body(message)
        out = conn.send(h11.Response(status_code=status, reason=edge.REASONS.get(status, ""),
                                     headers=edge.error_headers(body, headers, close)))
        out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
        out += conn.send(h11.EndOfMessage()) or b""
        self.stream.sendall(out)

    def _refuse(self, conn: h11.Connection, status: int, message: str) -> None:
        """400 and close: whatever follows in the stream cannot be trusted."""
        assert self.stream is not None
        body = edge.error_body(message)
        head = edge.raw_response_head(status, edge.REASONS.get(status, "").encode(), [
            (k.encode(), v.encode()) for k, v in edge.error_headers(body, close=True)])
        self.stream.sendall(head + body)

    # --- one request

    def _request(self, conn: h11.Connection) -> bool:
        """Read, check and relay one request; False when the connection must end."""
        head = bytearray(conn.trailing_data[0])
        try:
            event = self._next(conn, head)
            if isinstance(event, h11.ConnectionClosed):
                return False
            if not isinstance(event, h11.Request):
                raise edge.BadRequest(f"unexpected {type(event).__name__}")
            end = edge.head_end(head)
            edge.check_head(bytes(head[:end if end >= 0 else len(head)]))
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if exc.error_status_hint in (400, 431) else 400
            self._refuse(conn, status, f"gateway: bad request: {exc}")
            return False
        except edge.BadRequest as exc:
            self._refuse(conn, exc.status, f"gateway: bad request: {exc}")
            log.debug("gateway: bad request from %s: %s", self.client, exc)
            return False
        self.deadline = None
        if not self.listener.exchange_begins(self):
            return False  # the listener stops and found this connection idle: not relayed
        has_body = edge.has_body(event.headers)
        refusal = self._check(event)
        if refusal is not None:
            status, message, headers = refusal
            self._answer(conn, status, message, headers, close=has_body or self.closing)
            if has_body:
                return False
            self._next(conn)  # EndOfMessage
            return True
        if conn.client_is_waiting_for_100_continue:
            self.stream_send(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        try:
            return self._relay(conn, event)
        except h11.RemoteProtocolError as exc:  # in the body: a bad chunk, a short body
            if conn.our_state is h11.SEND_RESPONSE:
                self._refuse(conn, 400, f"gateway: bad request body: {exc}")
            log.debug("gateway: bad request body from %s: %s", self.client, exc)
            return False

    def stream_send(self, data: bytes | None) -> None:
        if data:
            assert self.stream is not None
            self.stream.sendall(data)

    def _check(self, req: h11.Request) -> tuple[int, str, tuple[tuple[str, str], ...]] | None:
        verdict = self.listener.authenticator.check(
            self.client, self.cert_verified, edge.header(req.headers, b"authorization"))
        if not verdict.ok:
            return verdict.status, verdict.message, verdict.headers
        if self.listener.read_only and (req.method not in (b"GET", b"HEAD")
                                        or edge.wants_upgrade(req.headers)):
            return 403, (f"gateway: read-only access: {req.method.decode()} "
                         f"{edge.api_path(req.target).decode('latin-1')} is not allowed "
                         "(gateway_access = read-only)"), ()
        return None

    # --- relaying it

    def _upstream(self) -> Stream:
        if self.up is None or self.up_conn is None or self.up_conn.our_state is not h11.IDLE:
            self._close_upstream()
            self.up = self.listener.upstream.connect(CONNECT_TIMEOUT)
            self.up_conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=edge.MAX_HEAD)
        return self.up

    def _close_upstream(self) -> None:
        if self.up is not None:
            self.up.close()
        self.up, self.up_conn = None, None

    def _relay(self, conn: h11.Connection, req: h11.Request) -> bool:
        try:
            up = self._upstream()
        except OSError as exc:
            self._answer(conn, 502, f"gateway: cannot reach Docker at "
                         f"{self.listener.upstream.endpoint}: {exc.strerror or exc}",
                         close=True)
            return False
        upc = self.up_conn
        assert upc is not None
        upgrade = edge.wants_upgrade(req.headers)
        headers = edge.forward_headers(req.headers, upstream=True)
        if edge.header(headers, b"host") is None:  # HTTP/1.0 may omit it; 1.1 may not
            headers.append((b"host", b"docker"))
        if conn.their_state is h11.SEND_BODY and edge.header(req.headers,
                                                              b"content-length") is None:
            headers.append((b"transfer-encoding", b"chunked"))
        if upgrade:
            headers += [(b"connection", b"Upgrade"), (b"upgrade", upgrade)]
        up.sendall(upc.send(h11.Request(method=req.method, target=req.target,
                                        headers=headers)) or b"")
        try:
            early = self._send_body(conn, up, upc)
        except h11.RemoteProtocolError as exc:  # a bad chunk: Docker gets no more of it
            self._close_upstream()
            self._refuse(conn, 400, f"gateway: bad request body: {exc}")
            return False
        answer = self._up_event(upc, watch=conn)
        if isinstance(answer, h11.InformationalResponse) and answer.status_code == 101:
            self._switch(conn, upc, answer.status_code, answer.reason, answer.headers)
            return False
        if not isinstance(answer, h11.Response):
            return False
        if req.method == b"POST" and edge.is_raw_stream(answer.status_code, answer.headers):
            self._switch(conn, upc, answer.status_code, answer.reason, answer.headers)
            return False
        out_headers = edge.forward_headers(answer.headers, upstream=False)
        length = edge.header(answer.headers, b"content-length")
        if length is not None:
            out_headers.append((b"content-length", length))
        if early or self.closing:  # the listener stops: this is the last exchange
            out_headers.append((b"connection", b"close"))
        # What Docker's last read completed goes out in one write (Docker writes many
        # small chunks: one TLS record and one syscall each added ~15 ms to a 1 MB list);
        # before waiting on Docker again, all of it is sent, so streams are not held back.
        out = bytearray(conn.send(h11.Response(status_code=answer.status_code,
                                               reason=answer.reason, headers=out_headers))
                        or b"")
        while True:
            event = upc.next_event()
            if event is h11.NEED_DATA:
                if out:
                    self.stream_send(bytes(out))
                    out.clear()
                upc.receive_data(self._up_data(conn))
            elif isinstance(event, h11.Data):
                out += conn.send(h11.Data(data=event.data)) or b""
            elif isinstance(event, h11.EndOfMessage):
                out += conn.send(h11.EndOfMessage()) or b""
                self.stream_send(bytes(out))
                break
            else:  # Docker closed mid-answer: so must we
                self.stream_send(bytes(out))
                return False
        if upc.our_state is h11.DONE and upc.their_state is h11.DONE:
            upc.start_next_cycle()
        else:
            self._close_upstream()
        return not early

    def _send_body(self, conn: h11.Connection, up: Stream, upc: h11.Connection) -> bool:
        """Stream the request's body to Docker; True when Docker answered before it all
        went (the rest is not read, and the connection ends after the answer)."""
        if conn.their_state is not h11.SEND_BODY:
            self._next(conn)  # EndOfMessage, of a request without a body
            up.sendall(upc.send(h11.EndOfMessage()) or b"")
            return False
        while True:
            event = self._next(conn)
            if isinstance(event, h11.Data):
                if up.readable_now():
                    return True  # Docker answers already (an error): stop sending
                up.sendall(upc.send(h11.Data(data=event.data)) or b"")
            elif isinstance(event, h11.EndOfMessage):
                up.sendall(upc.send(h11.EndOfMessage()) or b"")
                return False
            else:
                raise ClientGone()

    def _up_event(self, upc: h11.Connection, watch: h11.Connection) -> object:
        """The next event of Docker's answer; meanwhile a client that leaves ends it."""
        while True:
            event = upc.next_event()
            if event is not h11.NEED_DATA:
                return event
            upc.receive_data(self._up_data(watch))

    def _up_data(self, watch: h11.Connection) -> bytes:
        up, client = self.up, self.stream
        assert up is not None and client is not None
        ahead = len(watch.trailing_data[0])
        while True:
            if up.pending():
                return up.recv()
            poller = select.poll()
            poller.register(up.fileno(), select.POLLIN)
            reading_client = ahead < MAX_AHEAD
            if reading_client:
                poller.register(client.fileno(), select.POLLIN)
            ready = {fd for fd, _ in poller.poll(None if not client.pending() else 0)}
            if up.fileno() in ready:
                return up.recv()
            if reading_client and (client.pending() or client.fileno() in ready):
                data = client.recv()
                if not data:
                    raise ClientGone()
                watch.receive_data(data)  # the next request, read ahead: kept for later
                ahead += len(data)

    def _switch(self, conn: h11.Connection, upc: h11.Connection, status: int,
                reason: bytes, headers: edge.Headers) -> None:
        """Docker switched protocols: relay its answer's head, then raw bytes both ways."""
        up, client = self.up, self.stream
        assert up is not None and client is not None
        out = edge.forward_headers(headers, upstream=False)
        upgrade = edge.header(headers, b"upgrade")
        if status == 101 and upgrade:
            out += [(b"connection", b"Upgrade"), (b"upgrade", upgrade)]
        client.sendall(edge.raw_response_head(status, reason, out) + upc.trailing_data[0])
        ahead = conn.trailing_data[0]
        if ahead:
            up.sendall(ahead)
        self.up_conn = None  # no longer HTTP: not reused (abort() still reaches self.up)
        try:
            # A raw stream never finishes as an exchange does, so a stop cuts it at once
            # rather than at the end of its grace: not busy from here on.
            if self.listener.exchange_ends(self):
                pump(client, up)
        finally:
            up.close()


def _carry(src: Stream, dst: Stream, held: bytearray, src_open: bool) -> tuple[bool, bool]:
    """One step of one direction of pump(): read what ``src`` has (while fewer than
    BUFFER bytes wait), write what ``dst`` takes. (anything moved, ``src`` still open)"""
    moved = False
    if src_open and len(held) < BUFFER:
        data = src.recv_nb()
        if data is not None:
            src_open = bool(data)
            held += data
            moved = True
    if held:
        sent = dst.send_nb(bytes(held[:BUFFER]))
        del held[:sent]
        moved = moved or sent > 0
    return moved, src_open


def pump(client: Stream, up: Stream) -> None:
    """Raw bytes both ways until Docker ends its side. When the client ends its side
    first (stdin done), Docker's write side is ended once all the client sent has gone,
    and Docker's output is still relayed until it ends.

    Neither direction waits on the other: the sockets are non-blocking and at most
    BUFFER bytes wait per direction. With blocking writes, `cat` of a large stdin could
    hang for good: the gateway stuck writing stdin to Docker, Docker stuck writing cat's
    output to the gateway, which was not reading it."""
    client.sock.setblocking(False)
    up.sock.setblocking(False)
    to_up, to_client = bytearray(), bytearray()
    client_open = up_open = True
    shut = False
    while up_open or to_client:
        moved, client_open = _carry(client, up, to_up, client_open)
        if not client_open and not to_up and not shut:
            up.shut_write()  # stdin ended: half-close towards Docker
            shut = True
        up_flushed = up.flush_nb()
        moved_back, up_open = _carry(up, client, to_client, up_open)
        moved = moved or moved_back
        if moved or not (up_open or to_client):
            continue
        poller = select.poll()
        masks = {client.fileno(): (select.POLLIN if client_open and len(to_up) < BUFFER
                                   else 0) | (select.POLLOUT if to_client else 0),
                 up.fileno(): (select.POLLIN if up_open and len(to_client) < BUFFER else 0)
                 | (select.POLLOUT if to_up or not up_flushed else 0)}
        for fd, mask in masks.items():
            if mask:  # POLLHUP comes regardless: an fd with no interest would spin
                poller.register(fd, mask)
        for _fd, events in poller.poll():
            if events & (select.POLLERR | select.POLLNVAL):
                return
