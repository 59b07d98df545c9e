"""dm-agent --once against a real private dockerd and a real strict master.

The dockerd (tests/support/dockerd.py) runs with daemon labels (one value with '=',
unicode, an empty value) and a fixture set of running, exited, created containers
with labels with '=', unicode, empty values and none at all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from agentproc import BIN, clean_env, popen, run
from support.dockerd import Dockerd
from support.hostnet import first_real_ipv4
from support.master import Master

pytestmark = pytest.mark.docker
SECRET = "integration-secret-v1"


def docker_truth(dockerd: Dockerd) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return dockerd.api("/info"), dockerd.api("/containers/json", params={"all": 1})


def expected_containers(raw: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["Id"]: {"id": c["Id"], "name": c["Names"][0].lstrip("/"), "image": c["Image"],
                      "labels": c["Labels"] or {}} for c in raw}


def check_against_docker(body: dict[str, Any], dockerd: Dockerd) -> None:
    info, raw = docker_truth(dockerd)
    assert body["name"] == body["id"] == info["Name"]
    assert body["labels"] == dockerd.labels
    assert len(body["labels"]) == len(info["Labels"])
    got = {c["id"]: c for c in body["containers"]}
    assert got == expected_containers(raw)
    assert len(body["containers"]) == len(raw)


def test_once_over_unix_socket(tmp_path: Path, dockerd: Dockerd, master: Master,
                               docker_fixture_set: Any) -> None:
    proc = run(["--once", "-d", dockerd.unix_url, "-m", master.url, "-t", "5"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (req,) = master.requests
    assert req.valid, req.errors
    assert req.node_name == "dm-test-node-ü"
    assert "/dm-test-node-%C3%BC?" in req.raw_path  # one encoded path segment
    assert req.query == {"ttl": ["10"]}
    assert req.header("X-Auth-Node") is None
    check_against_docker(req.json, dockerd)
    by_name = {c["name"]: c for c in req.json["containers"]}
    assert by_name["db_1.primary"]["labels"]["störe"] == "Grüße ✓ 日本"
    assert by_name["web-1"]["labels"]["dm.query"] == "a=b=c"
    assert by_name["no-labels"]["labels"] == {}
    assert by_name["job-exited"]["labels"]["empty"] == ""
    assert req.json["labels"]["dm.query"] == "a=b=c" and req.json["labels"]["empty"] == ""
    # unix socket: the address is the IP that routes to the master (loopback here: the
    # loopback answer is refused, so the first real interface's IP is announced)
    assert req.json["address"] == first_real_ipv4()


def test_once_over_plain_tcp_with_secret(tmp_path: Path, dockerd: Dockerd,
                                         master_factory: Any) -> None:
    master = master_factory(secret=SECRET)
    assert dockerd.tcp_address
    proc = run(["--once", "-d", dockerd.tcp_address, "-m", master.address, "-s", SECRET],
               tmp_path)
    assert proc.returncode == 0, proc.stderr
    (req,) = master.requests
    assert req.header("X-Auth-Node") == SECRET and req.auth_ok
    assert req.json["address"] == dockerd.tcp_address
    assert req.query == {"ttl": ["120"]}
    check_against_docker(req.json, dockerd)
    assert SECRET not in proc.stdout + proc.stderr


def test_once_over_tls(tmp_path: Path, tls_dockerd: Dockerd, master: Master) -> None:
    tls = tls_dockerd.tls_dir
    assert tls and tls_dockerd.https_url
    conf = tmp_path / "dm-agent.ini"
    conf.write_text(f"[main]\ndocker = {tls_dockerd.https_url}\nmaster = {master.url}\n"
                    f"docker_tls_ca = {tls}/ca.pem\ndocker_tls_cert = {tls}/cert.pem\n"
                    f"docker_tls_key = {tls}/key.pem\n")
    proc = run(["--once"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (req,) = master.requests
    check_against_docker(req.json, tls_dockerd)
    assert req.json["labels"]["transport"] == "tls"
    # the same endpoint without trusting its CA: Docker is unreachable, figures still go
    conf.write_text(conf.read_text().replace(f"docker_tls_ca = {tls}/ca.pem\n", ""))
    proc = run(["--once"], tmp_path)
    assert proc.returncode == 0
    assert "cannot reach Docker" in proc.stderr
    assert master.requests[-1].json["containers"] == []


def test_dry_run_with_docker_prints_what_would_be_sent(tmp_path: Path, dockerd: Dockerd) -> None:
    proc = run(["--once", "--dry-run", "-d", dockerd.unix_url], tmp_path)
    assert proc.returncode == 0, proc.stderr
    check_against_docker(json.loads(proc.stdout), dockerd)


@pytest.mark.parametrize(("time_format", "accepted_by"), [
    ("", {"v1", "v2"}), ("utc", {"v1", "v2"}), ("local", {"v1"})])
def test_time_format_and_the_master_generations(
        tmp_path: Path, dockerd: Dockerd, master_factory: Any, time_format: str,
        accepted_by: set[str]) -> None:
    """The default (UTC with Z) is accepted by both generations; a pinned ``local``
    only by the first, and the second answers it 500 as the real one does."""
    env = {"DM_AGENT_TIME_FORMAT": time_format} if time_format else {}
    for generation in ("v1", "v2"):
        master = master_factory(generation=generation)
        master.allow_invalid = generation not in accepted_by
        proc = run(["--once", "-d", dockerd.unix_url, "-m", master.url], tmp_path, env)
        (req,) = master.requests
        assert (proc.returncode == 0) is (generation in accepted_by), proc.stderr
        assert req.status == (200 if generation in accepted_by else 500)
        assert req.json["time"].endswith("Z") is (time_format != "local")
        if generation not in accepted_by:
            assert "HTTP 500" in proc.stderr


def test_a_name_the_master_refuses_is_logged_once_at_error(
        tmp_path: Path, dockerd_factory: Any, master_factory: Any) -> None:
    d = dockerd_factory(hostname="node_")  # a valid host name to Linux, not to Guava
    master = master_factory()
    master.allow_invalid = True
    proc = popen(["-d", d.unix_url, "-m", master.url, "-t", "1"], tmp_path)
    try:
        master.wait_for(3, timeout=15)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert all(r.status == 500 for r in master.requests)
    lines = [line for line in err.splitlines() if "node name 'node_' (Docker's Name" in line]
    assert len(lines) == 1 and " - ERROR - " in lines[0], err
    assert "starts or ends with '-' or '_'" in lines[0] and "hostname" in lines[0]


def test_docker_stopped_and_started_agent_keeps_reporting(
        tmp_path: Path, dockerd_factory: Any, master: Master) -> None:
    d = dockerd_factory(labels={"role": "fault"}, hostname="fault-node")
    proc = popen(["-d", d.unix_url, "-m", master.url, "-t", "1", "-v"], tmp_path)
    try:
        master.wait_for(1)
        d.stop()
        n = len(master.requests)
        reqs = master.wait_for(n + 2, timeout=10)
        assert all(r.json["name"] == "fault-node" for r in reqs[n:])  # last known name
        assert reqs[-1].json["containers"] == [] and reqs[-1].json["labels"] == {"role": "fault"}
        # Back with other labels: only a registration read from Docker anew carries them
        # (in the outage the agent sends the last known ones).
        d.label_args, d.labels = ["role=back"], {"role": "back"}
        d.start()
        deadline = time.monotonic() + 30
        while master.requests[-1].json["labels"] != d.labels:
            assert time.monotonic() < deadline, [r.json["labels"] for r in master.requests]
            master.wait_for(len(master.requests) + 1, timeout=30)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert err.count("cannot reach Docker") + err.count("Docker at") == 1, err
    assert "Docker recovered after" in err


class GarbageDocker:
    """A fake Docker Engine on a unix socket answering malformed things (a real dockerd
    never does, so this is the one place a stand-in is used)."""

    ANSWERS: ClassVar[list[tuple[str, bytes, bytes]]] = [
        ("ok-version", b"", b""),
        ("bad-json", b"{not json", b"[]"),
        ("info-list", b"[1, 2]", b"[]"),
        ("containers-object", b'{"Name": "g"}', b'{"message": "nope"}'),
        ("null-everything", b'{"Name": "g", "Labels": null}',
         b'[{"Id": null}, {"Id": "x", "Names": null, "Labels": null, "Image": 5}, 7]'),
        ("huge-labels", b'{"Name": "g", "Labels": ["a=' + b"x" * 100000 + b'"]}', b"[]"),
        ("html-500", b"<html>oops</html>", b"<html>oops</html>"),
    ]

    def __init__(self, path: Path) -> None:
        self.path = path
        self.case = 1
        self.version = b'{"ApiVersion": "1.41", "Version": "20.10"}'
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                name, info, containers = outer.ANSWERS[outer.case]
                outer.paths.append(self.path)
                if self.path.endswith("/version") or self.path.endswith("/_ping"):
                    body, status = outer.version, 200
                elif "/info" in self.path:
                    body, status = info, 500 if name == "html-500" else 200
                else:
                    body, status = containers, 500 if name == "html-500" else 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class UnixServer(ThreadingHTTPServer):
            address_family = socket.AF_UNIX

            def server_bind(self) -> None:
                self.socket.bind(str(outer.path))
                self.server_address = ("local", 0)
                self.server_name, self.server_port = "local", 0

        self.server = UnixServer(str(path), Handler)  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> GarbageDocker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def garbage_docker(tmp_path: Path) -> Iterator[GarbageDocker]:
    with GarbageDocker(tmp_path / "fake-docker.sock") as fake:
        yield fake


@pytest.mark.parametrize("case", range(1, len(GarbageDocker.ANSWERS)))
def test_garbage_from_docker_never_crashes(tmp_path: Path, garbage_docker: GarbageDocker,
                                           master: Master, case: int) -> None:
    garbage_docker.case = case
    proc = run(["--once", "-d", f"unix://{garbage_docker.path}", "-m", master.url], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    (req,) = master.requests
    assert req.valid, req.errors
    name = GarbageDocker.ANSWERS[case][0]
    if name == "null-everything":
        assert req.json["containers"] == [
            {"id": "x", "name": "x", "image": "5", "labels": {}}]
    elif name == "huge-labels":
        assert len(req.json["labels"]["a"]) == 100000
    else:
        assert "ERROR" in proc.stderr and req.json["containers"] == []
        assert len(max(proc.stderr.splitlines(), key=len)) < 600


def test_api_version_within_both_ranges_and_none_said_once(
        tmp_path: Path, garbage_docker: GarbageDocker, master: Master) -> None:
    """Docker 29's range (1.44-1.52) and one above the SDK's: no Engine in Debian has
    them, so the stand-in answers its /version so."""
    garbage_docker.case = 4  # a valid /info and list
    garbage_docker.version = b'{"ApiVersion": "1.52", "MinAPIVersion": "1.44"}'
    proc = run(["--once", "-d", f"unix://{garbage_docker.path}", "-m", master.url], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "/v1.45/info" in garbage_docker.paths  # the SDK's newest, above 1.44
    garbage_docker.version = b'{"ApiVersion": "1.52", "MinAPIVersion": "1.46"}'
    agent = popen(["-d", f"unix://{garbage_docker.path}", "-m", master.url, "-t", "1"],
                  tmp_path)
    try:
        master.wait_for(4, timeout=15)  # the host's figures still go out
    finally:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=10)
    lines = [line for line in err.splitlines() if "no common version" in line]
    assert len(lines) == 1 and " - ERROR - " in lines[0], err
    assert "1.46-1.52" in lines[0] and "1.24-1.45" in lines[0]


def test_unix_socket_permission_denied_is_reported(tmp_path: Path, dockerd: Dockerd,
                                                   master: Master) -> None:
    assert os.geteuid() == 0, "needs root to drop to nobody"
    home = Path(tempfile.mkdtemp(prefix="dmtest-nobody-"))
    os.chmod(home, 0o777)
    try:
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", BIN, "--once",
             "-d", dockerd.unix_url, "-m", master.url],
            capture_output=True, text=True, cwd=home, env=clean_env(home), timeout=30)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    assert "Permission denied" in proc.stderr
    assert master.requests[0].json["containers"] == []
