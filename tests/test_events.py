"""Live inventory: a container change reaches the master within a second, bursts
coalesce, and the event stream resumes after dockerd restarts (real dockerd)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentproc import popen
from support.dockerd import Dockerd, create_containers
from support.master import Master
from support.scripted_docker import ScriptedDocker, own_tcp_sockets_to

from dm_agent.collectors.docker import connect
from dm_agent.collectors.events import EventWatcher, is_change, since_param

pytestmark = pytest.mark.docker


def test_noise_is_denied_and_any_other_action_is_a_change() -> None:
    for action in ("create", "start", "die", "destroy", "remove", "init", "cleanup", "prune",
                   "rename", "kill", "health_status_new_in_a_later_engine"):
        assert is_change(action), action
    for action in ("exec_create: sh -c true", "exec_start: sh", "exec_die", "exec_died",
                   "health_status: healthy", "attach", "top", "resize", "copy",
                   "archive-path", "export", ""):
        assert not is_change(action), action


def test_since_param() -> None:
    assert since_param(1_700_000_000_123_456_789) == "1700000000.123456789"
    assert since_param(5) == "0.000000005"


@pytest.fixture
def events_dockerd(dockerd_factory: Any) -> Dockerd:
    d: Dockerd = dockerd_factory(labels={"role": "events"}, hostname="events-node")
    return d


@pytest.fixture
def agent(tmp_path: Path, events_dockerd: Dockerd,
          master: Master) -> Iterator[subprocess.Popen[str]]:
    # -t 600 without jitter: only events register within a test
    proc = popen(["-d", events_dockerd.unix_url, "-m", master.url, "-t", "600", "-vv"],
                 tmp_path, {"DM_AGENT_JITTER": "no"})
    master.wait_for(1)
    # The stream is up once a change reaches the master (one made before the stream
    # connected is replayed: it resumes from the watcher's start).
    create_containers(events_dockerd, 1, prefix="ready")
    wait_until(master, lambda r: "ready-00000" in names(r), 30)
    yield proc
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()


def names(req: Any) -> set[str]:
    return {c["name"] for c in req.json["containers"]}


def wait_until(master: Master, pred: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        reqs = master.wait_for(seen + 1, timeout=max(0.01, deadline - time.monotonic()))
        for req in reqs[seen:]:
            if pred(req):
                return req
        seen = len(reqs)
    pytest.fail("the master never saw the change")


def test_created_container_reaches_master_within_a_second(
        events_dockerd: Dockerd, master: Master, agent: subprocess.Popen[str]) -> None:
    t0 = time.monotonic()
    create_containers(events_dockerd, 1, prefix="fresh")
    req = wait_until(master, lambda r: "fresh-00000" in names(r), 5)
    # the README promises a lone change at the master within 1 s; twice that here
    assert req.time - t0 < 2.0, req.time - t0


def test_burst_coalesces_into_a_handful(events_dockerd: Dockerd, master: Master,
                                        agent: subprocess.Popen[str]) -> None:
    before = len(master.requests)
    result = create_containers(events_dockerd, 100, prefix="burst")
    wait_until(master, lambda r: len([n for n in names(r) if n.startswith("burst-")]) == 100,
               10)
    time.sleep(1.5)
    during = len(master.requests) - before
    assert during <= 3 + result.seconds * 1.5, (during, result.seconds)
    assert during < 25


def test_stream_resumes_after_dockerd_restart(events_dockerd: Dockerd, master: Master,
                                              agent: subprocess.Popen[str]) -> None:
    events_dockerd.stop()
    events_dockerd.start()
    # Created whenever the watcher's backoff (1, 2, 4 … s) lets it reconnect: it resumes
    # since the last event it saw, so the change arrives, long before the periodic round.
    create_containers(events_dockerd, 1, prefix="after-restart")
    wait_until(master, lambda r: "after-restart-00000" in names(r), 60)


def test_events_can_be_turned_off(tmp_path: Path, events_dockerd: Dockerd,
                                  master: Master) -> None:
    proc = popen(["-d", events_dockerd.unix_url, "-m", master.url, "-t", "60"], tmp_path,
                 {"DM_AGENT_DOCKER_EVENTS": "no", "DM_AGENT_JITTER": "no"})
    try:
        master.wait_for(1)
        create_containers(events_dockerd, 1, prefix="quiet")
        time.sleep(2)
        assert len(master.requests) == 1
    finally:
        proc.terminate()
        proc.communicate(timeout=5)


# --- liveness and backoff, against a scripted Docker (tests/support/scripted_docker.py) --


def test_a_stream_dropped_at_once_backs_off(tmp_path: Path) -> None:
    """A Docker (or a proxy) that accepts the event stream and drops it at once: the
    reconnect backoff grows (1, 2, 4 s …), it is not reset by a stream that never held."""
    with ScriptedDocker(tmp_path / "d.sock", drop_events=True) as docker:
        watcher = EventWatcher(lambda: connect(docker.url, None, 5.0), lambda action: None)
        watcher.start()
        time.sleep(8)
        watcher.stop()
        streams = docker.count("/events")
    # t = 0, 1, 3, 7 s with the backoff; one a second (8 or 9) when it is reset each time
    assert 3 <= streams <= 5, streams


def test_the_event_stream_over_tcp_has_keepalive() -> None:
    """Over TCP a silently dead peer (a NAT's idle timeout) is noticed by keepalive
    probes (after 30 s idle, every 10 s, 3 of them), so the stream is not trusted for
    ever. The option is read back from the stream's real socket."""
    with ScriptedDocker() as docker:
        watcher = EventWatcher(lambda: connect(docker.url, None, 5.0), lambda action: None)
        watcher.start()
        try:
            deadline = time.monotonic() + 10
            while docker.open_streams < 1:
                assert time.monotonic() < deadline, "the stream never connected"
                time.sleep(0.05)
            socks = own_tcp_sockets_to(docker.address[1])
            try:
                options = {(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))
                           for s in socks}
            finally:
                for s in socks:
                    s.close()
        finally:
            watcher.stop()
    assert options == {(1, 30, 10, 3)}, options
