"""sd_notify's watchdog datagram, received on a real unix socket as systemd receives it."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from dm_agent.process import notify
from dm_agent.process.notify import Watchdog


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_ping_sends_watchdog_1_to_a_path_and_an_abstract_socket(tmp_path: Path) -> None:
    for name, bind in ((str(tmp_path / "notify"), str(tmp_path / "notify")),
                       (f"@dm-agent-test-{os.getpid()}", f"\0dm-agent-test-{os.getpid()}")):
        with _receiver(bind) as server:
            wd = Watchdog.from_env({os.getpid()}, {"NOTIFY_SOCKET": name,
                                                    "WATCHDOG_USEC": "4000000"})
            assert wd is not None and wd.period == 1.0
            time.sleep(notify.FIRST_PING_AFTER)  # systemd knows a forking daemon's PID
            wd.ping()
            assert server.recv(64) == b"WATCHDOG=1"
            wd.close()


def test_no_watchdog_unless_it_is_meant_for_this_process() -> None:
    base = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "60000000"}
    assert Watchdog.from_env({1234}, {}) is None
    assert Watchdog.from_env({1234}, {**base, "WATCHDOG_USEC": "0"}) is None
    assert Watchdog.from_env({1234}, {**base, "WATCHDOG_PID": "99"}) is None
    # a forking daemon: WATCHDOG_PID is its starter's, one of the PIDs it has been
    wd = Watchdog.from_env({1234, 99}, {**base, "WATCHDOG_PID": "99"})
    assert wd is not None and wd.timeout == 60.0 and wd.period == 15.0
    wd.close()


def test_a_missing_socket_is_logged_once_and_never_raises(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    wd = Watchdog(str(tmp_path / "absent"), 400_000)
    time.sleep(0.2)
    wd.ping()
    wd.ping()
    wd.close()
    assert [r.levelname for r in caplog.records if "watchdog" in r.getMessage()] == ["WARNING"]
