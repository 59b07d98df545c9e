"""The gateway's edge with real clients: curl and the Docker SDK with Basic auth, and the
refusals — credentials, foreign certificates, smuggling shapes, slowloris, plain HTTP,
the connection cap, brute force, read-only — against a real dockerd (issue 20).

Docker is reached through a recording unix-socket proxy, so the tests see every byte the
gateway sends to Docker (``Authorization`` must never be among them).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from support import gateway as shared
from support.dockerd import Dockerd, TlsFiles, make_tls_files
from support.gateway import (
    PASSWORD,
    GatewayRig,
    Recorder,
    read_to_end,
    split_answer,
    wait_for,
)

pytestmark = pytest.mark.docker
engine = shared.engine  # the gateway tests' private dockerd


@pytest.fixture(scope="module")
def recorder(engine: Dockerd) -> Iterator[Recorder]:
    rec = Recorder(engine.socket_path, engine.base_dir / "recorder.sock")
    yield rec
    rec.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("gwtls"))


@pytest.fixture(scope="module")
def gw(tls: TlsFiles, recorder: Recorder) -> Iterator[GatewayRig]:
    rig = GatewayRig(tls, f"unix://{recorder.path}")
    yield rig
    rig.close()


@pytest.fixture
def make_rig(tls: TlsFiles, recorder: Recorder) -> Iterator[type[GatewayRig]]:
    made: list[GatewayRig] = []

    def make(**kwargs: object) -> GatewayRig:
        rig = GatewayRig(tls, f"unix://{recorder.path}", **kwargs)  # type: ignore[arg-type]
        made.append(rig)
        return rig

    yield make  # type: ignore[misc]
    for rig in made:
        rig.close()


def ping(rig: GatewayRig, **kwargs: Any) -> bytes:
    """The whole answer to ``GET /_ping`` on a new TLS connection; b"" when the gateway
    refused the connection (closed it, reset it, or a TLS alert)."""
    try:
        with rig.raw(**kwargs) as s:
            s.sendall(b"GET /_ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return read_to_end(s)
    except (ssl.SSLError, ConnectionError):
        return b""


# ---------------------------------------------------------------- Basic auth: curl, SDK


def test_curl_basic_auth_and_authorization_never_reaches_docker(
        gw: GatewayRig, recorder: Recorder) -> None:
    mark = len(recorder.sent)
    proc = gw.curl("/v1.41/containers/json?all=1")
    status, _, body = split_answer(proc.stdout)
    assert status == 200, proc.stdout[:300]
    assert isinstance(json.loads(body), list)
    sent = bytes(recorder.sent[mark:])
    assert b"GET /v1.41/containers/json?all=1 HTTP/1.1" in sent
    assert b"authorization" not in sent.lower()
    assert base64.b64encode(f"admin:{PASSWORD}".encode()) not in sent
    assert PASSWORD.encode() not in sent


def test_docker_sdk_with_basic_auth(gw: GatewayRig, recorder: Recorder) -> None:
    client = docker.APIClient(base_url=gw.url, version="1.41",
                              tls=docker.tls.TLSConfig(ca_cert=str(gw.tls.ca), verify=True),
                              timeout=30)
    client.auth = ("admin", PASSWORD)
    client.trust_env = False  # else REQUESTS_CA_BUNDLE outranks the session's CA file
    try:
        assert client.ping() is True
        info = client.info()
        assert "Containers" in info
        cid = client.create_container("dmtest/busybox:1", ["echo", "sdk"],
                                      host_config=client.create_host_config(
                                          network_mode="none"))["Id"]
        client.start(cid)
        assert client.wait(cid, timeout=30)["StatusCode"] == 0
        assert client.logs(cid) == b"sdk\n"
        client.remove_container(cid)
    finally:
        client.close()
    assert b"authorization" not in bytes(recorder.sent).lower()


# ---------------------------------------------------------------- refusals: credentials


@pytest.mark.parametrize("user", [None, "admin:wrong", "root:" + PASSWORD])
def test_no_or_wrong_credential_is_401(make_rig: type[GatewayRig], user: str | None) -> None:
    rig = make_rig()
    proc = rig.curl("/v1.41/containers/json", user=user)
    status, headers, body = split_answer(proc.stdout)
    assert status == 401
    assert headers["www-authenticate"].startswith("Basic")
    assert json.loads(body)["message"]


def test_certificate_of_another_ca_fails_the_handshake(gw: GatewayRig,
                                                         tmp_path: Path) -> None:
    other = make_tls_files(tmp_path / "other")
    ctx = ssl.create_default_context(cafile=str(gw.tls.ca))
    ctx.load_cert_chain(str(other.client_cert), str(other.client_key))
    assert ping(gw, context=ctx) == b""  # TLS 1.3: the server's alert comes on first read
    assert ping(gw).startswith(b"HTTP/1.1 200")


def test_brute_force_is_rate_limited_and_logged_once(
        make_rig: type[GatewayRig], caplog: pytest.LogCaptureFixture) -> None:
    rig = make_rig()
    caplog.set_level(logging.WARNING, logger="dm_agent")
    statuses = []
    for i in range(8):
        status, headers, _ = split_answer(rig.curl("/_ping", user=f"admin:guess{i}").stdout)
        statuses.append(status)
        if status == 429:
            assert int(headers["retry-after"]) > 0
    assert statuses[0] == 401 and statuses[-1] == 429, statuses
    lines = [r.getMessage() for r in caplog.records if "authentication failed" in
             r.getMessage()]
    assert len(lines) == 1 and "127.0.0.1" in lines[0], lines
    assert all("guess" not in r.getMessage() for r in caplog.records)
    # the right password is refused too while the address is limited
    assert split_answer(rig.curl("/_ping").stdout)[0] == 429


def test_read_only_refuses_create_with_403(make_rig: type[GatewayRig]) -> None:
    rig = make_rig(read_only=True)
    assert split_answer(rig.curl("/_ping").stdout)[0] == 200
    proc = rig.curl("/v1.41/containers/create", "-X", "POST", "-H",
                    "Content-Type: application/json", "-d", '{"Image": "dmtest/busybox:1"}')
    status, headers, body = split_answer(proc.stdout)
    assert status == 403
    assert headers["content-type"].startswith("application/json")
    assert "read-only" in json.loads(body)["message"]


# ---------------------------------------------------------------- refusals: HTTP shapes

SMUGGLING = {
    "CL and TE": b"POST /v1.41/containers/create HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two different CLs": b"POST /v1.41/containers/create HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 2\r\nContent-Length: 4\r\n\r\n{}{}",
    "two equal CLs": b"POST /v1.41/containers/create HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    "CL and TE, bare LF": b"POST /v1.41/containers/create HTTP/1.1\nHost: x\n"
                          b"Content-Length: 4\nTransfer-Encoding: chunked\n\n0\r\n\r\n",
    "two CLs, bare LF": b"POST /v1.41/containers/create HTTP/1.1\nHost: x\n"
                        b"Content-Length: 2\nContent-Length: 2\n\n{}",
    "folded header": b"POST /v1.41/containers/create HTTP/1.1\r\nHost: x\r\n"
                     b"X-Note: a\r\n Content-Length: 2\r\n\r\n{}",
    "bad chunk size": b"POST /v1.41/build HTTP/1.1\r\nHost: x\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "TE gzip": b"POST /v1.41/build HTTP/1.1\r\nHost: x\r\n"
               b"Transfer-Encoding: gzip\r\n\r\nxx",
    "TE gzip, chunked": b"POST /v1.41/build HTTP/1.1\r\nHost: x\r\n"
                        b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("shape", sorted(SMUGGLING))
def test_smuggling_shapes_get_400_and_close(gw: GatewayRig, recorder: Recorder,
                                            shape: str) -> None:
    mark = len(recorder.sent)
    with gw.raw() as s:
        s.sendall(SMUGGLING[shape] + b"GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_to_end(s)
    status, headers, _ = split_answer(answer)
    assert status == 400, answer[:200]
    assert headers.get("connection") == "close"
    assert answer.count(b"HTTP/1.1") == 1  # the request behind it was not served
    assert b"/containers/create" not in bytes(recorder.sent[mark:])


def test_http_1_0_without_host_is_served(gw: GatewayRig) -> None:
    with gw.raw() as s:
        s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
        status, _, body = split_answer(read_to_end(s))
    assert (status, body) == (200, b"OK")


def test_pipelined_requests_are_answered_in_order(gw: GatewayRig) -> None:
    with gw.raw() as s:
        s.sendall(b"GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /v1.41/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_to_end(s)
    first, _, rest = answer.partition(b"\r\n\r\nOK")
    assert first.startswith(b"HTTP/1.1 200") and rest.startswith(b"HTTP/1.1 200")
    assert b'"ApiVersion"' in rest


def test_large_headers_up_to_a_mebibyte_pass(gw: GatewayRig) -> None:
    big = base64.b64encode(os.urandom(600 * 1024))  # X-Registry-Config is this kind
    with gw.raw() as s:
        s.sendall(b"GET /_ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"X-Registry-Config: " + big + b"\r\n\r\n")
        status, _, body = split_answer(read_to_end(s))
    assert (status, body) == (200, b"OK")


def test_slowloris_is_cut_at_the_deadline(make_rig: type[GatewayRig]) -> None:
    rig = make_rig(header_timeout=1.5)
    head = b"GET /_ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40 + b"\r\n\r\n"
    with rig.raw() as s:
        s.setblocking(False)
        sent, cut = 0, False
        for byte in head:  # one byte every 0.25 s: the head would take ~17 s
            try:
                s.send(bytes([byte]))
                sent += 1
                if s.recv(1024) == b"":
                    cut = True
                    break
            except (ssl.SSLWantReadError, BlockingIOError):
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionError):
                cut = True
                break
            time.sleep(0.25)  # the client's pace, not a synchronisation
    assert cut and sent < len(head), f"sent {sent} of {len(head)} bytes, not cut"


def test_silent_client_is_cut_at_the_handshake_deadline(make_rig: type[GatewayRig]) -> None:
    rig = make_rig(header_timeout=1.0)
    with socket.create_connection(("127.0.0.1", rig.port), timeout=10) as s:
        assert read_to_end(s, limit=10) == b""  # no ClientHello: closed, nothing said
    wait_for(lambda: rig.listener.snapshot()["connections"] == 0, "the connection to end")


def test_plain_http_to_the_tls_port_is_closed_cleanly(gw: GatewayRig) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_to_end(s)  # EOF, not a reset
    assert answer.startswith(b"HTTP/1.0 400 Bad Request")
    assert b"OK" not in answer.split(b"\r\n\r\n", 1)[1]


def test_connection_cap_refuses_and_logs_once(make_rig: type[GatewayRig],
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dm_agent")
    rig = make_rig(max_connections=2)
    held = [rig.connect() for _ in range(2)]
    try:
        for s in held:  # both served: the gateway holds two connections
            s.sendall(b"GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        wait_for(lambda: rig.listener.snapshot()["connections"] == 2, "two connections")
        for _ in range(3):
            assert ping(rig) == b""
        assert rig.listener.snapshot()["refused_at_cap"] == 3
    finally:
        for s in held:
            s.close()
    cap_lines = [r for r in caplog.records if "cap" in r.getMessage()]
    assert len(cap_lines) == 1, [r.getMessage() for r in cap_lines]
    # below the cap again: served
    wait_for(lambda: rig.listener.snapshot()["connections"] == 0, "the held ones to end")
    assert split_answer(rig.curl("/_ping").stdout)[0] == 200


def test_stop_closes_everything_quickly(make_rig: type[GatewayRig]) -> None:
    rig = make_rig()
    streams = []
    for _ in range(3):
        s = rig.connect()
        s.sendall(b"GET /v1.41/events HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        streams.append(s)
    idle = rig.connect()  # handshake done, no request yet
    rig.listener.stop()  # its joins are bounded (2 s in all); all must be over by then
    assert rig.listener.snapshot()["connections"] == 0
    for s in [*streams, idle]:
        read_to_end(s, limit=5)  # closed: EOF, not a stream that goes on
        s.close()
