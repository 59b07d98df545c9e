"""The harness tests itself: the master must be able to say no, dockerd must be real.

If these fail, every integration test built on the harness is meaningless. The master's
need nothing; the dockerd's are marked ``docker`` (root, a real dockerd), as elsewhere.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import SESSION_LABELS, SESSION_NODE_NAME
from support.dockerd import (
    Dockerd,
    DockerdError,
    FixtureSet,
    create_containers,
    parse_labels,
    populate,
    remove_containers,
)
from support.image import IMAGE, rootfs_tarball
from support.master import (
    HTML_502,
    UNAUTHORIZED_BODY,
    Master,
    MasterTimeout,
    name_problem,
    validate_payload,
)

VERSION = "9.9.9"
DUPLICATE_KEY = b'{"name": "x", "name": "node-1"}'
Z = "2016-08-10T15:03:05.559807Z"


def payload(name: str = "node-1", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "time": "2016-08-10T15:03:05.559807",
        "id": name,
        "name": name,
        "address": "172.31.0.12:2375",
        "labels": {"zone": "eu-1", "q": "a=b"},
        "containers": [
            {"id": "4970ae", "name": "web1", "image": "nginx:1.25", "labels": {"app": "web"}}
        ],
        "system": {
            "cpuLoad": 12.5,
            "memory": {"total": 16777216000, "available": 9000000000, "used": 7000000000},
            "disks": {"/": {"total": 107374182400, "used": 53687091200}},
            "net": {"eth0": {"bytesIn": 123456, "bytesOut": 654321}},
        },
    }
    body.update(overrides)
    return body


def send(
    m: Master,
    body: Any = None,
    *,
    name: str = "node-1",
    query: str = "ttl=20",
    headers: dict[str, str] | None = None,
    drop_headers: tuple[str, ...] = (),
    raw: bytes | None = None,
    path: str | None = None,
    method: str = "POST",
    timeout: float = 5.0,
    context: ssl.SSLContext | None = None,
) -> tuple[int, str, http.client.HTTPResponse]:
    """One request the way an agent would send it; each part can be broken."""
    hdrs = {"Content-Type": "application/json", "User-Agent": f"dm-agent/{VERSION}"}
    hdrs.update(headers or {})
    for h in drop_headers:
        hdrs.pop(h, None)
    data = raw if raw is not None else json.dumps(payload(name) if body is None else body).encode()
    if path is None:
        path = f"{m.prefix}/discovery/nodes/{urllib.parse.quote(name, safe='')}"
    if query:
        path += "?" + query
    conn: http.client.HTTPConnection
    if context is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", m.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", m.port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), resp
    finally:
        conn.close()


@pytest.fixture
def strict(master_factory: Callable[..., Master]) -> Master:
    m = master_factory(expected_version=VERSION)
    m.allow_invalid = True  # these tests send invalid requests on purpose
    return m


def only_request(m: Master) -> Any:
    reqs = m.wait_for(1, timeout=10)  # a deadline, not a window: it returns at once
    assert len(reqs) == 1
    return reqs[0]


# --------------------------------------------------------------------------- master: yes


def test_master_accepts_the_design_example(master_factory: Callable[..., Master]) -> None:
    m = master_factory(expected_version=VERSION, expected_ttl=20, expected_name="node-1")
    t0 = time.monotonic()
    status, _, _ = send(m)
    assert status == 200
    r = only_request(m)
    assert r.errors == [] and r.valid
    assert r.method == "POST" and r.path == "/discovery/nodes/node-1"
    assert r.raw_path == "/discovery/nodes/node-1?ttl=20"
    assert r.query == {"ttl": ["20"]}
    assert r.node_name == "node-1" and r.json == payload()
    assert r.header("user-agent") == f"dm-agent/{VERSION}"
    assert t0 <= r.time <= time.monotonic()
    assert r.status == 200 and r.auth_ok is None


def test_master_decodes_a_percent_encoded_name(strict: Master) -> None:
    name = "dm-test node/ü"  # decoded right, then refused: not a domain name
    assert send(strict, name=name)[0] == 500
    r = only_request(strict)
    assert r.errors and all("InternetDomainName" in e for e in r.errors)
    assert r.raw_path.startswith("/discovery/nodes/dm-test%20node%2F%C3%BC?")
    assert r.node_name == name and r.path == strict.expected_path(name)
    assert send(strict, name="knoten-ü.example")[0] == 200  # non-ASCII passes, as in Guava


@pytest.mark.parametrize(
    ("name", "ok"),
    [("node-1", True), ("node_1.example.com.", True), ("a" * 63, True), ("3com.com", True),
     ("a" * 64, False), (".".join(["a" * 50] * 5) + ".abcd", False), ("10.0.0.1", False),
     ("node.1x", False), ("-node", False), ("node_", False), ("a..b", False),
     ("node:1", False), ("no de", False), ("", False)],
)
def test_master_refuses_a_name_guava_refuses(strict: Master, name: str, ok: bool) -> None:
    """Guava's InternetDomainName, which both generations read the node name with."""
    assert (name_problem(name) is None) is ok
    if name and ok:
        assert send(strict, name=name)[0] == 200


@pytest.mark.parametrize(
    ("generation", "time", "ok"),
    [("v1", "2016-08-10T15:03:05.559807", True), ("v1", "2016-08-10T15:03:05.559807Z", True),
     ("v1", "2016-08-10T15:03:05+00:00", False), ("v1", "2016-08-10T15:03:05+03:00", False),
     ("v1", 1470841385, False),
     ("v2", "2016-08-10T15:03:05.559807", False), ("v2", "2016-08-10T15:03:05.559807Z", True),
     ("v2", "2016-08-10T15:03:05+03:00", True), ("v2", 1470841385, True),
     ("v2", 1470841385.5, True)],
)
def test_master_generations_read_time_as_their_dto(
    master_factory: Callable[..., Master], generation: str, time: Any, ok: bool
) -> None:
    m = master_factory(expected_version=VERSION, generation=generation)
    m.allow_invalid = True
    status, text, _ = send(m, payload(time=time))
    assert status == (200 if ok else 500), text


def test_master_v2_ignores_id_labels_containers_and_fails_on_nulls(
    master_factory: Callable[..., Master],
) -> None:
    m = master_factory(expected_version=VERSION, generation="v2")
    m.allow_invalid = True
    body = payload(id=42, labels=["x"], containers={"not": "a list"}, time=Z)
    assert send(m, body)[0] == 200
    body = payload(time=Z)
    del body["id"], body["labels"], body["containers"]
    assert send(m, body)[0] == 200
    assert send(m, payload(address=None, time=Z))[0] == 500
    body = payload(time=Z)
    body["system"]["net"]["eth0"] = None
    status, text, _ = send(m, body)
    assert status == 500 and "eth0" in text
    assert m.errors and len(m.requests) == 4


@pytest.mark.parametrize(
    "bad_segment",
    ["dm-test node", "a/b", "%zz", "%C3", "ü"],
    ids=["raw-space", "raw-slash", "bad-escape", "bad-utf8", "raw-unicode"],
)
def test_master_rejects_a_badly_encoded_name(strict: Master, bad_segment: str) -> None:
    # http.client refuses control characters only, so the raw target goes out as is
    target = "/discovery/nodes/" + bad_segment
    sock = socket.create_connection(("127.0.0.1", strict.port), timeout=5)
    body = json.dumps(payload()).encode()
    head = (
        f"POST {target}?ttl=20 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"User-Agent: dm-agent/{VERSION}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    answer = sock.recv(100)
    sock.close()
    assert answer.split()[1] in (b"400", b"404")
    assert only_request(strict).errors


def test_master_prefix_and_zoned_time(master_factory: Callable[..., Master]) -> None:
    m = master_factory(expected_version=VERSION, prefix="/haven/", generation="v2")
    assert m.url == f"http://127.0.0.1:{m.port}/haven"
    assert send(m, payload(time="2016-08-10T15:03:05.559807Z"))[0] == 200
    m.allow_invalid = True
    assert send(m, payload(time="2016-08-10T15:03:05"))[0] == 500  # v2 needs an offset
    assert send(m, path="/discovery/nodes/node-1")[0] == 404  # prefix missing
    reqs = m.wait_for(3)
    assert reqs[0].errors == [] and reqs[1].errors and reqs[2].errors


def test_master_integer_cpu_load_is_a_note_not_an_error(strict: Master) -> None:
    body = payload()
    body["system"]["cpuLoad"] = 12
    assert send(strict, body)[0] == 200
    r = only_request(strict)
    assert r.errors == [] and any("cpuLoad" in n for n in r.notes)


# --------------------------------------------------------------------------- master: no


def _set(body: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node: Any = body
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    node[last] = value


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("system.memory.total", 16777216000.0),
        ("system.memory.used", 7.0e9),
        ("system.memory.available", True),
        ("system.disks./.used", 1.5),
        ("system.net.eth0.bytesIn", "123456"),
        ("system.net.eth0.bytesOut", 2**64),
        ("system.memory.total", -1),
        ("system.cpuLoad", "12.5"),
        ("system.cpuLoad", 150.0),
        ("system.cpuLoad", False),
        ("id", 42),
        ("labels", ["zone=eu-1"]),
        ("labels.zone", 1),
        ("containers.0.labels", None),
        ("containers.0.name", "/web1"),
        ("containers.0.image", None),
        ("containers", {}),
        ("time", "2016-08-10 15:03:05"),
        ("time", "2016-08-10T15:03:05+02:00"),
        ("time", "2016-13-10T15:03:05"),
        ("time", 1470841385),
    ],
)
def test_master_rejects_a_wrong_type(strict: Master, where: str, value: Any) -> None:
    body = payload()
    _set(body, where, value)
    status, text, _ = send(strict, body)
    assert status == 500  # the master's catch-all handler answers a parse error so
    r = only_request(strict)
    assert r.errors, f"{where}={value!r} was accepted"
    assert where.split(".")[-1].replace("/", "") in " ".join(r.errors) or where in text


@pytest.mark.parametrize(
    "missing",
    [
        "time", "id", "name", "address", "labels", "containers", "system",
        "system.cpuLoad", "system.memory", "system.memory.used", "system.disks",
        "system.net", "system.net.eth0.bytesOut", "containers.0.labels", "containers.0.id",
    ],
)  # fmt: skip
def test_master_rejects_a_missing_field(strict: Master, missing: str) -> None:
    body = payload()
    *parents, last = missing.split(".")
    node: Any = body
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    del node[last]
    assert send(strict, body)[0] == 500
    assert any(f"{last}: missing" in e for e in only_request(strict).errors)


def test_master_rejects_id_and_name_that_differ(strict: Master) -> None:
    assert send(strict, payload(id="other"))[0] == 500
    assert send(strict, payload(name="other", id="other"))[0] == 400  # path says node-1
    reqs = strict.wait_for(2)
    assert any("id" in e for e in reqs[0].errors)
    assert any("body name" in e for e in reqs[1].errors)


@pytest.mark.parametrize(
    "raw",
    [b'{"a": NaN}', b"not json", b"\xff\xfe{}", b"[]", b"", DUPLICATE_KEY],
    ids=["nan", "garbage", "not-utf8", "array", "empty", "duplicate-key"],
)
def test_master_rejects_a_body_that_is_not_strict_json(strict: Master, raw: bytes) -> None:
    assert send(strict, raw=raw)[0] == 500
    assert only_request(strict).errors


@pytest.mark.parametrize(
    "query",
    ["", "ttl=", "ttl=abc", "ttl=2.5", "ttl=-4", "ttl=0", "TTL=20", "ttl=20&x=1",
     "ttl=20&ttl=30", "x=1"],
)  # fmt: skip
def test_master_rejects_a_bad_query(strict: Master, query: str) -> None:
    assert send(strict, query=query)[0] == 400
    assert any("query" in e for e in only_request(strict).errors)


def test_master_checks_expected_ttl(master_factory: Callable[..., Master]) -> None:
    m = master_factory(expected_version=VERSION, expected_ttl=120)
    m.allow_invalid = True
    assert send(m, query="ttl=60")[0] == 400
    assert "expected 120" in " ".join(only_request(m).errors)


@pytest.mark.parametrize(
    ("headers", "drop", "needle"),
    [
        ({}, ("User-Agent",), "User-Agent"),
        ({"User-Agent": "python-requests/2.31.0"}, (), "User-Agent"),
        ({"User-Agent": "dm-agent/1.0.0"}, (), "version"),
        ({"User-Agent": "dm-agent/ 9.9.9 extra"}, (), "User-Agent"),
        ({}, ("Content-Type",), "Content-Type"),
        ({"Content-Type": "text/plain"}, (), "Content-Type"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, (), "Content-Type"),
        ({"X-Auth-Node": "s3cret"}, (), "X-Auth-Node"),
    ],
)
def test_master_rejects_a_bad_or_missing_header(
    strict: Master, headers: dict[str, str], drop: tuple[str, ...], needle: str
) -> None:
    assert send(strict, headers=headers, drop_headers=drop)[0] == 400
    assert any(needle in e for e in only_request(strict).errors)


def test_master_rejects_a_wrong_method(strict: Master) -> None:
    assert send(strict, method="PUT")[0] == 405
    assert any("method" in e for e in only_request(strict).errors)


def test_master_with_a_secret_says_401_like_the_real_one(
    master_factory: Callable[..., Master],
) -> None:
    m = master_factory(expected_version=VERSION, secret="s3cret")
    status, _, _ = send(m, headers={"X-Auth-Node": "s3cret"})
    assert status == 200
    status, text, _ = send(m)
    assert status == 401 and "secret" in text
    status, text, _ = send(m, headers={"X-Auth-Node": "wrong"})
    assert status == 401 and text == UNAUTHORIZED_BODY
    reqs = m.wait_for(3)
    assert [r.auth_ok for r in reqs] == [True, False, False]
    assert m.errors == []  # a wrong secret is an answer, not a contract violation


def test_master_wait_for_times_out_and_clear(strict: Master) -> None:
    with pytest.raises(MasterTimeout):
        strict.wait_for(1, timeout=0.2)
    send(strict)
    assert len(strict.wait_for(1)) == 1
    strict.clear()
    assert strict.requests == []


def test_validate_payload_alone() -> None:
    assert validate_payload(payload()) == ([], [])
    assert validate_payload(payload(time="2016-08-10T15:03:05Z"))[0] == []  # v1 drops Z
    assert validate_payload(payload(time="2016-08-10T15:03:05Z"), generation="v2")[0] == []
    extra = payload(version="1")
    assert validate_payload(extra)[0] == [] and validate_payload(extra)[1]
    assert validate_payload(copy.deepcopy([payload()]))[0]


# --------------------------------------------------------------------------- master: modes


def test_master_modes_error500_html502_unauthorized(strict: Master) -> None:
    strict.set_mode("error500")
    assert send(strict)[0] == 500
    strict.set_mode("html502")
    status, text, resp = send(strict)
    assert status == 502 and resp.getheader("Content-Type") == "text/html"
    assert 4500 <= len(text) <= 6000 and text == HTML_502.decode()
    strict.set_mode("unauthorized")
    status, text, _ = send(strict, headers={})
    assert status == 401 and "secret" in text
    strict.set_mode("ok")
    assert send(strict)[0] == 200
    assert [r.status for r in strict.wait_for(4)] == [500, 502, 401, 200]
    assert strict.errors == []  # the requests were fine; only the answers were bad


def test_master_script_then_fall_back(strict: Master) -> None:
    strict.script("error500", "html502")
    statuses = [send(strict)[0] for _ in range(3)]
    assert statuses == [500, 502, 200]


def test_master_drop_closes_without_an_answer(strict: Master) -> None:
    strict.set_mode("drop")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        send(strict)
    r = only_request(strict)
    assert r.status is None and r.mode == "drop" and r.json == payload()


def test_master_hang_and_stop_does_not_hang(strict: Master) -> None:
    strict.set_mode("hang")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        send(strict, timeout=0.5)
    assert only_request(strict).status is None
    # a second, still hanging connection must not block stop()
    sock = socket.create_connection(("127.0.0.1", strict.port), timeout=5)
    body = json.dumps(payload()).encode()
    sock.sendall(
        b"POST /discovery/nodes/node-1?ttl=20 HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nUser-Agent: dm-agent/9.9.9\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    strict.wait_for(2)
    t1 = time.monotonic()
    strict.stop()
    assert time.monotonic() - t1 < 2
    assert sock.recv(100) == b""  # closed, never answered
    sock.close()
    assert time.monotonic() - t0 < 5


def test_master_refuse_then_resume_on_the_same_port(strict: Master) -> None:
    port = strict.port
    assert send(strict)[0] == 200
    strict.set_mode("refuse")
    with pytest.raises(ConnectionRefusedError):
        send(strict)
    strict.resume()
    assert strict.port == port
    assert send(strict)[0] == 200
    assert len(strict.requests) == 2


def test_master_delay(strict: Master) -> None:
    strict.delay = 0.3
    t0 = time.monotonic()
    assert send(strict)[0] == 200
    assert time.monotonic() - t0 >= 0.3


def test_master_over_https(master_factory: Callable[..., Master]) -> None:
    m = master_factory(expected_version=VERSION, tls=True)
    assert m.url.startswith("https://127.0.0.1:") and m.ca_file is not None
    ctx = ssl.create_default_context(cafile=str(m.ca_file))
    assert send(m, context=ctx)[0] == 200
    with pytest.raises(ssl.SSLCertVerificationError):
        send(m, context=ssl.create_default_context())  # the system store does not know it
    assert len(m.requests) == 1


# --------------------------------------------------------------------------- dockerd


@pytest.mark.docker
def test_dockerd_reports_the_daemon_labels_it_was_given(dockerd: Dockerd) -> None:
    info = dockerd.info()
    assert parse_labels(info["Labels"]) == SESSION_LABELS == dockerd.labels
    assert "dm.query=a=b=c" in info["Labels"] and "empty=" in info["Labels"]
    assert info["Name"] == SESSION_NODE_NAME == dockerd.name
    assert info["Name"] != socket.gethostname()  # a UTS namespace, the host is untouched
    assert Path(info["DockerRootDir"]) == dockerd.data_root


@pytest.mark.docker
def test_dockerd_holds_exactly_the_fixture_containers(
    dockerd: Dockerd, docker_fixture_set: FixtureSet
) -> None:
    listed = dockerd.api("/containers/json", params={"all": 1})
    assert len(listed) == len(docker_fixture_set.containers) == 7
    by_id = {c["Id"]: c for c in listed}
    assert set(by_id) == docker_fixture_set.ids
    for fc in docker_fixture_set.containers:
        c = by_id[fc.id]
        assert c["Names"] == ["/" + fc.name]
        assert c["Image"] == fc.image
        assert (c["Labels"] or {}) == fc.labels
        assert c["State"] == fc.state and (c["State"] == "running") == fc.running
    fs = docker_fixture_set
    assert len(fs.running) == 3 and len(fs.stopped) == 4
    assert {c.state for c in fs.stopped} == {"created", "exited"}
    assert fs.by_name("no-labels").labels == {}
    assert fs.by_name("web-1").labels["dm.query"] == "a=b=c"
    assert fs.by_name("db_1.primary").labels["störe"] == "Grüße ✓ 日本"
    assert fs.by_name("job-exited").labels["empty"] == ""
    assert fs.by_name("by-image-id").image == fs.image_id != IMAGE
    assert [c["name"] for c in fs.expected_containers()] == sorted(fs.names)


@pytest.mark.docker
def test_dockerd_answers_on_tcp_and_through_the_sdk(dockerd: Dockerd) -> None:
    assert dockerd.tcp_address and dockerd.tcp_url == f"tcp://{dockerd.tcp_address}"
    host, port = dockerd.tcp_address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("GET", "/_ping")
    assert conn.getresponse().read() == b"OK"
    conn.close()
    import docker

    tcp = docker.APIClient(base_url=dockerd.tcp_url, version="1.41")
    assert tcp.info()["Name"] == SESSION_NODE_NAME
    assert len(dockerd.client.containers(all=True)) == 7
    assert dockerd.unix_url == f"unix://{dockerd.socket_path}"
    assert dockerd.pid and Path(f"/proc/{dockerd.pid}/exe").resolve().name == "dockerd"


@pytest.mark.docker
def test_tls_dockerd_answers_only_with_the_client_cert(tls_dockerd: Dockerd) -> None:
    assert tls_dockerd.https_url and tls_dockerd.tls_dir
    assert {p.name for p in tls_dockerd.tls_dir.iterdir()} >= {"ca.pem", "cert.pem", "key.pem"}
    assert tls_dockerd.tls_client().ping() is True
    assert len(tls_dockerd.tls_client().containers(all=True)) == 7

    host, port = tls_dockerd.tcp_address.split(":")  # type: ignore[union-attr]
    files = tls_dockerd.tls_files
    assert files is not None
    # the right CA but no client certificate: the handshake or the first read fails
    with pytest.raises((ssl.SSLError, ConnectionError)):
        conn = http.client.HTTPSConnection(
            host, int(port), timeout=5, context=files.client_context(with_cert=False)
        )
        conn.request("GET", "/_ping")
        conn.getresponse().read()
    # plain http on the TLS port is not answered with data
    conn2 = http.client.HTTPConnection(host, int(port), timeout=5)
    conn2.request("GET", "/_ping")
    assert conn2.getresponse().status == 400
    conn2.close()
    # a client that does not trust the throwaway CA refuses the server
    with pytest.raises(ssl.SSLCertVerificationError):
        conn3 = http.client.HTTPSConnection(
            host, int(port), timeout=5, context=ssl.create_default_context()
        )
        conn3.request("GET", "/_ping")


def _leftovers(d: Dockerd) -> list[int]:
    marker = str(d.exec_root).encode() + b"/"
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
                state = Path(f"/proc/{p}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmd and state != b"Z":
                found.append(int(p))
    return found


def _mounts_under(d: Dockerd) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [ln.split()[4] for ln in text.splitlines() if ln.split()[4].startswith(str(d.base_dir))]


@pytest.mark.docker
def test_dockerd_survives_kill_stop_and_restart(
    dockerd_factory: Callable[..., Dockerd],
) -> None:
    d = dockerd_factory(labels=["k=v"])
    fs = populate(d)
    pid = d.pid
    assert _leftovers(d)  # containerd and the shims
    d.kill()  # a crash: shims and containers stay behind unless swept
    assert not d.running and d.pid is None and not d.ping()
    assert _leftovers(d) == [] and _mounts_under(d) == []
    d.start()
    assert d.pid != pid
    states = {c["Names"][0][1:]: c["State"] for c in d.api("/containers/json", params={"all": 1})}
    assert states == {c.name: c.state for c in fs.containers}  # restart=always brought them back
    d.restart()
    assert d.ping() and len(d.api("/containers/json", params={"running": 1})) == 3
    d.stop()
    assert not d.ping() and not d.socket_path.exists()
    assert _leftovers(d) == [] and _mounts_under(d) == []
    base = d.base_dir
    d.close()
    assert not base.exists()


@pytest.mark.docker
def test_dockerd_start_failure_is_loud_and_clean() -> None:
    d = Dockerd(extra_args=["--no-such-flag"], start_timeout=10)
    try:
        with pytest.raises(DockerdError, match="unknown flag"):
            d.start()
        assert not d.running
    finally:
        d.close()
    assert not d.base_dir.exists()


@pytest.mark.docker
def test_create_and_remove_containers_in_bulk(dockerd_factory: Callable[..., Dockerd]) -> None:
    d = dockerd_factory()
    result = create_containers(d, 40, prefix="bench", labels={"bench": "yes"})
    assert len(result.ids) == 40 and result.seconds > 0
    listed = d.api("/containers/json", params={"all": 1})
    assert sorted(c["Names"][0][1:] for c in listed) == result.names
    assert all(c["Labels"]["bench"] == "yes" for c in listed)
    remove_containers(d, result.ids)
    assert d.api("/containers/json", params={"all": 1}) == []


def test_the_image_tarball_is_built_once() -> None:
    first = rootfs_tarball()
    mtime = first.stat().st_mtime_ns
    assert rootfs_tarball() == first and first.stat().st_mtime_ns == mtime
    import tarfile

    with tarfile.open(first) as tar:
        names = set(tar.getnames())
    assert {"bin/busybox", "bin/sh", "bin/sleep", "bin/true"} <= names


def test_master_records_a_request_http_server_refuses(strict: Master) -> None:
    sock = socket.create_connection(("127.0.0.1", strict.port), timeout=5)
    sock.sendall(b"POST /discovery/nodes/a b c?ttl=20 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(100).split()[1] == b"400"
    sock.close()
    r = only_request(strict)
    assert r.status == 400 and "malformed request" in r.errors[0]
