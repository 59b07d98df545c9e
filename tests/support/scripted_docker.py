"""A scripted Docker Engine API, for what a real dockerd cannot be made to do on cue.

A real dockerd (tests/support/dockerd.py) is what the tests read containers from. This
one answers the few requests the agent makes (``/version``, ``/info``,
``/containers/json``, ``/events``) on a unix socket or on TCP 127.0.0.1, with behaviours
set per test: an event stream that it drops at once, ``/version`` answers that take
``version_delay`` seconds once the first event stream has been dropped. It records every
request path (and each ``/version`` answered) and counts the event streams it holds open.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import TracebackType
from typing import Any


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def address_string(self) -> str:
        return "scripted-docker"

    def _json(self, value: Any) -> None:
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        docker: ScriptedDocker = self.server.docker
        path = self.path.split("?", 1)[0].rstrip("/")
        path = "/" + path.split("/", 2)[2] if path.startswith("/v1.") else path
        docker.record(path)
        if path == "/version":
            if docker.dropped.is_set():
                docker.stopping.wait(docker.version_delay)
            self._json({"ApiVersion": "1.41", "Version": "20.10.0"})
            docker.record(path, answered=True)
        elif path == "/info":
            self._json({"Name": "scripted", "Labels": []})
        elif path == "/containers/json":
            self._json([])
        elif path == "/events":
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            if docker.drop_events:
                docker.dropped.set()
                return
            docker.streams_changed(+1)
            try:  # hold the stream until the client closes it (EOF) or the test ends
                self.connection.settimeout(0.2)
                while not docker.stopping.is_set():
                    try:
                        if not self.connection.recv(1024):
                            break
                    except TimeoutError:
                        continue
            except OSError:
                pass
            finally:
                docker.streams_changed(-1)
        else:
            self.send_error(404)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


class ScriptedDocker:
    """``url`` is the endpoint to give the agent; a context manager."""

    def __init__(self, socket_path: Path | None = None, *, drop_events: bool = False,
                 version_delay: float = 0.0) -> None:
        self.drop_events = drop_events
        self.version_delay = version_delay
        self.dropped = threading.Event()
        self.stopping = threading.Event()
        self.paths: list[tuple[float, str]] = []
        self.answered: list[tuple[float, str]] = []
        self.open_streams = 0
        self._lock = threading.Lock()
        self._server: socketserver.BaseServer
        if socket_path is not None:
            self._server = _UnixServer(str(socket_path), _Handler)
            self.url = f"unix://{socket_path}"
        else:
            self._server = _TCPServer(("127.0.0.1", 0), _Handler)
            self.address = self._server.server_address
            self.url = f"tcp://127.0.0.1:{self.address[1]}"
        self._server.docker = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)

    def record(self, path: str, *, answered: bool = False) -> None:
        with self._lock:
            (self.answered if answered else self.paths).append((time.monotonic(), path))

    def streams_changed(self, delta: int) -> None:
        with self._lock:
            self.open_streams += delta

    def count(self, path: str, *, answered: bool = False) -> int:
        """How many requests for *path* arrived (or, ``answered``, were answered)."""
        with self._lock:
            return sum(1 for _, p in (self.answered if answered else self.paths) if p == path)

    def __enter__(self) -> ScriptedDocker:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        with contextlib.suppress(OSError):
            if isinstance(self._server, _UnixServer):
                Path(self.url.removeprefix("unix://")).unlink()


def own_tcp_sockets_to(port: int) -> list[socket.socket]:
    """Duplicates of this process's TCP sockets connected to 127.0.0.1:``port``."""
    import os

    found = []
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM \
                    and sock.getpeername() == ("127.0.0.1", port):
                found.append(sock)
                continue
        except OSError:
            pass
        sock.close()
    return found
