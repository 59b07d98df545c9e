"""The gateway of the frozen program, as the packages ship it, with the docker CLI over
mutual TLS against a real dockerd (docs/design.md §6): the CLI cases the gateway's own
tests run in-process (test_gateway_cli.py), here through the real frozen agent, plus what
only a whole process shows (its peak RSS during a 256 MiB load) and the TLS versions and
ciphers it refuses."""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from agentproc import clean_env, stop, wait_listening
from support import gateway as shared
from support.dockerd import Dockerd, TlsFiles, make_tls_files
from support.frozen import require_frozen
from support.gateway import Recorder, free_port
from support.image import IMAGE

from dm_agent.gateway import auth, tls
from dm_agent.gateway.server import Listener
from dm_agent.gateway.upstream import Upstream

pytestmark = pytest.mark.docker

DOCKER = "/usr/bin/docker"  # Debian's docker.io, which .ci/deps installs
PASSWORD = "gateway-test-password"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


engine = shared.engine  # the gateway tests' private dockerd


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("gw-tls"))


@pytest.fixture(scope="module")
def agent(engine: Dockerd, certs: TlsFiles,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The frozen program the packages ship, its gateway on, in front of ``engine`` (the
    package's own Python path: PyInstaller's bundled h11, bcrypt, cryptography, OpenSSL)."""
    program = str(require_frozen())
    home = tmp_path_factory.mktemp("gw-agent")
    port = free_port()
    ini = home / "dm-agent.ini"
    ini.write_text(f"[main]\ndocker = {engine.unix_url}\ntimeout = 60\nlog_level = 1\n"
                   f"gateway = 127.0.0.1:{port}\ngateway_cert = {certs.server_cert}\n"
                   f"gateway_key = {certs.server_key}\ngateway_client_ca = {certs.ca}\n"
                   f"gateway_password_hash = {HASH}\n")
    proc = subprocess.Popen([program, "--dry-run", "-f", str(ini)], cwd=home, text=True,
                            env=clean_env(home, {"STATE_DIRECTORY": str(home / "state")}),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    wait_listening(port, proc)
    yield {"port": port, "proc": proc, "home": home}
    err = stop(proc)
    assert PASSWORD not in err and "Traceback" not in err, err


def cli(agent: dict[str, Any], certs: TlsFiles, *args: str, stdin: bytes | None = None,
        timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """The docker CLI through the gateway, over mutual TLS."""
    full = {**os.environ, "DOCKER_HOST": f"tcp://127.0.0.1:{agent['port']}",
            "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(certs.client_dir),
            "DOCKER_CONFIG": str(agent["home"] / "docker-config"), **(env or {})}
    return subprocess.run([DOCKER, *args], input=stdin, capture_output=True, env=full,
                          timeout=timeout, check=False)


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode()


def rss_peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


# --- the docker CLI over mutual TLS, through the real agent --------------------------


def test_cli_plain_calls_run_and_stdin(agent: dict[str, Any], certs: TlsFiles) -> None:
    assert "CONTAINER ID" in ok(cli(agent, certs, "ps", "-a"))
    assert ok(cli(agent, certs, "run", "--rm", "--network", "none", IMAGE, "echo",
                  "through the gateway")) == "through the gateway\n"
    # stdin ends → the CLI's close_notify → Docker's stdin closed → cat exits 0
    proc = cli(agent, certs, "run", "-i", "--rm", "--network", "none", IMAGE, "cat",
               stdin=b"hi\n")
    assert ok(proc) == "hi\n"
    name = f"gw-exec-{os.getpid()}"
    ok(cli(agent, certs, "run", "-d", "--name", name, "--network", "none", IMAGE,
           "sleep", "300"))
    try:
        assert ok(cli(agent, certs, "exec", "-i", name, "cat", stdin=b"to exec\n")) \
            == "to exec\n"
        assert cli(agent, certs, "exec", name, "sh", "-c", "exit 3").returncode == 3
        stats = ok(cli(agent, certs, "stats", "--no-stream", name))
        assert name in stats
    finally:
        cli(agent, certs, "rm", "-f", name)


def test_cli_streams_logs_follow_and_events(agent: dict[str, Any], certs: TlsFiles) -> None:
    since = str(int(time.time()) - 1)
    cid = ok(cli(agent, certs, "run", "-d", "--network", "none", IMAGE, "sh", "-c",
                 "for i in 1 2 3 4 5; do echo line$i; sleep 0.3; done"))
    # follows while the container runs, ends when it exits
    logs = ok(cli(agent, certs, "logs", "-f", cid.strip()))
    assert logs.split() == [f"line{i}" for i in range(1, 6)]
    events = ok(cli(agent, certs, "events", "--since", since, "--until",
                    str(int(time.time()) + 1), "--filter", f"container={cid.strip()}",
                    "--format", "{{.Status}}"))
    assert {"create", "start", "die"} <= set(events.split()), events
    cli(agent, certs, "rm", "-f", cid.strip())


def test_cli_events_stream_holds_until_the_client_leaves(agent: dict[str, Any],
                                                         certs: TlsFiles) -> None:
    """An idle stream is not cut (no idle timeout); the client leaving ends it."""
    env = {**os.environ, "DOCKER_HOST": f"tcp://127.0.0.1:{agent['port']}",
           "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(certs.client_dir)}
    follower = subprocess.Popen([DOCKER, "events", "--format", "{{.Status}} {{.Actor.ID}}"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.5)  # idle: nothing happens on the engine meanwhile
        cid = ok(cli(agent, certs, "create", "--network", "none", IMAGE, "true")).strip()
        assert follower.stdout is not None
        line = follower.stdout.readline().decode()
        assert line.startswith("create ") and cid in line
        assert follower.poll() is None
    finally:
        follower.kill()
        follower.wait()
    cli(agent, certs, "rm", "-f", cid)


def test_cli_cp_both_ways_and_build(agent: dict[str, Any], certs: TlsFiles,
                                    tmp_path: Path) -> None:
    name = f"gw-cp-{os.getpid()}"
    ok(cli(agent, certs, "run", "-d", "--name", name, "--network", "none", IMAGE,
           "sleep", "300"))
    try:
        src = tmp_path / "in.txt"
        src.write_bytes(os.urandom(3_000_000))
        ok(cli(agent, certs, "cp", str(src), f"{name}:/in.txt"))
        ok(cli(agent, certs, "cp", f"{name}:/in.txt", str(tmp_path / "back.txt")))
        assert (tmp_path / "back.txt").read_bytes() == src.read_bytes()
    finally:
        cli(agent, certs, "rm", "-f", name)
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "greeting").write_text("built through the gateway\n")
    (context / "Dockerfile").write_text(f"FROM {IMAGE}\nCOPY greeting /greeting\n"
                                        "RUN cat /greeting\n")
    # the classic builder: the test engine runs no BuildKit, and its containers no network
    out = ok(cli(agent, certs, "build", "--network", "none", "-t", "dmtest/built:1",
                 str(context), env={"DOCKER_BUILDKIT": "0"}))
    assert "built through the gateway" in out
    assert ok(cli(agent, certs, "run", "--rm", "--network", "none", "dmtest/built:1", "cat",
                  "/greeting")) == "built through the gateway\n"


def test_cli_load_of_a_large_image_does_not_grow_memory(agent: dict[str, Any], certs: TlsFiles,
                                                         engine: Dockerd, tmp_path: Path) -> None:
    """A 256 MiB `docker load` streams through: the agent's peak RSS grows by far less."""
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    with (rootfs / "blob").open("wb") as fh:
        for _ in range(256):
            fh.write(os.urandom(1 << 20))
    layer = tmp_path / "layer.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(layer), "."], check=True)
    shutil.rmtree(rootfs)
    direct = [DOCKER, "-H", engine.unix_url]
    subprocess.run([*direct, "import", str(layer), "dmtest/big:1"], check=True,
                   capture_output=True, timeout=300)
    saved = tmp_path / "big.tar"
    subprocess.run([*direct, "save", "-o", str(saved), "dmtest/big:1"], check=True, timeout=300)
    subprocess.run([*direct, "rmi", "dmtest/big:1"], check=True, capture_output=True)
    layer.unlink()
    assert saved.stat().st_size > 256 << 20
    pid = agent["proc"].pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the agent's peak RSS
    before = rss_peak_kb(pid)
    out = ok(cli(agent, certs, "load", "-i", str(saved), timeout=300))
    assert "dmtest/big:1" in out
    grown = rss_peak_kb(pid) - before
    assert grown < 32 * 1024, f"the agent's peak RSS grew by {grown} KiB for a 256 MiB load"
    # and back out: a 256 MiB save stream through the gateway arrives whole
    again = tmp_path / "again.tar"
    ok(cli(agent, certs, "save", "-o", str(again), "dmtest/big:1", timeout=300))
    assert again.stat().st_size == saved.stat().st_size
    subprocess.run([*direct, "rmi", "dmtest/big:1"], capture_output=True)


# --- the edge: an in-process listener whose deadlines and cap the tests set ---------


@pytest.fixture
def edge(engine: Dockerd, certs: TlsFiles, tmp_path: Path) -> Iterator[dict[str, Any]]:
    recorder = Recorder(str(engine.socket_path), tmp_path / "rec.sock")
    context = tls.server_context(str(certs.server_cert), str(certs.server_key), str(certs.ca),
                                 require_client_cert=False)
    made: list[Listener] = []

    def listen(**kw: Any) -> Listener:
        listener = Listener(("127.0.0.1", 0), context, auth.Authenticator(HASH),
                            Upstream.from_settings(f"unix://{tmp_path}/rec.sock", None, None,
                                                   None), **{"read_only": False, **kw})
        listener.start()
        made.append(listener)
        return listener

    yield {"listen": listen, "recorder": recorder}
    for listener in made:
        listener.stop()
    recorder.close()


def tls_conn(port: int, certs: TlsFiles | None = None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(certs.ca) if certs else None)
    if certs is None:
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                           server_hostname="127.0.0.1")


def exchange(port: int, raw: bytes) -> tuple[bytes, bool]:
    """Send ``raw`` on a new TLS connection; (all that came back, closed by the gateway)."""
    with tls_conn(port) as sock:
        sock.sendall(raw)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except (TimeoutError, ssl.SSLError, ConnectionResetError):
            return data, False
    return data, True


BASIC = "Authorization: Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_old_tls_and_weak_ciphers_are_refused(edge: dict[str, Any]) -> None:
    listener = edge["listen"]()
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = version
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            ctx.wrap_socket(socket.create_connection(listener.address, timeout=10)).close()
    cbc = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cbc.check_hostname, cbc.verify_mode = False, ssl.CERT_NONE
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA")
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        cbc.wrap_socket(socket.create_connection(listener.address, timeout=10)).close()


def test_keep_alive_serves_many_requests_on_one_connection(edge: dict[str, Any]) -> None:
    listener = edge["listen"]()
    with tls_conn(listener.address[1]) as sock:
        for _ in range(3):
            sock.sendall(f"GET /_ping HTTP/1.1\r\nHost: d\r\n{BASIC}\r\n\r\n".encode())
            data = b""
            while not re.search(rb"\r\n\r\nOK$", data):
                chunk = sock.recv(4096)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 200 ")
    assert edge["recorder"].sent.count(b"GET /_ping") == 3
