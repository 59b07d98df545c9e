"""The gateway as a service of the real agent program (docs/design.md §6): it listens with
the certificate it issued itself, the node registers its https address and nothing else,
`dm-agent status` describes it, SIGHUP reloads the certificate, a taken port delays
nothing, and an optional gateway without credentials says so once."""

from __future__ import annotations

import base64
import json
import signal
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from agentproc import popen, run, stop
from support.dockerd import Dockerd
from support.gateway import free_port
from support.master import Master
from test_gateway_config import make_cert

pytestmark = pytest.mark.docker

PASSWORD = "correct horse battery staple"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


def get(port: int, path: str, password: str | None = PASSWORD,
        timeout: float = 10.0) -> tuple[int, dict[str, str], bytes, bytes]:
    """One HTTPS request to the gateway, trusting whatever certificate it shows (the test
    reads that certificate back: DER, to compare fingerprints)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True) or b""
        auth = ""
        if password is not None:
            token = base64.b64encode(f"admin:{password}".encode()).decode()
            auth = f"Authorization: Basic {token}\r\n"
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: node\r\n{auth}Connection: close\r\n\r\n"
                    .encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body, der


def wait_until(what: str, check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def status(home: Path, ini: Path) -> dict[str, Any]:
    proc = run(["status", "--json", "-f", str(ini)], home)
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


@pytest.fixture
def node(tmp_path: Path, dockerd: Dockerd, master: Master) -> Iterator[dict[str, Any]]:
    port = free_port()
    ini = tmp_path / "dm-agent.ini"
    ini.write_text(f"[main]\ndocker = {dockerd.unix_url}\nmaster = {master.url}\ntimeout = 1\n"
                   f"log_level = 1\npidfile = {tmp_path}/run/agent.pid\n"
                   f"gateway = 127.0.0.1:{port}\ngateway_password_hash = {HASH}\n")
    env = {"STATE_DIRECTORY": str(tmp_path / "state")}
    proc = popen(["-f", str(ini)], tmp_path, env)
    yield {"port": port, "ini": ini, "proc": proc, "home": tmp_path, "env": env}
    if proc.poll() is None:
        stop(proc)


def test_the_agent_serves_its_docker_and_registers_the_https_address(
        node: dict[str, Any], master: Master, dockerd: Dockerd) -> None:
    port, home = node["port"], node["home"]
    code, _, body, der = wait_until("the gateway", lambda: get(port, "/version"))
    assert code == 200 and json.loads(body)["ApiVersion"], body[:200]
    code, headers, body, _ = get(port, "/version", password="wrong")
    assert code == 401 and headers["www-authenticate"].startswith("Basic"), body
    code, headers, body, _ = get(port, "/version", password=None)
    assert code == 401 and "message" in json.loads(body)

    reqs = master.wait_for(2)
    addresses = {r.json["address"] for r in reqs}
    assert len(addresses) == 1 and addresses.pop().endswith(f":{port}")
    assert all(r.json["address"].startswith("https://") for r in reqs)

    key = home / "state" / "gateway" / "gateway.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # the state is written after each round: wait for one after the failed login
    gw = wait_until("the failed login in the state", lambda: (
        g := status(home, node["ini"])["state"]["gateway"])["auth_failures"]["failures_total"]
        and g)
    assert gw["listen"] == f"127.0.0.1:{port}" and gw["listening"] is True
    assert gw["certificate"]["self_issued"] is True
    import hashlib
    digest = hashlib.sha256(der).hexdigest().upper()
    assert gw["certificate"]["fingerprint"].replace("SHA256:", "").replace(":", "") == digest
    # a wrong password counts; a request without credentials is only asked for them
    assert gw["auth_failures"]["failures_total"] == 1
    assert gw["auth_failures"]["recent"][0]["client"] == "127.0.0.1"
    text = run(["status", "-f", str(node["ini"])], home).stdout
    assert f"gateway: listening on 127.0.0.1:{port}" in text and "self-issued" in text
    err = stop(node["proc"])
    assert PASSWORD not in err and HASH not in err
    assert "gateway: listening on" in err


def test_sighup_reloads_the_certificate(node: dict[str, Any]) -> None:
    port, home, ini = node["port"], node["home"], node["ini"]
    first = wait_until("the gateway", lambda: get(port, "/_ping"))[3]
    cert, key = make_cert(home, name="node-reloaded")
    with ini.open("a") as fh:
        fh.write(f"gateway_cert = {cert}\ngateway_key = {key}\n")
    node["proc"].send_signal(signal.SIGHUP)

    def new_cert() -> bytes | None:
        der = get(port, "/_ping")[3]
        return der if der != first else None

    der = wait_until("the new certificate", new_cert)
    pem = cert.read_text()
    assert ssl.DER_cert_to_PEM_cert(der).split() == pem.split()
    gw = wait_until("the state", lambda: status(home, ini)["state"]["gateway"]
                    if not status(home, ini)["state"]["gateway"]["certificate"]["self_issued"]
                    else None)
    assert gw["certificate"]["path"] == str(cert)


def test_a_taken_port_delays_no_registration(tmp_path: Path, dockerd: Dockerd,
                                             master: Master) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    ini = tmp_path / "dm-agent.ini"
    ini.write_text(f"[main]\ndocker = {dockerd.unix_url}\nmaster = {master.url}\ntimeout = 1\n"
                   f"pidfile = {tmp_path}/agent.pid\ngateway = 127.0.0.1:{port}\n"
                   f"gateway_password_hash = {HASH}\n")
    proc = popen(["-f", str(ini)], tmp_path, {"STATE_DIRECTORY": str(tmp_path / "state")})
    try:
        reqs = master.wait_for(3)
        assert all(r.json["address"] == reqs[0].json["address"] for r in reqs)
        assert reqs[0].json["address"].startswith("https://")
        gw = wait_until("the state", lambda: status(tmp_path, ini)["state"]["gateway"])
        assert gw["listening"] is False and "cannot listen" in gw["error"]
        text = run(["status", "-f", str(ini)], tmp_path).stdout
        assert "gateway: NOT listening" in text
    finally:
        blocker.close()
        err = stop(proc)
    assert err.count("gateway: cannot listen on") == 1, err


def test_an_optional_gateway_without_credentials_registers_and_says_why_once(
        tmp_path: Path, dockerd: Dockerd, master: Master) -> None:
    proc = popen(["-f", "/dev/null"], tmp_path,
                 {"DM_AGENT_DOCKER": dockerd.unix_url, "DM_AGENT_TIMEOUT": "1",
                  "dm_agent_notifier_server": master.address,
                  "DM_AGENT_GATEWAY": "0.0.0.0:8771", "DM_AGENT_GATEWAY_OPTIONAL": "yes"})
    try:
        reqs = master.wait_for(3)
    finally:
        err = stop(proc)
    assert not reqs[0].json["address"].startswith("https://")
    assert err.count("ERROR - gateway: not started, so the master cannot manage") == 1, err


def test_with_the_gateway_off_nothing_of_it_is_loaded(tmp_path: Path, dockerd: Dockerd,
                                                      master: Master) -> None:
    """The agent's memory budget: bcrypt's and cryptography's libraries stay out of a
    running agent without the gateway (read from its /proc/PID/maps)."""
    proc = popen(["-d", dockerd.unix_url, "-m", master.address, "-t", "1"], tmp_path)
    try:
        master.wait_for(2)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
    finally:
        stop(proc)
    assert "_bcrypt" not in maps and "cryptography" not in maps and "_ssl" in maps


def test_stalled_and_broken_clients_stop_no_registration(node: dict[str, Any],
                                                         master: Master) -> None:
    """Fifty clients that connect and say nothing, and one that breaks off mid-request,
    hold the gateway's threads, not the rounds: registrations go on, and the gateway
    still answers a good client."""
    port = node["port"]
    wait_until("the gateway", lambda: get(port, "/_ping"))
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    try:
        broken = ssl.create_default_context()
        broken.check_hostname, broken.verify_mode = False, ssl.CERT_NONE
        with broken.wrap_socket(socket.create_connection(("127.0.0.1", port))) as sock:
            sock.sendall(b"POST /containers/create HTTP/1.1\r\nHost: d\r\n"
                         b"Content-Length: 100000\r\n\r\n{")
        have = len(master.requests)
        master.wait_for(have + 3)  # three more rounds while they hang on
        code = get(port, "/_ping")[0]
        assert code == 200
    finally:
        for sock in stalled:
            sock.close()
    assert node["proc"].poll() is None
