"""A stop of the agent drains the gateway (docs/design.md §6): the real agent program,
SIGTERM, a real dockerd behind a recording proxy, real TLS clients.

An exchange in flight when the stop comes (the master's create, start, stop, wait) gets
its whole answer and a clean end (close_notify), not a reset that leaves the master
guessing whether Docker did it; idle and hijacked connections are closed at once, and a
request that arrives after that is never relayed; a stream is cut at the grace's end and
the agent still exits 0.

No answer here depends on a stopwatch: each exchange in flight is answered by Docker only
after the test has sent the SIGTERM (it then ends the container it waits on), so its
answer can only have come through a gateway that was stopping.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentproc import popen, stop, stopped
from support import gateway as shared
from support.dockerd import Dockerd, TlsFiles, make_tls_files
from support.gateway import GatewayRig, Recorder, free_port, wait_for
from support.image import IMAGE
from support.master import Master
from test_gateway_agent import HASH, PASSWORD, get, wait_until

pytestmark = pytest.mark.docker
engine = shared.engine  # the gateway tests' private dockerd, with the busybox image

AUTH = "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
#: PID 1 of the containers waited on: a SIGTERM ends it with 3, a moment later (so that
#: the answer to a wait comes while the agent is stopping, well within its grace)
TRAPPED = ["sh", "-c", "trap 'sleep 0.3; exit 3' TERM; while :; do sleep 1 & wait $!; done"]


@pytest.fixture(scope="module")
def recorder(engine: Dockerd) -> Iterator[Recorder]:
    rec = Recorder(engine.socket_path, engine.base_dir / "drain-recorder.sock")
    yield rec
    rec.close()


@pytest.fixture
def agent(tmp_path: Path, recorder: Recorder,
          master_factory: Any) -> Iterator[dict[str, Any]]:
    """The agent in the foreground with the gateway, Docker reached through the recorder;
    ready once the gateway answers."""
    master: Master = master_factory()
    port = free_port()
    ini = tmp_path / "dm-agent.ini"
    ini.write_text(f"[main]\ndocker = unix://{recorder.path}\nmaster = {master.url}\n"
                   f"timeout = 1\nlog_level = 1\npidfile = {tmp_path}/run/agent.pid\n"
                   f"gateway = 127.0.0.1:{port}\ngateway_password_hash = {HASH}\n")
    proc = popen(["-f", str(ini)], tmp_path, {"STATE_DIRECTORY": str(tmp_path / "state")})
    clients: list[ssl.SSLSocket] = []
    try:
        wait_until("the gateway", lambda: get(port, "/_ping")[0] == 200)
        yield {"port": port, "proc": proc, "clients": clients}
    finally:
        for tls in clients:
            tls.close()
        if proc.poll() is None:
            stop(proc)


@pytest.fixture
def trapped(engine: Dockerd) -> Iterator[str]:
    """A running container that a SIGTERM ends with 3 a moment later."""
    cid = str(engine.api("/containers/create", "POST",
                         {"Image": IMAGE, "Cmd": TRAPPED})["Id"])
    engine.api(f"/containers/{cid}/start", "POST", expect_json=False)
    yield cid
    engine.api(f"/containers/{cid}", "DELETE", params={"force": "1"}, expect_json=False)


def connect(agent: dict[str, Any]) -> ssl.SSLSocket:
    """A TLS connection to the agent's gateway that tells a clean end (close_notify: recv
    gives b"") from a cut one (SSLEOFError, ConnectionResetError); closed after the test."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", agent["port"]), timeout=10)
    tls = ctx.wrap_socket(raw, suppress_ragged_eofs=False)
    agent["clients"].append(tls)
    return tls


def send(tls: ssl.SSLSocket, method: str, path: str, body: bytes = b"",
         headers: str = "") -> None:
    tls.sendall(f"{method} {path} HTTP/1.1\r\nHost: node\r\nAuthorization: {AUTH}\r\n"
                f"Content-Length: {len(body)}\r\n{headers}\r\n".encode() + body)


def read_head(tls: ssl.SSLSocket) -> bytes:
    """Up to the end of an answer's head (what follows it is kept by the caller)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = tls.recv(65536)
        assert more, f"the connection ended in the answer's head: {data!r}"
        data += more
    return data


def read_to_end(tls: ssl.SSLSocket, *, clean: bool = True) -> bytes:
    """All that arrives until the connection ends. ``clean``: it must end with the
    gateway's close_notify (AssertionError on a cut connection); else any end will do."""
    out = b""
    try:
        while more := tls.recv(65536):
            out += more
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        if clean:
            raise AssertionError(f"the connection was cut ({type(exc).__name__}) after "
                                 f"{out!r}") from None
    return out


def parse(raw: bytes) -> tuple[http.client.HTTPResponse, bytes]:
    """One HTTP answer (either framing), and its body."""

    class Wire:
        def makefile(self, *args: object, **kwargs: object) -> io.BytesIO:
            return io.BytesIO(raw)

    answer = http.client.HTTPResponse(Wire())  # type: ignore[arg-type]
    answer.begin()
    return answer, answer.read()


def terminate(proc: subprocess.Popen[str]) -> float:
    proc.send_signal(signal.SIGTERM)
    return time.monotonic()


def exited(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """The agent's exit code and stderr (SIGTERM was sent: it must end within 5 s)."""
    err = stopped(proc, "after SIGTERM")
    return proc.returncode, err


def min_api(engine: Dockerd) -> tuple[int, int]:
    major, minor = str(engine.api("/version")["MinAPIVersion"]).split(".")[:2]
    return int(major), int(minor)


def test_exchanges_in_flight_at_the_stop_get_their_whole_answer(
        agent: dict[str, Any], engine: Dockerd, recorder: Recorder, trapped: str) -> None:
    """Two waits on a container, relayed to Docker when SIGTERM comes: each gets its
    whole answer (the exit code Docker gives only after the stop began), then close_notify.
    The modern wait has sent its head before the stop; the pre-1.30 one, whose head comes
    with its answer, also says ``Connection: close``."""
    proc = agent["proc"]
    assert min_api(engine) <= (1, 29), "the engine takes API 1.29 no more: the test needs one"
    waited = connect(agent)
    send(waited, "POST", f"/containers/{trapped}/wait")
    head = read_head(waited)  # Docker says 200 at once, the exit code when it comes
    assert head.startswith(b"HTTP/1.1 200"), head
    old = connect(agent)
    send(old, "POST", f"/v1.29/containers/{trapped}/wait")
    wait_for(lambda: f"/v1.29/containers/{trapped}/wait".encode() in recorder.sent,
             "the pre-1.30 wait relayed to Docker")

    t0 = terminate(proc)
    engine.api(f"/containers/{trapped}/kill", "POST", params={"signal": "TERM"},
               expect_json=False)
    answer, body = parse(head + read_to_end(waited))
    print(f"the wait's answer ended {time.monotonic() - t0:.2f}s after SIGTERM")
    assert answer.status == 200 and json.loads(body)["StatusCode"] == 3, body
    answer, body = parse(read_to_end(old))
    assert answer.status == 200 and json.loads(body)["StatusCode"] == 3, body
    assert answer.getheader("Connection") == "close"
    code, err = exited(proc)
    print(f"the agent exited {time.monotonic() - t0:.2f}s after SIGTERM")
    assert code == 0, err[-2000:]


def test_idle_and_hijacked_connections_close_at_once_and_late_requests_are_not_relayed(
        agent: dict[str, Any], engine: Dockerd, recorder: Recorder, trapped: str) -> None:
    """With an exchange in flight holding the stop open, an idle keep-alive connection, a
    hijacked attach and a connection that has sent no request yet all end at the SIGTERM
    (before the test lets the exchange finish: none waited for the grace, which would
    have cut the exchange too); a request sent on that last connection afterwards is
    answered by nobody and never reaches Docker; the exchange still gets its answer."""
    proc = agent["proc"]
    idle = connect(agent)
    send(idle, "GET", "/_ping")
    data = read_head(idle)
    while not data.endswith(b"OK"):
        data += idle.recv(65536)
    assert data.startswith(b"HTTP/1.1 200"), data
    hijacked = connect(agent)
    send(hijacked, "POST", f"/containers/{trapped}/attach?stream=1&stdout=1",
         headers="Connection: Upgrade\r\nUpgrade: tcp\r\n")
    assert read_head(hijacked).startswith(b"HTTP/1.1 101"), "no switch of protocol"
    late = connect(agent)  # its handshake is done; its request comes after the stop
    waited = connect(agent)
    send(waited, "POST", f"/containers/{trapped}/wait")
    head = read_head(waited)

    t0 = terminate(proc)
    for name, tls in (("idle", idle), ("hijacked", hijacked)):
        rest = read_to_end(tls, clean=False)
        print(f"the {name} connection ended {time.monotonic() - t0:.2f}s after SIGTERM")
        assert b"HTTP/" not in rest, rest
    name = f"drain-late-{uuid.uuid4().hex[:8]}"
    try:
        send(late, "POST", f"/containers/create?name={name}",
             json.dumps({"Image": IMAGE, "Cmd": ["true"]}).encode(),
             "Content-Type: application/json\r\n")
    except OSError:
        pass  # already cut: a client may see that as well as an end without an answer
    assert read_to_end(late, clean=False) == b"", "a request after the stop was answered"

    engine.api(f"/containers/{trapped}/kill", "POST", params={"signal": "TERM"},
               expect_json=False)
    answer, body = parse(head + read_to_end(waited))
    assert answer.status == 200 and json.loads(body)["StatusCode"] == 3, body
    code, err = exited(proc)
    assert code == 0, err[-2000:]
    assert name.encode() not in recorder.sent
    found = engine.api("/containers/json", params={
        "all": "1", "filters": json.dumps({"name": [name]})})
    assert found == [], found


def test_a_stream_is_cut_at_the_grace_and_the_agent_exits_0(
        agent: dict[str, Any]) -> None:
    """``GET /events`` never finishes: the stop cuts it at the grace's end, and the
    agent exits 0 within the 5 s ``stop`` allows."""
    proc = agent["proc"]
    events = connect(agent)
    send(events, "GET", "/events")
    assert read_head(events).startswith(b"HTTP/1.1 200")
    t0 = terminate(proc)
    read_to_end(events, clean=False)
    print(f"the event stream ended {time.monotonic() - t0:.2f}s after SIGTERM")
    code, err = exited(proc)
    print(f"the agent exited {time.monotonic() - t0:.2f}s after SIGTERM")
    assert code == 0, err[-2000:]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("draintls"))


def test_a_stop_ends_a_hijacked_stream_on_both_sides(tls_files: TlsFiles, engine: Dockerd,
                                                     trapped: str) -> None:
    """A hijacked attach to a container that says nothing: the stop cuts the client's
    side and Docker's, so the connection's thread ends (it used to wait in the relay for
    Docker's next output, holding its connection to Docker)."""
    rig = GatewayRig(tls_files, engine.unix_url)
    try:
        with rig.raw() as tls:
            tls.sendall(f"POST /containers/{trapped}/attach?stream=1&stdout=1 HTTP/1.1\r\n"
                        "Host: node\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n".encode())
            assert tls.recv(65536).startswith(b"HTTP/1.1 101")
            assert rig.listener.snapshot()["connections"] == 1
            rig.close()
            left = rig.listener.snapshot()["connections"]
    finally:
        rig.close()
    assert left == 0, "the hijacked connection's thread is still relaying"
