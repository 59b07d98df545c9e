"""The gateway's connections to the local Docker Engine, as ``docker`` configures it: a
unix socket, plain TCP, or TLS with the ``docker_tls_*`` client files (docs/design.md §6).

Each client connection of the gateway has its own connection to Docker (Docker's own
clients do the same), so a hijacked or streaming one never blocks another.
"""

from __future__ import annotations

import select
import socket
import ssl

from ..net import system_ca_bundle


class Upstream:
    """Where Docker is, and how to open a connection to it."""

    def __init__(self, endpoint: str, unix_path: str | None = None,
                 address: tuple[str, int] | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.endpoint = endpoint
        self.unix_path = unix_path
        self.address = address
        self.tls = tls

    @classmethod
    def from_settings(cls, docker: str, tls_ca: str | None, tls_cert: str | None,
                      tls_key: str | None) -> Upstream:
        """``docker`` as config.parse_docker normalised it: ``unix:///path``,
        ``tcp://host:port``, ``http://host:port`` or ``https://host:port``."""
        scheme, _, rest = docker.partition("://")
        if scheme == "unix":
            return cls(docker, unix_path=rest)
        host, _, port = rest.rstrip("/").rpartition(":")
        address = (host.strip("[]"), int(port))
        if scheme != "https":
            return cls(docker, address=address)
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        bundle = tls_ca or system_ca_bundle()
        if isinstance(bundle, str):
            context.load_verify_locations(cafile=bundle)
        if tls_cert and tls_key:
            context.load_cert_chain(tls_cert, tls_key)
        return cls(docker, address=address, tls=context)

    def connect(self, timeout: float) -> Stream:
        """A connected stream, blocking, with no timeout once connected: Docker's
        streams have none."""
        sock: socket.socket
        if self.unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(self.unix_path)
            except BaseException:
                sock.close()
                raise
        else:
            assert self.address is not None
            sock = socket.create_connection(self.address, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            if self.tls is not None:
                assert self.address is not None
                stream: Stream = TLSStream(sock, self.tls, self.address[0])
            else:
                stream = Stream(sock)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return stream


BUFFER = 256 * 1024
#: Kernel buffers of the sockets to Docker: a relay alternates reading one side and
#: writing the other, and larger buffers let both ends go on meanwhile.
SOCKET_BUFFER = 1 << 20


def readable(sock: socket.socket) -> bool:
    """The socket has something to read now (data, or its end)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class Stream:
    """A byte stream over a connected socket: what the relay reads, writes, half-closes
    and polls, the same for a plain socket and for TLS."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def pending(self) -> int:
        """Bytes readable without waiting on the socket (decrypted, or undecrypted in
        memory)."""
        return 0

    def readable_now(self) -> bool:
        """Docker sent something readable without waiting (an answer, or its end)."""
        return self.pending() > 0 or readable(self.sock)

    def recv(self) -> bytes:
        """Up to BUFFER bytes; b"" at the end of the stream."""
        return self.sock.recv(BUFFER)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shut_write(self) -> None:
        """End the stream towards the peer; its answer is still read (half-close)."""
        self.sock.shutdown(socket.SHUT_WR)

    # --- the same, never waiting (relay.pump sets the socket non-blocking)

    def recv_nb(self) -> bytes | None:
        """Bytes, b"" at the end of the stream, None when nothing is there yet."""
        try:
            return self.sock.recv(BUFFER)
        except (BlockingIOError, InterruptedError):
            return None

    def send_nb(self, data: bytes) -> int:
        """How many bytes of ``data`` were taken (0 when none fit now)."""
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0

    def flush_nb(self) -> bool:
        """Send what the stream holds itself (TLS records); True when nothing is left."""
        return True

    def abort(self) -> None:
        """From another thread: wake whatever waits on this stream, for good."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


class TLSStream(Stream):
    """TLS to a Docker Engine through memory BIOs, so that the write side can end with
    ``close_notify`` while Docker's output is still read: ``SSLSocket.unwrap()`` would
    wait for Docker's own close_notify and drop the application data before it (OpenSSL:
    application data after close notify)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, hostname: str) -> None:
        super().__init__(sock)
        self.held = b""
        self.cipher = bytearray()  # TLS records not sent yet (non-blocking mode)
        self.ended = False  # Docker's close_notify (or end of stream) has been read
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=hostname)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionError("Docker closed the connection during the TLS "
                                          "handshake") from None
        self._flush()

    def _fill(self) -> bool:
        data = self.sock.recv(BUFFER)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    def pending(self) -> int:
        """Application bytes readable now (the end counts as one), after decrypting what
        is already in memory: bytes that are only a TLS 1.3 session ticket, or a record
        not complete yet, do not count — recv() would wait on the socket for more."""
        if not self.held and not self.ended and self.incoming.pending:
            try:
                self.held = self.tls.read(BUFFER)
                self.ended = not self.held
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.ended = True
            self._flush()
        return len(self.held) + self.tls.pending() + int(self.ended)

    def readable_now(self) -> bool:
        if self.pending():
            return True
        if readable(self.sock):
            self._fill()
        return self.pending() > 0

    def recv(self) -> bytes:
        if self.held:
            data, self.held = self.held, b""
            return data
        if self.ended:
            return b""
        while True:
            try:
                data = self.tls.read(BUFFER)
                while len(data) < BUFFER and (self.tls.pending() or self.incoming.pending):
                    try:  # the next records already in memory: one larger piece
                        more = self.tls.read(BUFFER - len(data))
                    except ssl.SSLWantReadError:
                        break
                    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                        more = b""
                    if not more:  # the end, kept for the next call
                        self.ended = True
                        break
                    data += more
                self._flush()  # a TLS 1.3 key update may want an answer
                return data
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self.tls.write(view)
            view = view[written:]
            self._flush()

    def recv_nb(self) -> bytes | None:
        if self.held:
            data, self.held = self.held, b""
            return data
        while not self.ended:
            try:
                data = self.tls.read(BUFFER)
                self.ended = not data
                return data
            except ssl.SSLWantReadError:
                try:
                    raw = self.sock.recv(BUFFER)
                except (BlockingIOError, InterruptedError):
                    return None
                if raw:
                    self.incoming.write(raw)
                else:
                    self.incoming.write_eof()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.ended = True
            finally:
                self.cipher += self.outgoing.read()  # a TLS 1.3 key update's answer
        return b""

    def flush_nb(self) -> bool:
        self.cipher += self.outgoing.read()
        while self.cipher:
            try:
                sent = self.sock.send(self.cipher)
            except (BlockingIOError, InterruptedError):
                return False
            del self.cipher[:sent]
        return True

    def send_nb(self, data: bytes) -> int:
        if not self.flush_nb():
            return 0  # one lot of records at a time: the rest waits in its sender
        self.tls.write(data)
        self.flush_nb()
        return len(data)

    def _flush(self) -> None:
        data = self.outgoing.read()
        if self.cipher or self.sock.gettimeout() == 0.0:  # non-blocking: never wait here
            self.cipher += data
            self.flush_nb()
        elif data:
            self.sock.sendall(data)

    def shut_write(self) -> None:
        # Decrypt what is already in memory first: unwrap()'s second step reads, and
        # application data it finds there would be lost.
        while self.incoming.pending or self.tls.pending():
            try:
                self.held += self.tls.read(BUFFER)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
        try:
            self.tls.unwrap()  # writes close_notify; the second step wants Docker's
        except ssl.SSLWantReadError:
            pass
        self._flush()
