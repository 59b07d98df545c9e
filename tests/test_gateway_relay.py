"""The gateway with real clients against a real dockerd (docs/design.md §6): the docker
CLI over mutual TLS, curl and the Docker SDK with Basic auth, through the real agent
program; and what the edge refuses, through an in-process listener whose deadlines and
cap a test can set."""

from __future__ import annotations

import base64
import json
import logging
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
import docker
import pytest
from agentproc import BIN, clean_env, stop
from support.dockerd import Dockerd, TlsFiles, make_tls_files
from support.frozen import require_frozen
from support.gateway import Recorder
from support.image import IMAGE, ensure_image

from dm_agent.gateway import auth, tls
from dm_agent.gateway.server import Listener
from dm_agent.gateway.upstream import Upstream

pytestmark = pytest.mark.docker

DOCKER = "/usr/bin/docker"  # Debian's docker.io, which .ci/deps installs
PASSWORD = "gateway-test-password"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def engine() -> Iterator[Dockerd]:
    d = Dockerd()
    d.start()
    ensure_image(d)
    yield d
    d.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("gw-tls"))


@pytest.fixture(scope="module", params=["venv", "frozen"])
def agent(request: pytest.FixtureRequest, engine: Dockerd, certs: TlsFiles,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The real agent program with its gateway on, in front of ``engine``: as installed
    in the venv, and the frozen program the packages ship."""
    program = str(require_frozen()) if request.param == "frozen" else BIN
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
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "gateway not up"
            time.sleep(0.1)
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


# --- curl and the Docker SDK with Basic auth ------------------------------------------


def test_curl_and_the_sdk_with_basic_auth(agent: dict[str, Any], certs: TlsFiles) -> None:
    url = f"https://127.0.0.1:{agent['port']}"
    out = subprocess.run(["curl", "-sS", "--cacert", str(certs.ca), "-u", f"admin:{PASSWORD}",
                          f"{url}/version"], capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout)["ApiVersion"], out.stderr
    wrong = subprocess.run(["curl", "-sS", "-i", "--cacert", str(certs.ca), "-u",
                            "admin:nope", f"{url}/version"], capture_output=True, text=True,
                           timeout=30)
    head, _, body = wrong.stdout.partition("\n\n")  # text=True: newlines translated
    assert head.startswith("HTTP/1.1 401") and "WWW-Authenticate: Basic" in head
    assert "message" in json.loads(body)
    bare = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                           "--cacert", str(certs.ca), f"{url}/version"],
                          capture_output=True, text=True, timeout=30)
    assert bare.stdout == "401"
    client = docker.APIClient(base_url=url, version="1.41",
                              tls=docker.tls.TLSConfig(ca_cert=str(certs.ca), verify=str(certs.ca)))
    client.auth = ("admin", PASSWORD)
    client.trust_env = False  # else requests takes $REQUESTS_CA_BUNDLE over the CA given
    try:
        assert client.version()["ApiVersion"]
        container = client.create_container(IMAGE, ["sh", "-c", "echo sdk"],
                                            host_config=client.create_host_config(
                                                network_mode="none"))
        client.start(container)
        assert client.wait(container)["StatusCode"] == 0
        assert b"".join(client.logs(container, stream=True, follow=True)) == b"sdk\n"
        assert any(c["Id"] == container["Id"] for c in client.containers(all=True))
        client.remove_container(container)
    finally:
        client.close()


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
    recorder.server.close()


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


@pytest.mark.parametrize("smuggle", [
    b"POST /containers/create HTTP/1.1\r\nHost: d\r\n{auth}\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /containers/create HTTP/1.1\r\nHost: d\r\n{auth}\r\nContent-Length: 2\r\n"
    b"Content-Length: 2\r\n\r\n{{}}",
    b"POST /containers/create HTTP/1.1\r\nHost: d\r\n{auth}\r\nContent-Length: 2\r\n"
    b"Content-Length: 3\r\n\r\n{{}}",
    b"POST /containers/create HTTP/1.1\r\nHost: d\r\n{auth}\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST /containers/create HTTP/1.1\r\nHost: d\r\n{auth}\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n",
], ids=["cl-and-te", "two-cl", "two-different-cl", "te-gzip", "bad-chunk-size"])
def test_smuggling_shapes_get_400_and_the_connection_closes(edge: dict[str, Any],
                                                            smuggle: bytes) -> None:
    listener = edge["listen"]()
    data, closed = exchange(listener.address[1], smuggle.replace(b"{auth}", BASIC.encode())
                            .replace(b"{{}}", b"{}"))
    assert data.startswith(b"HTTP/1.1 400 "), data[:200]
    assert closed
    sent = bytes(edge["recorder"].sent)
    if b"zz" in smuggle:  # a chunked body is streamed: Docker saw the head, never a body
        deadline = time.monotonic() + 10  # the recorder's thread may read it just after
        while b"/containers/create" not in sent and time.monotonic() < deadline:
            time.sleep(0.05)
            sent = bytes(edge["recorder"].sent)
        assert b"zz" not in sent and b"/containers/create" in sent
    else:  # refused at the head: nothing reached Docker
        assert b"/containers/create" not in sent


def test_authorization_never_reaches_docker(edge: dict[str, Any]) -> None:
    listener = edge["listen"]()
    data, _ = exchange(listener.address[1], f"GET /version HTTP/1.1\r\nHost: d\r\n{BASIC}\r\n"
                       "Connection: close\r\n\r\n".encode())
    assert data.startswith(b"HTTP/1.1 200 ")
    sent = bytes(edge["recorder"].sent)
    assert b"GET /version HTTP/1.1" in sent
    assert b"authorization" not in sent.lower() and PASSWORD.encode() not in sent


def test_read_only_allows_get_and_refuses_the_rest(edge: dict[str, Any]) -> None:
    listener = edge["listen"](read_only=True)
    port = listener.address[1]
    data, _ = exchange(port, f"GET /containers/json HTTP/1.1\r\nHost: d\r\n{BASIC}\r\n"
                       "Connection: close\r\n\r\n".encode())
    assert data.startswith(b"HTTP/1.1 200 ")
    body = b'{"Image": "' + IMAGE.encode() + b'"}'
    data, _ = exchange(port, f"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\n{BASIC}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                       "\r\n".encode() + body)
    assert data.startswith(b"HTTP/1.1 403 ")
    message = json.loads(data.partition(b"\r\n\r\n")[2])["message"]
    assert "read-only" in message and "/containers/create" in message
    assert b"/containers/create" not in edge["recorder"].sent


def test_a_client_certificate_from_another_ca_fails_the_handshake(
        edge: dict[str, Any], certs: TlsFiles, tmp_path: Path) -> None:
    listener = edge["listen"]()
    other = make_tls_files(tmp_path / "other")
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(other.client_cert), str(other.client_key))
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)), \
            ctx.wrap_socket(socket.create_connection(listener.address, timeout=10),
                            server_hostname="127.0.0.1") as sock:
            sock.sendall(b"GET /version HTTP/1.1\r\nHost: d\r\n\r\n")
            if not sock.recv(100):  # TLS 1.3: the refusal comes after the handshake
                raise ConnectionResetError("closed")
    good = ssl.create_default_context(cafile=str(certs.ca))
    good.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    with good.wrap_socket(socket.create_connection(listener.address, timeout=10),
                          server_hostname="127.0.0.1") as sock:
        sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")  # no password: the cert lets in


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


def test_plain_http_to_the_tls_port_is_answered_and_closed(edge: dict[str, Any]) -> None:
    listener = edge["listen"]()
    with socket.create_connection(listener.address, timeout=10) as sock:
        sock.sendall(b"GET /version HTTP/1.1\r\nHost: d\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.0 400 ") and b"HTTPS server" in data
    assert b"/version" not in edge["recorder"].sent


def test_a_slowloris_client_is_cut_at_the_header_deadline(edge: dict[str, Any]) -> None:
    listener = edge["listen"](header_timeout=1.0)
    head = f"GET /version HTTP/1.1\r\nHost: d\r\n{BASIC}\r\nX-Slow: {'a' * 200}\r\n\r\n"
    with tls_conn(listener.address[1]) as sock:
        sent = 0
        try:
            for ch in head:
                sock.sendall(ch.encode())
                sent += 1
                time.sleep(0.05)  # 200+ bytes at 20 a second: far beyond the deadline
            answer = sock.recv(100)
        except (OSError, ssl.SSLError):
            answer = b""
    assert sent < len(head) or answer == b"", "the slow head was served"
    assert b"/version" not in edge["recorder"].sent
    # the connection is gone from the listener, the listener still serves
    data, _ = exchange(listener.address[1], f"GET /_ping HTTP/1.1\r\nHost: d\r\n{BASIC}\r\n"
                       "Connection: close\r\n\r\n".encode())
    assert data.startswith(b"HTTP/1.1 200 ")


def test_the_connection_cap_refuses_more_and_says_so_once(
        edge: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    listener = edge["listen"](max_connections=2)
    held = [tls_conn(listener.address[1]) for _ in range(2)]
    try:
        with caplog.at_level(logging.WARNING, logger="dm_agent"):
            for _ in range(3):
                with pytest.raises((ssl.SSLError, OSError)), \
                        tls_conn(listener.address[1]) as sock:
                    sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n")
                    if not sock.recv(100):
                        raise ConnectionResetError("closed at the cap")
        capped = [r for r in caplog.records if "the cap" in r.getMessage()]
        assert len(capped) == 1, [r.getMessage() for r in caplog.records]
        assert listener.snapshot()["refused_at_cap"] == 3
    finally:
        for sock in held:
            sock.close()


def test_a_brute_force_is_limited_and_logged_once_per_burst(
        edge: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    listener = edge["listen"]()
    wrong = "Authorization: Basic " + base64.b64encode(b"admin:guess").decode()
    statuses = []
    with caplog.at_level(logging.WARNING, logger="dm_agent"):
        for _ in range(auth.MAX_FAILURES + 3):
            data, _ = exchange(listener.address[1], f"GET /version HTTP/1.1\r\nHost: d\r\n"
                               f"{wrong}\r\nConnection: close\r\n\r\n".encode())
            statuses.append(int(data.split()[1]))
        data, _ = exchange(listener.address[1], f"GET /version HTTP/1.1\r\nHost: d\r\n"
                           f"{BASIC}\r\nConnection: close\r\n\r\n".encode())
    assert statuses[:auth.MAX_FAILURES] == [401] * auth.MAX_FAILURES
    assert statuses[auth.MAX_FAILURES:] == [429] * 3
    assert data.startswith(b"HTTP/1.1 429 ") and b"Retry-After: 60" in data  # even the right one
    lines = [r.getMessage() for r in caplog.records if "authentication failed" in r.getMessage()]
    assert lines == ["gateway: authentication failed for 127.0.0.1 (wrong password)"]


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


# --- Docker over TCP and TLS behind the gateway --------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "tls"])
def test_docker_over_tcp_and_tls_behind_the_gateway(kind: str, certs: TlsFiles,
                                                    dockerd_factory: Any, tmp_path: Path) -> None:
    engine = dockerd_factory(tcp=True, tls=kind == "tls")
    ensure_image(engine)
    files = engine.tls_dir
    endpoint = engine.https_url if kind == "tls" else engine.tcp_url
    upstream = Upstream.from_settings(endpoint, *((str(files / "ca.pem"), str(files / "cert.pem"),
                                                   str(files / "key.pem")) if kind == "tls"
                                                  else (None, None, None)))
    context = tls.server_context(str(certs.server_cert), str(certs.server_key), str(certs.ca),
                                 require_client_cert=True)
    listener = Listener(("127.0.0.1", 0), context, auth.Authenticator(None), upstream,
                        read_only=False)
    listener.start()
    try:
        fake = {"port": listener.address[1], "home": tmp_path}
        assert "CONTAINER ID" in ok(cli(fake, certs, "ps"))
        assert ok(cli(fake, certs, "run", "-i", "--rm", "--network", "none", IMAGE, "cat",
                      stdin=b"half-closed over " + kind.encode() + b"\n")) \
            == f"half-closed over {kind}\n"
        cid = ok(cli(fake, certs, "run", "-d", "--network", "none", IMAGE, "sh", "-c",
                     "echo a; sleep 0.5; echo b")).strip()
        assert ok(cli(fake, certs, "logs", "-f", cid)).split() == ["a", "b"]
    finally:
        listener.stop()
