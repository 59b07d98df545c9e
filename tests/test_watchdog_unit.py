"""systemd's watchdog under the booted unit: a hung agent is replaced, a healthy one never.

The .deb this tree builds (tests/support/lifecycle.py's ``build_packages``) is installed
in a booted Debian 12 root (tests/support/nspawn.py), configured against a strict master
(tests/support/master.py) and the session's real dockerd, and started with
``systemctl start``. A drop-in shortens the unit's ``WatchdogSec=60`` to 4 s and its
``RestartSec=5`` to 1 s, so the test takes a minute, not ten; at ``timeout = 1`` a
round is abandoned after 0.95 s and the loop pings every second at the most, so 4 s is
still twice the longest healthy gap, as 60 s is in production (30 s rounds at most).

- healthy for 40 s (ten watchdog periods): the same PID throughout, no restart, no
  watchdog line, no notification refused by systemd;
- SIGSTOP: systemd kills the agent (SIGABRT) when the watchdog expires and starts a new
  one after RestartSec, which registers again.

``DM_WATCHDOG_NOTES=path`` appends the measured restart time (JSON).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator

import pytest
from support import lifecycle, nspawn
from support.dockerd import Dockerd
from support.lifecycle import APT_ENV, UNIT, Node
from support.master import Master

pytestmark = pytest.mark.system

WATCHDOG_SEC = 4
RESTART_SEC = 1
HEALTHY_FOR = 40.0
DROP_IN = f"""[Service]
WatchdogSec={WATCHDOG_SEC}
RestartSec={RESTART_SEC}
"""


@pytest.fixture(scope="module")
def node(dockerd: Dockerd) -> Iterator[Node]:
    missing = lifecycle.missing_tools()
    if missing:
        pytest.fail(f"missing tools: apt-get install {' '.join(missing)}", pytrace=False)
    try:
        pkgs = lifecycle.build_packages()
    except lifecycle.LifecycleError as e:
        pytest.fail(str(e), pytrace=False)
    secret = "wd-" + secrets.token_hex(12)
    master = Master(secret=secret, expected_version=pkgs.version,
                    expected_name=dockerd.hostname)
    master.start()
    try:
        with nspawn.boot("bookworm",
                         binds=[(dockerd.socket_path, "/var/run/docker.sock")]) as box:
            n = Node(name="bookworm", box=box, master=master, dockerd=dockerd, secret=secret)
            box.copy_in(pkgs.deb, "/tmp/dm-agent.deb", mode=0o644)
            n.run(["apt-get", "-q", "-y", "install", "/tmp/dm-agent.deb"], env=APT_ENV,
                  timeout=300)
            n.give_docker_socket()
            box.write(f"/etc/systemd/system/{UNIT}.d/watchdog-test.conf", DROP_IN)
            n.run(["systemctl", "daemon-reload"])
            n.configure(timeout=1)
            yield n
    finally:
        master.stop()
    master.assert_valid()


def test_the_shipped_unit_has_a_watchdog(node: Node) -> None:
    shipped = node.run(["cat", f"/usr/lib/systemd/system/{UNIT}"]).stdout
    assert "\nWatchdogSec=60\n" in shipped and "\nNotifyAccess=main\n" in shipped
    state = node.show("NotifyAccess", "Type", "DropInPaths")
    assert state == {"NotifyAccess": "main", "Type": "forking",
                     "DropInPaths": f"/etc/systemd/system/{UNIT}.d/watchdog-test.conf"}


def test_a_healthy_agent_is_never_killed(node: Node) -> None:
    mark = node.cursor()
    node.run(["systemctl", "start", UNIT])
    pid = node.main_pid()
    # (systemd shows the watchdog of a running unit only)
    assert node.show("WatchdogUSec") == {"WatchdogUSec": f"{WATCHDOG_SEC}s"}
    node.wait_registration(time.monotonic() - 5, timeout=30)
    started = time.monotonic()
    time.sleep(HEALTHY_FOR)
    state = node.show("ActiveState", "MainPID", "NRestarts")
    assert state == {"ActiveState": "active", "MainPID": str(pid), "NRestarts": "0"}, state
    said = "\n".join(node.messages(mark))
    assert "atchdog" not in said, said[-3000:]
    assert "reception only permitted" not in said, said[-3000:]  # NotifyAccess=main
    # and it kept registering every second meanwhile
    assert len(node.wait_registration(started, count=int(HEALTHY_FOR * 0.8))) > 0


def test_a_stopped_agent_is_killed_and_restarted(node: Node) -> None:
    if node.show("ActiveState")["ActiveState"] != "active":
        node.run(["systemctl", "start", UNIT])
    mark = node.cursor()
    pid = node.main_pid()
    stopped = time.monotonic()
    node.run(["sh", "-c", 'kill -STOP "$1"', "sh", str(pid)])
    deadline = stopped + 4 * (WATCHDOG_SEC + RESTART_SEC)
    killed = None
    while True:
        state = node.show("ActiveState", "MainPID")
        if killed is None and state["MainPID"] != str(pid):
            killed = time.monotonic() - stopped
        if state["ActiveState"] == "active" and state["MainPID"] not in ("0", str(pid)):
            break
        assert time.monotonic() < deadline, f"not restarted: {state}\n" + \
            "\n".join(node.messages(mark))[-3000:]
        time.sleep(0.1)
    restarted = time.monotonic() - stopped
    node.wait_registration(time.monotonic(), timeout=15)
    registered = time.monotonic() - stopped
    said = "\n".join(node.messages(mark))
    assert "Watchdog timeout" in said, said[-3000:]
    assert node.show("NRestarts")["NRestarts"] == "1"
    path = os.environ.get("DM_WATCHDOG_NOTES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"killed_seconds": round(killed or 0, 2),
                                "restart_seconds": round(restarted, 2),
                                "registered_again_seconds": round(registered, 2)}) + "\n")
    print(f"SIGSTOP -> killed after {killed or 0:.2f} s, new MainPID active after "
          f"{restarted:.2f} s, registered again after "
          f"{registered:.2f} s (WatchdogSec={WATCHDOG_SEC}, RestartSec={RESTART_SEC})")
    # The watchdog expires at most WatchdogSec after the last ping (which was before the
    # stop), then RestartSec, then the start: the documented bound, with 2x margin.
    assert restarted <= 2 * (WATCHDOG_SEC + RESTART_SEC), restarted
