"""A private, real Docker Engine for the tests.

``Dockerd`` runs Debian's ``/usr/sbin/dockerd`` in a temporary directory of its own: own
``--data-root``, ``--exec-root`` (so its own containerd), pidfile, unix socket, daemon.json
(the host's ``/etc/docker/daemon.json`` is never read) and trust key (the host's
``/etc/docker/key.json`` is never written).  It touches no host network: no bridge, no
iptables, no forwarding sysctl; containers are created with ``network_mode=none``.  Several
instances can run side by side.  Needs root.

It can optionally listen on 127.0.0.1 over plain TCP or TLS (``--tlsverify`` with a
throwaway CA made with the ``openssl`` CLI), and it can run in a UTS namespace of its own
so that Docker's ``Name`` (the hostname dockerd sees) is whatever a test wants.

Stopping is by PID (SIGTERM, wait, SIGKILL), followed by a sweep of whatever this instance
left behind: its containerd and containerd-shims, the processes of its containers (found
through the instance's private ``--cgroup-parent``), the shims' sockets, its mounts and
its pidfiles, so that ``start()`` always works again on the same data root.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .netns import Netns

__all__ = [
    "API_VERSION",
    "DOCKER_CLI",
    "BulkResult",
    "Dockerd",
    "DockerdError",
    "FixtureContainer",
    "FixtureSet",
    "TlsFiles",
    "UnixHTTPConnection",
    "create_containers",
    "make_tls_files",
    "parse_labels",
    "populate",
    "remove_containers",
]

#: The API version the helpers speak (Docker 20.10); newer engines accept it too.
API_VERSION = "1.41"

DOCKERD = shutil.which("dockerd") or "/usr/sbin/dockerd"
#: The docker CLI the tests drive: the one Debian's docker.io installs (.ci/deps), by its
#: path. A machine may have another ahead of it on PATH (/usr/local/bin/docker), which a
#: fresh machine does not: the tests run what the project installs.
DOCKER_CLI = "/usr/bin/docker"
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MNT_DETACH = 2


class DockerdError(RuntimeError):
    """The private dockerd could not be started, stopped or asked something."""


# --------------------------------------------------------------------------- helpers


def parse_labels(raw: Iterable[str]) -> dict[str, str]:
    """Docker's ``key=value`` label strings as a dict: split at the first ``=`` only."""
    out: dict[str, str] = {}
    for item in raw:
        key, sep, value = item.partition("=")
        out[key] = value if sep else ""
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a unix socket (the Host header says ``localhost``)."""

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = os.fspath(socket_path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _request(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    hdrs = dict(headers or {})
    data: bytes | None
    if body is None:
        data = None
    elif isinstance(body, (bytes, bytearray)):
        data = bytes(body)
    else:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    return resp.status, resp.read()


def _versioned(path: str) -> str:
    if not path.startswith("/"):
        path = "/" + path
    if path == "/_ping" or path.startswith("/v1."):
        return path
    return f"/v{API_VERSION}{path}"


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA with one server and one client certificate (PEM files).

    ``client_dir`` holds ``ca.pem``, ``cert.pem``, ``key.pem`` (Docker's cert-path
    layout); the server side and the CA key live in ``server_dir``.
    """

    client_dir: Path
    server_dir: Path

    @property
    def ca(self) -> Path:
        return self.client_dir / "ca.pem"

    @property
    def client_cert(self) -> Path:
        return self.client_dir / "cert.pem"

    @property
    def client_key(self) -> Path:
        return self.client_dir / "key.pem"

    @property
    def server_cert(self) -> Path:
        return self.server_dir / "server-cert.pem"

    @property
    def server_key(self) -> Path:
        return self.server_dir / "server-key.pem"

    @property
    def ca_key(self) -> Path:
        return self.server_dir / "ca-key.pem"

    def client_context(self, *, with_cert: bool = True) -> ssl.SSLContext:
        """An ``ssl`` client context trusting only this CA (with the client cert)."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if with_cert:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.server_cert), str(self.server_key))
        if require_client_cert:
            ctx.load_verify_locations(cafile=str(self.ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise DockerdError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def make_tls_files(
    client_dir: Path,
    server_dir: Path | None = None,
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 2,
) -> TlsFiles:
    """Make a CA, a server cert (SANs ``hosts``) and a client cert with the openssl CLI.

    EC P-256 keys keep it fast (~50 ms).  The certs carry SKI/AKI and proper key usages so
    that strict verifiers (Go, OpenSSL 3, Python's X509_STRICT) accept them.
    """
    server_dir = server_dir if server_dir is not None else client_dir / "server"
    client_dir.mkdir(parents=True, exist_ok=True)
    server_dir.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(client_dir=client_dir, server_dir=server_dir)
    sans = ",".join(
        f"IP:{h}" if all(c in "0123456789.:" for c in h) else f"DNS:{h}" for h in hosts
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", str(files.ca_key), "-out", str(files.ca),
        "-days", str(days), "-subj", "/CN=dm-agent test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        cwd=server_dir,
    )  # fmt: skip
    leaves = (
        ("server", files.server_key, files.server_cert, "serverAuth", f"subjectAltName={sans}"),
        ("client", files.client_key, files.client_cert, "clientAuth", ""),
    )
    for name, key, cert, usage, san in leaves:
        csr = server_dir / f"{name}.csr"
        ext = server_dir / f"{name}.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyAgreement\n"
            f"extendedKeyUsage={usage}\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n" + (san + "\n" if san else "")
        )
        _openssl("req", "-new", *ec, "-keyout", str(key), "-out", str(csr),
                 "-subj", f"/CN=dm-agent test {name}", cwd=server_dir)  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(files.ca), "-CAkey", str(files.ca_key),
            "-CAcreateserial", "-days", str(days), "-sha256", "-extfile", str(ext),
            "-out", str(cert),
            cwd=server_dir,
        )  # fmt: skip
        key.chmod(0o600)
    return files


# --------------------------------------------------------------------------- processes


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # the state letter follows the last ')' (the comm may contain parentheses)
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _unix_listen_paths(pid: int) -> list[str]:
    """Paths of the unix sockets ``pid`` has open (to clean up after killed shims)."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    paths: list[str] = []
    if not inodes:
        return paths
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        next(f, None)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[6] in inodes and parts[7].startswith("/"):
                paths.append(parts[7])
    return paths


def _kill_and_wait(pids: Iterable[int], timeout: float = 5.0) -> None:
    pids = [p for p in pids if p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.02)


def _unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), os.fsencode(field))
    return os.fsdecode(raw)


def _mountpoints_under(base: Path) -> list[str]:
    base_s = os.fspath(base).rstrip("/") + "/"
    out: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape_mountinfo(line.split()[4])
            if (mp + "/").startswith(base_s):
                out.append(mp)
    return out


_libc: ctypes.CDLL | None = None


def _umount_lazy(path: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.umount2(os.fsencode(path), _MNT_DETACH)


def _cgroup_roots() -> list[Path]:
    """Mount points of all cgroup hierarchies (v1 controllers and/or the v2 tree)."""
    roots: list[Path] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype = right.split()[0] if right else ""
            if fstype in ("cgroup", "cgroup2"):
                roots.append(Path(left.split()[4]))
    return roots


# --------------------------------------------------------------------------- Dockerd

_LIVE: set[Dockerd] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _close_all() -> None:  # a last resort: fixtures normally close their instances
    with _LIVE_LOCK:
        live = list(_LIVE)
    for d in live:
        with contextlib.suppress(Exception):
            d.close()


class Dockerd:
    """A private dockerd.  Use as a context manager, or ``start()`` / ``close()``.

    ``labels``: daemon labels, a mapping or ``key=value`` strings (passed as
    ``--label``; dockerd itself refuses a label without ``=``).
    ``tcp``: also listen on plain TCP 127.0.0.1:<free port>.  ``tls``: listen on
    127.0.0.1:<free port> with ``--tlsverify`` instead (implies TCP).
    ``hostname``: run dockerd in a UTS namespace with this hostname, which becomes
    Docker's ``Name`` in ``/info`` (the host's hostname is not touched).
    ``netns``: run dockerd in that network namespace (support.netns) with Docker's bridge,
    NAT and published ports, as a node's Docker has them; without it, no bridge at all.
    """

    def __init__(
        self,
        *,
        labels: Mapping[str, str] | Iterable[str] | None = None,
        tcp: bool = False,
        tls: bool = False,
        hostname: str | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 20.0,
        shutdown_timeout: int = 2,
        extra_args: Sequence[str] = (),
        netns: Netns | None = None,
    ) -> None:
        if labels is None:
            self.label_args: list[str] = []
        elif isinstance(labels, Mapping):
            self.label_args = [f"{k}={v}" for k, v in labels.items()]
        else:
            self.label_args = list(labels)
        self.labels: dict[str, str] = parse_labels(self.label_args)
        self.tls = tls
        self.tcp = tcp or tls
        self.hostname = hostname
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.shutdown_timeout = shutdown_timeout
        self.extra_args = list(extra_args)
        self.netns = netns
        self._own_base = base_dir is None
        # short paths: unix socket paths are limited to 107 bytes
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="dmtest-", dir="/tmp"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_root = self.base_dir / "data"
        self.exec_root = self.base_dir / "exec"
        self.pidfile = self.base_dir / "docker.pid"
        self.socket_path = self.base_dir / "docker.sock"
        self.config_file = self.base_dir / "daemon.json"
        self.log_path = self.base_dir / "dockerd.log"
        self.cgroup_parent = f"dmtest-{secrets.token_hex(4)}"
        self.tcp_port: int | None = None
        self.tls_files: TlsFiles | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None
        self._lock = threading.RLock()
        self.last_start_seconds: float | None = None
        #: what populate() created on this instance (None until it ran)
        self.fixture_set: FixtureSet | None = None

    # ----------------------------------------------------------------- addresses
    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def tcp_address(self) -> str | None:
        """``127.0.0.1:PORT`` when listening on TCP (plain or TLS), else None."""
        return f"127.0.0.1:{self.tcp_port}" if self.tcp_port else None

    @property
    def tcp_url(self) -> str | None:
        """``tcp://127.0.0.1:PORT`` for the plain TCP listener, else None."""
        return f"tcp://{self.tcp_address}" if self.tcp_port and not self.tls else None

    @property
    def https_url(self) -> str | None:
        """``https://127.0.0.1:PORT`` for the TLS listener, else None."""
        return f"https://{self.tcp_address}" if self.tcp_port and self.tls else None

    @property
    def tls_dir(self) -> Path | None:
        """Directory with the client side: ``ca.pem``, ``cert.pem``, ``key.pem``."""
        return self.tls_files.client_dir if self.tls_files else None

    @property
    def pid(self) -> int | None:
        """PID of the running dockerd, else None."""
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> Dockerd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<Dockerd {self.base_dir} {state} tcp={self.tcp_address}>"

    def __hash__(self) -> int:
        return id(self)

    def _args(self) -> list[str]:
        args = [
            DOCKERD,
            "--config-file", str(self.config_file),
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.pidfile),
            "-H", self.unix_url,
            *(["--bip", self.netns.bip] if self.netns else [
                "--bridge=none",
                "--iptables=false",
                "--ip-masq=false",
                "--ip-forward=false",
                "--userland-proxy=false",
            ]),
            "--cgroup-parent", self.cgroup_parent,
            "--exec-opt", "native.cgroupdriver=cgroupfs",
            "--shutdown-timeout", str(self.shutdown_timeout),
            "--log-level", "info",
        ]  # fmt: skip
        if self.tcp_port:
            args += ["-H", f"tcp://127.0.0.1:{self.tcp_port}"]
            if self.tls:
                assert self.tls_files is not None
                args += [
                    "--tlsverify",
                    "--tlscacert", str(self.tls_files.ca),
                    "--tlscert", str(self.tls_files.server_cert),
                    "--tlskey", str(self.tls_files.server_key),
                ]  # fmt: skip
            else:
                args += ["--tls=false"]
        for label in self.label_args:
            args += ["--label", label]
        args += self.extra_args
        if self.hostname is not None:
            # unshare and sh both exec: the child's PID is dockerd's PID
            script = 'printf %s "$0" > /proc/sys/kernel/hostname && exec "$@"'
            args = ["unshare", "--uts", "--", "sh", "-c", script, self.hostname, *args]
        if self.netns is not None:
            # nsenter, not `ip netns exec`: that remounts /sys, and dockerd would then find
            # no cgroup file system (nsenter execs too: the PID is still dockerd's)
            args = ["nsenter", f"--net={self.netns.path}", "--", *args]
        return args

    def _env(self) -> dict[str, str]:
        drop = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("DOCKER_") and k not in drop
        }
        env["PATH"] = _SBIN_PATH + ":" + env.get("PATH", "")
        return env

    def start(self) -> Dockerd:
        """Start dockerd (no-op when running); return once ``/_ping`` answers."""
        with self._lock:
            if self.running:
                return self
            t0 = time.monotonic()
            self._cleanup_leftovers()
            self.data_root.mkdir(exist_ok=True)
            self.exec_root.mkdir(exist_ok=True)
            # our own daemon.json: the host's is not read, key.json is not written to /etc
            self.config_file.write_text(
                json.dumps({"deprecated-key-path": str(self.base_dir / "key.json")})
            )
            if self.tls and self.tls_files is None:
                self.tls_files = make_tls_files(
                    self.base_dir / "tls", self.base_dir / "tls-server"
                )
            first = self.tcp_port is None
            attempts = 3 if (self.tcp and first) else 1
            for attempt in range(attempts):
                if self.tcp and (first or self.tcp_port is None):
                    self.tcp_port = _free_port()
                try:
                    self._spawn_and_wait()
                    break
                except DockerdError as e:
                    in_use = "address already in use" in str(e)
                    if not (in_use and attempt + 1 < attempts):
                        raise
            with _LIVE_LOCK:
                _LIVE.add(self)
            self.last_start_seconds = time.monotonic() - t0
            return self

    def _spawn_and_wait(self) -> None:
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== dm-agent tests: starting {self._args()!r}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._args(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,  # a ^C in the terminal is ours to handle
                cwd=self.base_dir,
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            rc = self._proc.poll()
            if rc is not None:
                tail = self.log_tail(since=log_offset)
                self._proc = None
                self._cleanup_leftovers()
                raise DockerdError(
                    f"dockerd exited with status {rc} during startup; "
                    f"log {self.log_path}:\n{tail}"
                )
            if self.ping() and self._ping_tcp():
                return
            if time.monotonic() > deadline:
                tail = self.log_tail(since=log_offset)
                self.stop()
                raise DockerdError(
                    f"dockerd did not answer /_ping within {self.start_timeout}s; "
                    f"log {self.log_path}:\n{tail}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop dockerd by its PID: SIGTERM, wait, SIGKILL; then sweep its leftovers."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            self._cleanup_leftovers()
            self._close_client()

    def kill(self) -> None:
        """Crash dockerd (SIGKILL, no graceful shutdown), then sweep its leftovers."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
            self._cleanup_leftovers()
            self._close_client()

    def restart(self) -> Dockerd:
        """stop() then start(); same socket, same TCP port, same data root."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and remove the temporary directory (when this object made it)."""
        self.stop()
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self._own_base and self.base_dir.exists():
            if _mountpoints_under(self.base_dir):  # never rmtree through a mount
                raise DockerdError(f"mounts left under {self.base_dir}; not removing it")
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _close_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def _cleanup_leftovers(self) -> None:
        """Kill this instance's orphans and undo its mounts (idempotent)."""
        marker = os.fsencode(self.exec_root) + b"/"
        own = {os.getpid(), *(p.pid for p in [self._proc] if p is not None)}
        orphans = [
            pid
            for pid in _all_pids()
            if pid not in own and marker in _cmdline(pid) and _pid_alive(pid)
        ]
        sockets = [
            path
            for pid in orphans
            for path in _unix_listen_paths(pid)
            if not path.startswith(os.fspath(self.base_dir))
        ]
        # the containers' processes: everything in this instance's cgroup subtree
        cg_dirs: list[Path] = []
        cg_pids: set[int] = set()
        for root in _cgroup_roots():
            top = root / self.cgroup_parent
            if top.is_dir():
                for dirpath, _dirs, _files in os.walk(top, topdown=False):
                    cg_dirs.append(Path(dirpath))
                    with contextlib.suppress(OSError):
                        procs = (Path(dirpath) / "cgroup.procs").read_text().split()
                        cg_pids.update(int(p) for p in procs)
        _kill_and_wait([*orphans, *cg_pids])
        for path in sockets:
            with contextlib.suppress(OSError):
                os.unlink(path)
        for mp in sorted(_mountpoints_under(self.base_dir), key=len, reverse=True):
            _umount_lazy(mp)
        for d in cg_dirs:  # deepest first (os.walk bottom-up)
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
        # stale pidfiles: a reused PID would make dockerd/containerd refuse or reattach
        for stale in (self.pidfile, self.exec_root / "containerd" / "containerd.pid"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    # ----------------------------------------------------------------- talking to it
    def ping(self, timeout: float = 1.0) -> bool:
        """True when the unix socket answers ``GET /_ping`` with ``OK``."""
        conn = UnixHTTPConnection(self.socket_path, timeout=timeout)
        try:
            status, body = _request(conn, "GET", "/_ping")
            return status == 200 and body == b"OK"
        except OSError:
            return False
        finally:
            conn.close()

    def _ping_tcp(self, timeout: float = 1.0) -> bool:
        if not self.tcp_port:
            return True
        conn: http.client.HTTPConnection
        if self.tls:
            assert self.tls_files is not None
            conn = http.client.HTTPSConnection(
                "127.0.0.1", self.tcp_port, timeout=timeout,
                context=self.tls_files.client_context(),
            )  # fmt: skip
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.tcp_port, timeout=timeout)
        try:
            status, body = _request(conn, "GET", "/_ping")
            return status == 200 and body == b"OK"
        except (OSError, ssl.SSLError):
            return False
        finally:
            conn.close()

    def api(
        self,
        path: str,
        method: str = "GET",
        body: Any = None,
        *,
        params: Mapping[str, Any] | None = None,
        timeout: float = 30.0,
        expect_json: bool = True,
    ) -> Any:
        """One request over the unix socket; the parsed JSON (or text) answer.

        ``path`` is unversioned (``/info``, ``/containers/json``); ``/v1.41`` is added.
        Raises DockerdError on a status >= 400.
        """
        url = _versioned(path)
        if params:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
        conn = UnixHTTPConnection(self.socket_path, timeout=timeout)
        try:
            status, data = _request(conn, method, url, body)
        except OSError as e:
            raise DockerdError(f"{method} {url} on {self.socket_path}: {e}") from e
        finally:
            conn.close()
        if status >= 400:
            raise DockerdError(f"{method} {url}: HTTP {status}: {data.decode(errors='replace')}")
        if expect_json and data:
            return json.loads(data)
        return data.decode(errors="replace")

    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = self.api("/info")
        return result

    @property
    def name(self) -> str:
        """Docker's ``Name`` (what the agent registers as)."""
        return str(self.info()["Name"])

    @property
    def client(self) -> Any:
        """A ``docker.APIClient`` on the unix socket (made once, reset by stop())."""
        if self._client is None:
            import docker

            self._client = docker.APIClient(base_url=self.unix_url, version=API_VERSION)
        return self._client

    def tls_client(self, *, with_cert: bool = True) -> Any:
        """A ``docker.APIClient`` on the TLS port (optionally without the client cert)."""
        import docker

        if not self.tls or self.tls_files is None:
            raise DockerdError("this dockerd has no TLS listener")
        f = self.tls_files
        tls = docker.tls.TLSConfig(
            client_cert=(str(f.client_cert), str(f.client_key)) if with_cert else None,
            ca_cert=str(f.ca),
            verify=True,
        )
        client = docker.APIClient(base_url=self.https_url, tls=tls, version=API_VERSION)
        # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override Session.verify, which
        # would replace our CA file with the system store: ignore the environment
        client.trust_env = False
        return client

    def log_tail(self, lines: int = 40, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- containers


@dataclass(frozen=True)
class FixtureContainer:
    """One container populate() made, as the agent must report it."""

    id: str
    name: str
    image: str
    labels: dict[str, str]
    running: bool
    state: str  # "running", "created" or "exited"

    def as_payload(self) -> dict[str, Any]:
        """The entry docs/design.md §1 expects in ``containers``."""
        return {"id": self.id, "name": self.name, "image": self.image, "labels": self.labels}


@dataclass(frozen=True)
class FixtureSet:
    """What populate() created on one dockerd."""

    containers: tuple[FixtureContainer, ...]
    image: str
    image_id: str
    daemon_labels: dict[str, str] = field(default_factory=dict)

    def by_name(self, name: str) -> FixtureContainer:
        for c in self.containers:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def ids(self) -> set[str]:
        return {c.id for c in self.containers}

    @property
    def names(self) -> set[str]:
        return {c.name for c in self.containers}

    @property
    def running(self) -> tuple[FixtureContainer, ...]:
        return tuple(c for c in self.containers if c.running)

    @property
    def stopped(self) -> tuple[FixtureContainer, ...]:
        return tuple(c for c in self.containers if not c.running)

    def expected_containers(self) -> list[dict[str, Any]]:
        """The payload's ``containers`` entries for these containers, sorted by name."""
        return [c.as_payload() for c in sorted(self.containers, key=lambda c: c.name)]


@dataclass(frozen=True)
class _Spec:
    name: str
    state: str
    labels: dict[str, str] | None
    cmd: tuple[str, ...]
    by_id: bool = False


#: The fixture containers.  Label values with '=', unicode keys and values, an empty
#: value, a container without labels, running / created / exited ones, and one created
#: by image ID (Docker then reports the ID as its image).
FIXTURE_SPECS: tuple[_Spec, ...] = (
    _Spec("web-1", "running", {"app": "web", "dm.query": "a=b=c", "tier": "front"},
          ("sleep", "3600")),
    _Spec("db_1.primary", "running", {"tier": "db", "störe": "Grüße ✓ 日本"},
          ("sleep", "3600")),
    _Spec("plain-running", "running", None, ("sleep", "3600")),
    _Spec("job-exited", "exited", {"app": "job", "empty": "", "exit": "3"},
          ("sh", "-c", "exit 3")),
    _Spec("never-started", "created", {"note": "created, never started", "k": "v=w"},
          ("true",)),
    _Spec("no-labels", "created", None, ("true",)),
    _Spec("by-image-id", "exited", {"ref": "image id"}, ("true",), by_id=True),
)  # fmt: skip


def _create_body(
    image: str, cmd: Sequence[str], labels: Mapping[str, str] | None, running: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "Image": image,
        "Cmd": list(cmd),
        "HostConfig": {"NetworkMode": "none"},
        # sleep as PID 1 ignores SIGTERM: stop with SIGKILL, no 10 s wait
        "StopSignal": "SIGKILL",
        "StopTimeout": 1,
    }
    if labels is not None:
        body["Labels"] = dict(labels)
    if running:
        # back up after a dockerd restart, so a fault test leaves the set as it was
        body["HostConfig"]["RestartPolicy"] = {"Name": "always"}
    return body


def populate(dockerd: Dockerd, image: str | None = None) -> FixtureSet:
    """Create the fixture containers (FIXTURE_SPECS) on ``dockerd``; return them.

    Imports the busybox image first if needed.  Existing containers with the same
    names are removed first, so calling it twice is fine.
    """
    from .image import IMAGE, ensure_image

    image = image or IMAGE
    image_id = ensure_image(dockerd, image)
    existing = dockerd.api("/containers/json", params={"all": 1})
    wanted = {s.name for s in FIXTURE_SPECS}
    for c in existing:
        if {n.lstrip("/") for n in c["Names"]} & wanted:
            dockerd.api(f"/containers/{c['Id']}", "DELETE", params={"force": 1})
    created: list[FixtureContainer] = []
    for spec in FIXTURE_SPECS:
        ref = image_id if spec.by_id else image
        body = _create_body(ref, spec.cmd, spec.labels, spec.state == "running")
        cid = dockerd.api("/containers/create", "POST", body, params={"name": spec.name})["Id"]
        if spec.state in ("running", "exited"):
            dockerd.api(f"/containers/{cid}/start", "POST")
        if spec.state == "exited":
            dockerd.api(f"/containers/{cid}/wait", "POST", timeout=30)
        created.append(
            FixtureContainer(
                id=cid,
                name=spec.name,
                image=ref,
                labels=dict(spec.labels or {}),
                running=spec.state == "running",
                state=spec.state,
            )
        )
    result = FixtureSet(
        containers=tuple(created),
        image=image,
        image_id=image_id,
        daemon_labels=dict(dockerd.labels),
    )
    dockerd.fixture_set = result
    return result


@dataclass(frozen=True)
class BulkResult:
    ids: list[str]
    names: list[str]
    seconds: float

    @property
    def per_second(self) -> float:
        return len(self.ids) / self.seconds if self.seconds else float("inf")


def create_containers(
    dockerd: Dockerd,
    count: int,
    *,
    prefix: str = "bulk",
    labels: Mapping[str, str] | None = None,
    image: str | None = None,
    workers: int = 8,
) -> BulkResult:
    """Create ``count`` containers (never started) as fast as dockerd allows.

    Names are ``{prefix}-{i:05d}``; each gets ``labels`` plus ``dmtest.index=i``.  One
    keep-alive connection per worker thread over the unix socket; dockerd is the
    bottleneck (about 7 ms per container on 2 cores, so 3,000 take ~20 s).
    """
    from .image import IMAGE, ensure_image

    image = image or IMAGE
    ensure_image(dockerd, image)
    local = threading.local()
    url = _versioned("/containers/create")

    def one(i: int) -> str:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = UnixHTTPConnection(dockerd.socket_path, timeout=60)
        body = _create_body(image, ("true",), {**(labels or {}), "dmtest.index": str(i)}, False)
        name = f"{prefix}-{i:05d}"
        status, data = _request(conn, "POST", f"{url}?name={name}", body)
        if status != 201:
            raise DockerdError(f"create {name}: HTTP {status}: {data!r}")
        return str(json.loads(data)["Id"])

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        ids = list(ex.map(one, range(count)))
    seconds = time.monotonic() - t0
    return BulkResult(ids=ids, names=[f"{prefix}-{i:05d}" for i in range(count)], seconds=seconds)


def remove_containers(dockerd: Dockerd, ids: Iterable[str], *, workers: int = 8) -> float:
    """Force-remove containers; returns the seconds it took."""
    local = threading.local()

    def one(cid: str) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = UnixHTTPConnection(dockerd.socket_path, timeout=60)
        status, data = _request(conn, "DELETE", _versioned(f"/containers/{cid}?force=1"))
        if status not in (204, 404):
            raise DockerdError(f"remove {cid}: HTTP {status}: {data!r}")

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        list(ex.map(one, ids))
    return time.monotonic() - t0
