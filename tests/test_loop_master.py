"""The foreground agent against a real strict HTTP master: schedule, ttl, signals, failures.

Docker is deliberately unreachable here (the agent keeps reporting host figures);
tests against a real dockerd are in test_integration_docker.py.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import agentproc
import pytest
from agentproc import popen, run
from support.master import Master

from dm_agent import __version__

pytestmark = pytest.mark.paced  # waits on a real agent's intervals: not in the unit tier

NO_DOCKER = "unix:///nonexistent/docker.sock"
SECRET = "node-secret-Kx81"


@pytest.fixture
def strict_master() -> Iterator[Master]:
    with Master(expected_version=__version__) as m:
        yield m
        m.assert_valid()


def start(home: Path, master: Master, *args: str, extra_env: dict[str, str] | None = None,
          ) -> subprocess.Popen[str]:
    return popen(["-d", NO_DOCKER, "-m", master.url, *args], home, extra_env)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[float, str]:
    """How long the agent took to stop on ``sig``, and its stderr."""
    t0 = time.monotonic()
    err = agentproc.stop(proc, sig)
    return time.monotonic() - t0, err


def test_once_registers_with_ttl_headers_and_valid_body(tmp_path: Path,
                                                        strict_master: Master) -> None:
    proc = run(["--once", "-d", NO_DOCKER, "-m", strict_master.url, "-t", "7"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (req,) = strict_master.requests
    assert req.method == "POST" and req.query == {"ttl": ["14"]}
    assert req.header("User-Agent") == f"dm-agent/{__version__}"
    assert req.header("X-Auth-Node") is None
    assert req.header("Content-Type") == "application/json"


def test_secret_header_exactly_when_set(tmp_path: Path) -> None:
    with Master(secret=SECRET) as master:
        ok = run(["--once", "-d", NO_DOCKER, "-m", master.url, "-s", SECRET], tmp_path)
        assert ok.returncode == 0, ok.stderr
        bad = run(["--once", "-d", NO_DOCKER, "-m", master.url], tmp_path)
        assert bad.returncode == 1
        assert [r.header("X-Auth-Node") for r in master.requests] == [SECRET, None]
        assert "HTTP 401" in bad.stderr and "set 'secret'" in bad.stderr
        wrong = run(["--once", "-d", NO_DOCKER, "-m", master.url],
                    tmp_path, {"DM_AGENT_SECRET": "wrong-one"})
        assert wrong.returncode == 1 and "check 'secret'" in wrong.stderr
        assert "wrong-one" not in wrong.stderr
        for proc in (ok, bad, wrong):
            assert SECRET not in proc.stdout + proc.stderr


def test_path_prefix_and_percent_encoded_name(tmp_path: Path) -> None:
    with Master(prefix="/cluman/api") as master:
        proc = run(["--once", "-d", NO_DOCKER, "-m", master.url], tmp_path)
        assert proc.returncode == 0, proc.stderr
        (req,) = master.requests
        assert req.path.startswith("/cluman/api/discovery/nodes/")
        master.assert_valid()


def test_fixed_schedule_every_second_with_ttl_2(tmp_path: Path, strict_master: Master) -> None:
    proc = start(tmp_path, strict_master, "-t", "1")
    try:
        reqs = strict_master.wait_for(7, timeout=15)
    finally:
        elapsed, err = stop(proc)
    assert all(r.query == {"ttl": ["2"]} for r in reqs)
    # The grid itself (no drift, skipped overruns) is test_schedule.py's; here, the real
    # loop: one registration a second, none skipped (twice the interval).
    gaps = [b.time - a.time for a, b in itertools.pairwise(reqs[1:])]
    assert all(g < 2.0 for g in gaps), gaps
    assert elapsed < 2 and proc.returncode == 0
    assert "Traceback" not in err


def test_sigterm_mid_sleep_and_mid_request(tmp_path: Path, strict_master: Master) -> None:
    proc = start(tmp_path, strict_master, "-t", "60")
    strict_master.wait_for(1)
    time.sleep(0.3)
    elapsed, _ = stop(proc)
    assert elapsed < 2 and proc.returncode == 0
    strict_master.clear()
    strict_master.set_mode("hang")
    proc = start(tmp_path, strict_master, "-t", "60")
    strict_master.wait_for(1)  # the request is in flight, the master never answers
    time.sleep(0.3)
    elapsed, _ = stop(proc, signal.SIGINT)
    assert elapsed < 2 and proc.returncode == 0


def test_sighup_applies_a_changed_interval_and_keeps_config_when_broken(
        tmp_path: Path, strict_master: Master) -> None:
    conf = tmp_path / "dm-agent.ini"
    conf.write_text(f"[main]\nmaster = {strict_master.url}\ndocker = {NO_DOCKER}\ntimeout = 30\n")
    proc = popen(["-f", str(conf), "-v"], tmp_path)
    try:
        strict_master.wait_for(1)
        conf.write_text(conf.read_text().replace("timeout = 30", "timeout = 1"))
        proc.send_signal(signal.SIGHUP)
        reqs = strict_master.wait_for(4, timeout=10)
        assert reqs[0].query == {"ttl": ["60"]}
        assert all(r.query == {"ttl": ["2"]} for r in reqs[1:])
        conf.write_text("[main]\ntimeout = never\n")
        proc.send_signal(signal.SIGHUP)
        n = len(strict_master.requests)
        reqs = strict_master.wait_for(n + 3, timeout=10)
        assert all(r.query == {"ttl": ["2"]} for r in reqs[n:])  # old config kept
    finally:
        _, err = stop(proc)
    assert "reload failed, keeping the running configuration" in err
    assert "invalid timeout = 'never'" in err
    assert "configuration reloaded" in err


def test_sigusr1_registers_at_once(tmp_path: Path, strict_master: Master) -> None:
    # Without jitter the next periodic round is a minute away: a second one within the
    # wait is the signal's.
    proc = start(tmp_path, strict_master, "-t", "60", extra_env={"DM_AGENT_JITTER": "no"})
    try:
        strict_master.wait_for(1)
        proc.send_signal(signal.SIGUSR1)
        strict_master.wait_for(2, timeout=20)
    finally:
        stop(proc)


@pytest.mark.parametrize("mode", ["error500", "html502", "drop", "refuse", "hang"])
def test_outage_is_one_error_line_then_recovery_info(tmp_path: Path, mode: str) -> None:
    with Master() as master:
        master.set_mode(mode)
        proc = popen(["-d", NO_DOCKER, "-m", master.url, "-t", "1", "-v"], tmp_path)
        try:
            time.sleep(4)  # several failed rounds and retries
            master.resume("ok") if mode == "refuse" else master.set_mode("ok")
            n = len(master.requests)
            master.wait_for(n + 2, timeout=5)  # registers again within one interval
        finally:
            _, err = stop(proc)
        errors = [ln for ln in err.splitlines() if " - ERROR - " in ln]
        docker_errors = [ln for ln in errors if "Docker" in ln]
        master_errors = [ln for ln in errors if ln not in docker_errors]
        assert len(master_errors) == 1, err
        assert "recovered after" in err
        if mode == "html502":
            line = master_errors[0]
            assert "HTTP 502" in line and len(line) < 400 and "<html" not in line.lower()
        if mode == "hang":
            assert "did not answer within" in master_errors[0]
        assert "Traceback" not in err


def test_https_master_with_configured_ca_and_not_without(tmp_path: Path) -> None:
    with Master(tls=True, prefix="/api") as master:
        assert master.url.startswith("https://") and master.ca_file
        ok = run(["--once", "-d", NO_DOCKER, "-m", master.url], tmp_path,
                 {"DM_AGENT_MASTER_CA": str(master.ca_file)})
        assert ok.returncode == 0, ok.stderr
        # the system CA store does not know the throwaway CA, and neither may
        # REQUESTS_CA_BUNDLE pointing elsewhere change what is trusted
        bad = run(["--once", "-d", NO_DOCKER, "-m", master.url], tmp_path,
                  {"REQUESTS_CA_BUNDLE": str(master.ca_file)})
        assert bad.returncode == 1
        assert "TLS to https://127.0.0.1" in bad.stderr
        assert "certificate verify failed" in bad.stderr
        assert len(master.requests) == 1
        master.assert_valid()
