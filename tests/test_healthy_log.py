"""A healthy agent says so at INFO, and only so (docs/design.md §4): the real daemon, at
the packaged level (``log_level = 1``), logging as under systemd into a pipe named by
``JOURNAL_STREAM``, against a real strict master.

Docker is unreachable here (its one ERROR is not INFO); the INFO lines are the start, the
first accepted registration, a recovery, and never one line a registration."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentproc import BIN, NO_DOCKER, clean_env, wait_gone
from support.master import Master

from dm_agent.process.pidfile import read_pid

# paced: waits on a real agent's intervals, so not in the unit tier
pytestmark = [pytest.mark.daemon, pytest.mark.paced]

#: accepted registrations to wait for: enough that a line a registration would show
ROUNDS = 5


class JournalDaemon:
    """``dm-agent --daemon`` at log_level 1, its log in a pipe as systemd's journal has it."""

    def __init__(self, home: Path, master: Master) -> None:
        self.home = home
        self.pidfile = home / "run" / "dm-agent.pid"
        self.conf = home / "dm-agent.ini"
        self.conf.write_text(f"[main]\nmaster = {master.url}\ndocker = {NO_DOCKER}\n"
                             "timeout = 1\nlog_level = 1\n")
        self.pid: int | None = None
        self._read: int | None = None

    def start(self) -> None:
        rfd, wfd = os.pipe()
        st = os.fstat(wfd)
        proc = subprocess.run(
            [BIN, "--daemon", "-f", str(self.conf), "--pidfile", str(self.pidfile)],
            stdin=subprocess.DEVNULL, stdout=wfd, stderr=wfd, cwd=self.home, timeout=30,
            env=clean_env(self.home, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}))
        os.close(wfd)
        self._read = rfd
        assert proc.returncode == 0
        self.pid = read_pid(str(self.pidfile))
        assert self.pid

    def stop(self) -> list[str]:
        """SIGTERM, then every line the daemon logged (the pipe read to its end)."""
        assert self.pid and self._read is not None
        os.kill(self.pid, signal.SIGTERM)
        wait_gone(self.pid, 5)
        self.pid = None
        chunks = []
        with os.fdopen(self._read, "rb") as reader:
            self._read = None
            while chunk := reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode().splitlines()

    def kill(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._read is not None:
            os.close(self._read)


@pytest.fixture
def journal_daemon(tmp_path: Path, master: Master) -> Iterator[JournalDaemon]:
    d = JournalDaemon(tmp_path, master)
    yield d
    d.kill()


def info_until_stop(lines: list[str]) -> list[str]:
    """The INFO lines (``<6>``) before the stop was asked for."""
    out = []
    for line in lines:
        if "indicating exit request" in line:
            break
        if line.startswith("<6>"):
            out.append(line[3:])
    return out


def test_healthy_agent_logs_its_start_and_first_registration_only(
        journal_daemon: JournalDaemon, master: Master) -> None:
    journal_daemon.start()
    master.wait_for(ROUNDS, timeout=30)
    lines = journal_daemon.stop()
    info = info_until_stop(lines)
    assert len(info) == 2, lines
    start, registered = info
    assert start.startswith("started as daemon (PID ")
    assert f"master {master.url}, host " in start and "interval 1s, gateway off" in start
    name = master.requests[0].node_name
    assert registered == f"registered as {name} with {master.url} (ttl 2s)"
    assert not any(ln.startswith("<7>") for ln in lines)  # nothing at DEBUG at level 1


def test_recovery_is_one_line_and_registration_is_not_repeated(
        journal_daemon: JournalDaemon, master: Master) -> None:
    journal_daemon.start()
    master.wait_for(2, timeout=30)
    master.script("error500", "error500")
    seen = len(master.requests)
    master.wait_for(seen + 2 + ROUNDS, timeout=60)  # the two refusals, then accepted again
    lines = journal_daemon.stop()
    info = info_until_stop(lines)
    assert [ln.split(" ")[0] for ln in info] == ["started", "registered", "registration"], lines
    assert info[2].startswith("registration recovered after 2 failed attempts over ")
    errors = [ln for ln in lines if ln.startswith("<3>") and "HTTP 500" in ln]
    assert len(errors) == 1, lines  # the outage's first failure; the repeat is DEBUG
