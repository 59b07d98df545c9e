"""Fault suite: the agent stays alive and on schedule whatever the disks, Docker's
answers, the master or time do. (Docker stopped and restarted under a running agent is
in test_integration_docker.py and test_events.py.)"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from agentproc import popen, stop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.master import Master, parse_json_strict, validate_payload

from dm_agent.collectors import docker as dk
from dm_agent.collectors.host import HostCollector
from dm_agent.errors import DockerError
from dm_agent.round import payload

pytestmark = pytest.mark.docker  # root: a dockerd, a FUSE mount
NO_DOCKER = "unix:///nonexistent/docker.sock"
LINE_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - ")


# --- a mount that hangs: a real FUSE file system (bindfs) frozen with SIGSTOP ---------


@pytest.fixture
def frozen_mount(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A real FUSE mount whose server can be frozen: every stat of it then blocks in the
    kernel, exactly as on a dead NFS server."""
    if shutil.which("bindfs") is None:
        pytest.fail("bindfs is not installed (make deps)")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    subprocess.run(["bindfs", str(src), str(mnt)], check=True)
    pid = int(subprocess.run(["pgrep", "-n", "-f", f"bindfs {src} {mnt}"], check=True,
                             capture_output=True, text=True).stdout.split()[0])
    try:
        yield mnt, pid
    finally:
        os.kill(pid, signal.SIGCONT)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_hanging_mount_keeps_the_schedule_and_is_reported_once(
        tmp_path: Path, frozen_mount: tuple[Path, int]) -> None:
    mnt, server = frozen_mount
    with Master() as master:
        proc = popen(["-d", NO_DOCKER, "-m", master.url, "-t", "1", "-v"], tmp_path,
                     {"DM_AGENT_JITTER": "no"})
        try:
            reqs = master.wait_for(2)
            assert str(mnt) in reqs[-1].json["system"]["disks"]
            os.kill(server, signal.SIGSTOP)
            n = len(master.requests)
            reqs = master.wait_for(n + 6, timeout=12)[n:]
            os.kill(server, signal.SIGCONT)
            n = len(master.requests)
            back = master.wait_for(n + 3, timeout=6)[n:]
        finally:
            err = stop(proc)
        master.assert_valid()
    gaps = [b.time - a.time for a, b in itertools.pairwise(reqs)]
    # rounds keep their schedule: one a second, none skipped (twice the interval)
    assert all(g < 2.0 for g in gaps), gaps
    assert all(str(mnt) not in r.json["system"]["disks"] for r in reqs[1:])
    assert "/" in reqs[-1].json["system"]["disks"]  # the other filesystems still reported
    assert str(mnt) in back[-1].json["system"]["disks"]
    assert err.count(f"mount {mnt} did not answer") == 1, err
    assert f"mount {mnt} answers again" in err


# --- 10,000 generated Docker answers ------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
labels = st.dictionaries(st.text(), st.text() | st.none() | st.integers(), max_size=4)
container = st.fixed_dictionaries(
    {},
    optional={
        "Id": st.text(min_size=0, max_size=70) | anything,
        "Names": st.lists(st.text(max_size=20), max_size=3) | anything,
        "Image": st.text(max_size=30) | anything,
        "Labels": labels | anything,
        "NetworkSettings": anything,
        "State": st.sampled_from(["running", "exited", "created"]) | anything,
    },
)
info = st.fixed_dictionaries(
    {},
    optional={"Name": st.text(max_size=40) | anything,
              "Labels": st.lists(st.text(max_size=20), max_size=4) | anything},
) | anything
containers_answer = st.lists(container | anything, max_size=8) | anything
SYSTEM = HostCollector().collect()


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(info=info, containers=containers_answer, chunk=st.integers(1, 64))
def test_any_docker_answer_gives_a_body_the_strict_master_accepts(
        info: Any, containers: Any, chunk: int) -> None:
    """The agent's own path: /info parsed, /containers/json streamed through the lean
    decoder in arbitrary chunks; a DockerError means the host-only fallback body."""
    raw = json.dumps(containers).encode()
    try:
        name, node_labels = dk.parse_info(info)
        entries = dk.decode_containers([raw[i:i + chunk] for i in range(0, len(raw), chunk)],
                                       name)
        node = dk.NodeInfo(name, node_labels, dk.parse_containers(entries, name))
    except DockerError:
        node = dk.NodeInfo(socket.gethostname(), {}, [])
    body = payload.Encoder().encode(payload.build(node, "10.0.0.1", SYSTEM))
    errors, _ = validate_payload(parse_json_strict(body))
    assert errors == []


# --- a master that refuses for a long time, then recovers --------------------------


def test_long_refusal_stays_alive_bounded_quiet_and_recovers(tmp_path: Path) -> None:
    """30 intervals of refused connections (an hour-long outage at a 2-minute interval,
    compressed to an interval of 1 s): every retry is at most one interval after the
    previous one, at most 3 log lines (DEBUG aside) for the outage, and the agent is
    registered again within one interval of the master coming back."""
    with Master() as master:
        master.set_mode("refuse")
        proc = popen(["-d", NO_DOCKER, "-m", master.url, "-t", "1", "-vv"], tmp_path)
        try:
            time.sleep(30)
            assert proc.poll() is None
            master.resume("ok")
            t0 = time.monotonic()
            first = master.wait_for(1, timeout=5)[0]
            # within one interval (the backoff's cap, test_schedule.py), twice that here
            assert first.time - t0 <= 2.0
            master.wait_for(2, timeout=5)  # the first one's answer has been read and logged
        finally:
            err = stop(proc)
        master.assert_valid()
    lines = [ln for ln in err.splitlines()
             if (" - DEBUG - " not in ln and " - INFO - " not in ln) or "recovered" in ln]
    outage = [ln for ln in lines if "Docker" not in ln]
    assert len(outage) <= 3, outage
    assert any("recovered after" in ln for ln in outage)
    attempts = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                for ln in err.splitlines()
                if ("cannot reach" in ln or "failed again" in ln)
                and "Docker" not in ln and (m := LINE_TIME.match(ln))]
    assert len(attempts) >= 20  # it kept trying, backing off no further than the interval
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert max(gaps) <= 2.0, max(gaps)  # the backoff's cap, 1 s, with 2× margin


# --- a long run: memory does not grow ------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_memory_does_not_grow_over_many_registrations(tmp_path: Path, dockerd: Any) -> None:
    with Master() as master:
        proc = popen(["-d", dockerd.unix_url, "-m", master.url, "-t", "3600"], tmp_path,
                     {"DM_AGENT_JITTER": "no"})
        try:
            master.wait_for(1)
            samples = []
            for i in range(1, 1201):
                proc.send_signal(signal.SIGUSR1)
                master.wait_for(i + 1, timeout=10)
                if i % 200 == 0:
                    samples.append(rss_kb(proc.pid))
        finally:
            stop(proc)
        master.assert_valid()
    warm = samples[1:]  # after 400 registrations (make bench runs 10,000)
    assert max(warm) - min(warm) < 1024, samples  # < 1 MB over the next 800
