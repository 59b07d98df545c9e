"""The gateway in front of a test dockerd, in-process, and the real clients that use it.

``GatewayRig`` starts a ``Listener`` on 127.0.0.1:0 with the real TLS context
(``gateway.tls.server_context``), the real ``Authenticator`` (a password hash made with a
low bcrypt cost, so tests stay fast) and an ``Upstream`` for any Docker endpoint. It gives
the docker CLI's environment for mutual TLS, curl's arguments for Basic auth, and a raw
TLS socket for the shapes no well-behaved client sends.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from dm_agent.gateway.auth import Authenticator, hash_password
from dm_agent.gateway.server import Listener
from dm_agent.gateway.tls import server_context
from dm_agent.gateway.upstream import Upstream

from .dockerd import DOCKER_CLI, Dockerd, TlsFiles
from .image import ensure_image

PASSWORD = "s3cret-gateway-pw"
DOCKER = DOCKER_CLI


def free_port() -> int:
    """A TCP port on 127.0.0.1 free now (for a program that binds it itself)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def engine() -> Iterator[Dockerd]:
    """A private dockerd for one test module (unix socket and plain TCP), with the image."""
    with Dockerd(tcp=True) as d:
        ensure_image(d)
        yield d


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    """An empty docker CLI config directory (the host's ~/.docker is not read)."""
    d = tmp_path / "docker-config"
    d.mkdir()
    return d


class GatewayRig:
    """A started Listener and how to reach it; ``close()`` stops it."""

    def __init__(self, tls: TlsFiles, docker: str, *, docker_tls: TlsFiles | None = None,
                 read_only: bool = False, max_connections: int = 1024,
                 header_timeout: float = 10.0, password_hash: str | None = None) -> None:
        self.tls = tls
        self.authenticator = Authenticator(password_hash or hash_password(PASSWORD.encode(), 4))
        upstream = Upstream.from_settings(
            docker, *((str(docker_tls.ca), str(docker_tls.client_cert),
                       str(docker_tls.client_key)) if docker_tls else (None, None, None)))
        context = server_context(str(tls.server_cert), str(tls.server_key), str(tls.ca),
                                 require_client_cert=False)
        self.listener = Listener(("127.0.0.1", 0), context, self.authenticator, upstream,
                                 read_only=read_only, max_connections=max_connections,
                                 header_timeout=header_timeout)
        self.listener.start()
        self.port = self.listener.address[1]
        self.url = f"https://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.listener.stop()

    # ------------------------------------------------------------------ the docker CLI
    def cli_env(self, config_dir: Path) -> dict[str, str]:
        """The docker CLI over mutual TLS (its own config dir: the host's is not read)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update(DOCKER_HOST=f"tcp://127.0.0.1:{self.port}", DOCKER_TLS_VERIFY="1",
                   DOCKER_CERT_PATH=str(self.tls.client_dir), DOCKER_CONFIG=str(config_dir))
        return env

    def docker(self, config_dir: Path, *args: str, stdin: bytes | None = None,
               timeout: float = 120, env: dict[str, str] | None = None,
               check: bool = True) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run([DOCKER, *args], input=stdin, capture_output=True,
                              timeout=timeout, env={**self.cli_env(config_dir), **(env or {})},
                              stdin=None if stdin is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: exit {proc.returncode}: "
                                 f"{proc.stderr.decode(errors='replace')}")
        return proc

    # ------------------------------------------------------------------ curl
    def curl(self, path: str, *args: str, user: str | None = "admin:" + PASSWORD,
             timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """curl with Basic auth (no client certificate); ``-i`` shows the head."""
        cmd = ["curl", "-sS", "-i", "--cacert", str(self.tls.ca), "--max-time", str(timeout)]
        if user is not None:
            cmd += ["-u", user]
        return subprocess.run([*cmd, *args, self.url + path], capture_output=True,
                              timeout=timeout + 10)

    # ------------------------------------------------------------------ raw TLS
    def connect(self, *, with_cert: bool = True, context: ssl.SSLContext | None = None,
                timeout: float = 10.0) -> ssl.SSLSocket:
        """A TLS connection to the gateway (the client certificate unless told)."""
        ctx = context or self.tls.client_context(with_cert=with_cert)
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        try:
            return ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        except BaseException:
            sock.close()
            raise

    @contextlib.contextmanager
    def raw(self, **kwargs: Any) -> Iterator[ssl.SSLSocket]:
        with self.connect(**kwargs) as tls:
            yield tls


def read_to_end(sock: socket.socket | ssl.SSLSocket, limit: float = 10.0) -> bytes:
    """Everything until the peer closes (AssertionError when it does not by ``limit``)."""
    sock.settimeout(limit)
    out = bytearray()
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return bytes(out)
            out += data
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
        return bytes(out)
    except TimeoutError:
        raise AssertionError(f"the gateway did not close within {limit}s; "
                             f"got {bytes(out)!r}") from None


def split_answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one HTTP answer (curl -i too)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


def wait_for(predicate: Any, what: str, timeout: float = 20.0) -> Any:
    """Poll ``predicate`` until truthy (its value) or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Recorder:
    """A unix-socket proxy in front of a dockerd socket that keeps every byte its clients
    send: what really reaches Docker (``Authorization`` must never be in it)."""

    def __init__(self, target: str | os.PathLike[str], path: Path) -> None:
        self.target, self.path, self.sent = os.fspath(target), path, bytearray()
        self._lock = threading.Lock()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(64)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                up.connect(self.target)
            except OSError:  # Docker gone: the client sees its connection closed
                conn.close()
                up.close()
                continue
            threading.Thread(target=self._pipe, args=(conn, up, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, conn, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self.sent += data
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        """Stop accepting: shutdown wakes the accept that closing alone would leave
        blocked (a thread of a finished test, still there for later ones)."""
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()


class RssWatch:
    """The peak resident memory of this process while the block runs (a sampling thread)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssWatch:
        self.start = self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


def write_image_tar(path: Path, ref: str, size: int) -> None:
    """A `docker save` archive of one image whose single layer holds ``size`` bytes of
    random data, written without holding it in memory."""
    import hashlib
    import io
    import json

    layer = path.with_suffix(".layer.tar")
    with tarfile.open(layer, "w") as tar:
        info = tarfile.TarInfo("big.bin")
        info.size = size
        r, w = os.pipe()

        def fill() -> None:
            with open(w, "wb") as out:
                left = size
                block = os.urandom(1 << 20)
                while left:
                    n = min(left, len(block))
                    out.write(block[:n])
                    left -= n

        t = threading.Thread(target=fill)
        t.start()
        with open(r, "rb") as src:
            tar.addfile(info, src)
        t.join()
    digest = hashlib.sha256()
    with open(layer, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    diff_id = "sha256:" + digest.hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [ref],
                            "Layers": ["layer/layer.tar"]}]).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in ((config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.add(layer, "layer/layer.tar")
    layer.unlink()


def lines(out: bytes) -> Sequence[str]:
    return out.decode(errors="replace").splitlines()
