"""Live inventory: a container change reaches the master within a second, bursts
coalesce, and the event stream resumes after dockerd restarts (real dockerd)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentproc import popen
from support.dockerd import Dockerd, create_containers
from support.master import Master

from dm_agent.collectors.events import is_change, since_param

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
    proc = popen(["-d", events_dockerd.unix_url, "-m", master.url, "-t", "60", "-vv"], tmp_path,
                 {"DM_AGENT_JITTER": "no"})  # only events register within the test
    master.wait_for(1)
    time.sleep(0.5)  # the stream is up
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
    assert req.time - t0 < 1.0, req.time - t0


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
    time.sleep(1)
    events_dockerd.start()
    time.sleep(3)  # backoff: the watcher reconnects within a few seconds
    t0 = time.monotonic()
    create_containers(events_dockerd, 1, prefix="after-restart")
    req = wait_until(master, lambda r: "after-restart-00000" in names(r), 5)
    assert req.time - t0 < 1.5


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
