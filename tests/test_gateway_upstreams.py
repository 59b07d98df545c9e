"""The gateway in front of Docker over a unix socket, plain tcp:// and TLS (the
docker_tls_* client files): the docker CLI's ps, a stream and the half-closed `cat`
through each, and the hijack answers other than the CLI's 101 (Docker's older 200 raw
stream, a WebSocket attach) relayed raw (issue 20)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import gateway as shared
from support.dockerd import DOCKER_CLI, Dockerd, make_tls_files
from support.gateway import GatewayRig, lines, read_to_end, split_answer, wait_for
from support.image import IMAGE, ensure_image

pytestmark = pytest.mark.docker
engine, cfg = shared.engine, shared.cfg  # the gateway tests' fixtures

NONE = ("--network", "none")


@pytest.fixture(scope="module", params=["unix", "tcp", "tls"])
def gw(request: pytest.FixtureRequest, engine: Dockerd,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayRig]:
    tls = make_tls_files(tmp_path_factory.mktemp("gwtls"))
    if request.param == "tls":
        upstream: Dockerd = request.getfixturevalue("tls_dockerd")
        ensure_image(upstream)
        assert upstream.https_url and upstream.tls_files
        rig = GatewayRig(tls, upstream.https_url, docker_tls=upstream.tls_files)
    else:
        url = engine.unix_url if request.param == "unix" else engine.tcp_url
        assert url
        rig = GatewayRig(tls, url)
    yield rig
    rig.close()


def test_ps(gw: GatewayRig, cfg: Path) -> None:
    proc = gw.docker(cfg, "ps", "-a", "--format", "{{json .}}")
    assert all(json.loads(line)["ID"] for line in lines(proc.stdout))
    assert proc.stderr == b""


def test_logs_stream(gw: GatewayRig, cfg: Path) -> None:
    script = "for i in 1 2 3; do echo tick$i; sleep 0.2; done"
    cid = gw.docker(cfg, "run", "-d", *NONE, IMAGE, "sh", "-c", script).stdout.decode().strip()
    try:
        out = gw.docker(cfg, "logs", "-f", cid).stdout
        assert lines(out) == ["tick1", "tick2", "tick3"]
    finally:
        gw.docker(cfg, "rm", "-f", cid, check=False)


def test_cat_half_close(gw: GatewayRig, cfg: Path) -> None:
    proc = gw.docker(cfg, "run", "-i", "--rm", *NONE, IMAGE, "cat", stdin=b"hi\n")
    assert (proc.returncode, proc.stdout) == (0, b"hi\n")


def test_events_client_leaves(gw: GatewayRig, cfg: Path) -> None:
    events = subprocess.Popen([DOCKER_CLI, "events", "--format", "{{.Action}}"],
                              stdout=subprocess.PIPE, env=gw.cli_env(cfg))
    try:
        wait_for(lambda: gw.listener.snapshot()["connections"] >= 1, "the events stream")
        gw.docker(cfg, "run", "--rm", *NONE, IMAGE, "true")
        assert events.stdout is not None
        assert events.stdout.readline().strip() == b"create"
    finally:
        events.kill()
        events.wait()
    wait_for(lambda: gw.listener.snapshot()["connections"] == 0,
             "the stream to end with its client")


def _request(gw: GatewayRig, head: str, body: bytes = b"") -> bytes:
    with gw.raw() as s:
        s.sendall(head.replace("\n", "\r\n").encode() + body)
        return read_to_end(s, limit=30)


def test_older_raw_stream_answer_to_exec_start(gw: GatewayRig, cfg: Path) -> None:
    """Without ``Upgrade: tcp``, Docker answers exec start with 200 and a raw stream:
    relayed raw both ways (stdin in, multiplexed output out, Docker's end closes)."""
    name = f"gw-raw-{gw.port}"
    gw.docker(cfg, "run", "-d", "--name", name, *NONE, IMAGE, "sleep", "300")
    try:
        spec = json.dumps({"AttachStdin": True, "AttachStdout": True, "AttachStderr": True,
                           "Cmd": ["sh", "-c", "read x; echo got:$x"]}).encode()
        created = _request(gw, f"POST /v1.41/containers/{name}/exec HTTP/1.1\nHost: x\n"
                           f"Content-Type: application/json\nContent-Length: {len(spec)}\n"
                           "Connection: close\n\n", spec)
        status, _, body = split_answer(created)
        assert status == 201, created
        exec_id = json.loads(body)["Id"]
        start = b'{"Detach": false, "Tty": false}'
        answer = _request(gw, f"POST /v1.41/exec/{exec_id}/start HTTP/1.1\nHost: x\n"
                          f"Content-Type: application/json\nContent-Length: {len(start)}\n\n",
                          start + b"abc\n")
        status, headers, raw = split_answer(answer)
        assert status == 200
        assert headers["content-type"].startswith("application/vnd.docker.")
        assert "transfer-encoding" not in headers and "content-length" not in headers
        assert raw == b"\x01\x00\x00\x00\x00\x00\x00\x08got:abc\n"  # one stdout frame
    finally:
        gw.docker(cfg, "rm", "-f", name, check=False)


def test_websocket_attach_is_relayed_opaque(gw: GatewayRig, cfg: Path) -> None:
    name = f"gw-ws-{gw.port}"
    gw.docker(cfg, "run", "-d", "--name", name, *NONE, IMAGE, "sh", "-c",
              "echo ws-out; sleep 300")
    try:
        with gw.raw() as s:
            s.sendall(f"GET /v1.41/containers/{name}/attach/ws?logs=1&stream=1&stdout=1 "
                      "HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
                      "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Origin: http://127.0.0.1\r\n\r\n".encode())
            got = bytearray()
            s.settimeout(30)
            while b"ws-out" not in got:
                data = s.recv(4096)
                assert data, bytes(got)
                got += data
        status, headers, _ = split_answer(bytes(got))
        assert status == 101
        assert headers["upgrade"].lower() == "websocket"
        assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    finally:
        gw.docker(cfg, "rm", "-f", name, check=False)
