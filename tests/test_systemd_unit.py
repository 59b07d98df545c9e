"""The shipped unit (systemd/) under a real, booted systemd, with the real frozen program.

Each Debian release's root (tests/support/roots.py) is booted under systemd-nspawn, gets
the frozen program installed as the packages install it (/usr/lib/dm-agent/ and the
/usr/bin/dm-agent symlink), the unit and the sysusers snippet, and then:

- ``systemd-analyze verify`` is clean and ``systemd-analyze security`` rates it <= 2.0;
- an unreadable config skips the start (one journal line, no failure, no restart);
- configured, the sandboxed agent reaches a real dockerd through the docker group and a
  test master on 127.0.0.1, reports the disks ``df`` shows (a real filesystem on /home
  included, which ProtectHome=yes would have hidden), and stops on ``systemctl stop``
  without being killed. (``systemctl reload`` is test_lifecycle.py's step 5, on the
  installed package: once is enough.)

Needs root, systemd-container and debootstrap; the frozen program comes from
``make frozen`` (or ``$DM_FROZEN_DIR``): without it these tests fail, they do not skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import nspawn, roots
from support.dockerd import Dockerd
from support.frozen import FROZEN, require_frozen
from support.hostnet import first_real_ipv4
from support.master import Master

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[1]
UNIT = "dm-agent.service"
UNIT_PATH = f"/usr/lib/systemd/system/{UNIT}"
SYSUSERS_PATH = "/usr/lib/sysusers.d/dm-agent.conf"
INI = "/etc/dm-agent.ini"
MAX_EXPOSURE = 2.0


def install(box: nspawn.BootedRoot) -> None:
    """Install what the packages install: program, symlink, unit, sysusers, default ini."""
    box.copy_in(FROZEN, "/usr/lib/dm-agent")
    box.run(["ln", "-sfn", "/usr/lib/dm-agent/dm-agent", "/usr/bin/dm-agent"])
    box.copy_in(REPO / "systemd/dm-agent.service", UNIT_PATH, mode=0o644)
    box.copy_in(REPO / "systemd/dm-agent.sysusers", SYSUSERS_PATH, mode=0o644)
    box.run(["systemd-sysusers"])
    box.run(["systemctl", "daemon-reload"])
    write_ini(box, (REPO / "dm_agent/data/dm-agent.ini").read_text())


def write_ini(box: nspawn.BootedRoot, text: str, mode: int = 0o640) -> None:
    box.write(INI, text, mode=mode)
    box.run(["chgrp", "dm-agent", INI])


def reset(box: nspawn.BootedRoot) -> str | None:
    """Stop the unit and forget its failures; return the journal cursor to read from."""
    box.run(["systemctl", "stop", UNIT], check=False)
    box.run(["systemctl", "reset-failed", UNIT], check=False)
    return box.cursor()


def show(box: nspawn.BootedRoot, *props: str) -> dict[str, str]:
    out = box.run(["systemctl", "show", UNIT, *(f"--property={p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def agent_lines(box: nspawn.BootedRoot, after: str | None) -> list[str]:
    """What the agent's own processes wrote to the journal (not systemd's lines)."""
    out = box.journal(UNIT, output="json", after=after)
    entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [e["MESSAGE"] for e in entries if e.get("_PID") != "1" and "MESSAGE" in e]


@pytest.fixture(scope="module")
def real_fs() -> Iterator[Path]:
    """Host directories bound at /home and /srv/data: real filesystems in the container."""
    base = Path(tempfile.mkdtemp(prefix="dm-realfs.", dir="/var/tmp"))
    (base / "home").mkdir()
    (base / "data").mkdir()
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", params=roots.RELEASES)
def box(
    request: pytest.FixtureRequest, dockerd: Dockerd, real_fs: Path
) -> Iterator[nspawn.BootedRoot]:
    require_frozen()
    binds = [
        (dockerd.socket_path, "/var/run/docker.sock"),
        (real_fs / "home", "/home"),
        (real_fs / "data", "/srv/data"),
    ]
    with nspawn.boot(request.param, binds=binds) as booted:
        install(booted)
        # The socket belongs to the host's docker group; the container's must own it here.
        gid = int(booted.run(["getent", "group", "docker"]).stdout.split(":")[2])
        before = os.stat(dockerd.socket_path)
        os.chown(dockerd.socket_path, -1, gid)
        os.chmod(dockerd.socket_path, 0o660)
        try:
            yield booted
        finally:  # that GID may be another group on the host
            with contextlib.suppress(OSError):
                os.chown(dockerd.socket_path, -1, before.st_gid)
                os.chmod(dockerd.socket_path, before.st_mode & 0o7777)


def test_frozen_program_is_built() -> None:
    """The unit runs the frozen program: these tests fail, not skip, without it."""
    require_frozen()


def test_unit_verifies_clean(box: nspawn.BootedRoot) -> None:
    # --man=no: the roots have no man-db to look up Documentation=man:dm-agent(8); the
    # page itself ships with the packages.
    result = box.run(["systemd-analyze", "verify", "--man=no", UNIT_PATH], check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == result.stderr.strip() == "", result.stderr


def test_exposure_is_at_most_2(box: nspawn.BootedRoot) -> None:
    out = box.run(["systemd-analyze", "security", "--no-pager", UNIT]).stdout
    match = re.search(rf"Overall exposure level for {re.escape(UNIT)}: (\d+\.\d+)", out)
    assert match, out
    assert float(match.group(1)) <= MAX_EXPOSURE, out


def test_sysusers_make_a_system_user_without_login(box: nspawn.BootedRoot) -> None:
    user = box.run(["getent", "passwd", "dm-agent"]).stdout.strip().split(":")
    assert int(user[2]) < 1000
    assert user[5] == "/nonexistent"
    assert user[6].endswith("/nologin")
    assert box.run(["getent", "group", "docker"]).returncode == 0


def test_unreadable_config_skips_the_start(box: nspawn.BootedRoot) -> None:
    """An ini the agent's group cannot read: skipped, one line, no failure, no restart.
    (Unconfigured and invalid are test_lifecycle.py's steps 2 and 6, on the package.)"""
    mark = reset(box)
    write_ini(box, "[main]\nmaster = 127.0.0.1:9\n", mode=0o600)
    started = box.run(["systemctl", "start", UNIT], check=False)
    assert started.returncode == 0, started.stderr  # skipped is not an error
    watch_until = time.monotonic() + nspawn.timespan(show(box, "RestartUSec")["RestartUSec"]) + 2
    while True:  # past RestartSec: a restart, were there one, would show by then
        state = show(box, "ActiveState", "Result", "NRestarts", "ConditionResult")
        assert state == {
            "ActiveState": "inactive", "Result": "success", "NRestarts": "0",
            "ConditionResult": "no",
        }
        if time.monotonic() > watch_until:
            break
        time.sleep(0.5)
    lines = agent_lines(box, mark)
    assert len(lines) == 1, lines  # the reason, once; not the settings dump
    assert "permission denied" in lines[0]
    assert "exec-condition" in box.journal(UNIT, after=mark)


def test_configured_agent_runs_sandboxed(
    box: nspawn.BootedRoot, master: Master, dockerd: Dockerd
) -> None:
    mark = reset(box)
    ini = f"[main]\nmaster = {master.address}\ntimeout = 2\njitter = no\nlog_level = 1\n"
    write_ini(box, ini)
    box.run(["systemctl", "start", UNIT])
    state = show(box, "ActiveState", "MainPID")
    assert state["ActiveState"] == "active"
    pid = state["MainPID"]
    assert box.read("/run/dm-agent/dm-agent.pid").strip() == pid
    assert box.run(["stat", "-c", "%U", f"/proc/{pid}"]).stdout.strip() == "dm-agent"

    registration = master.wait_for(1, timeout=30)[0]
    body = registration.json
    assert registration.node_name == dockerd.hostname  # Docker's /info, via the docker group
    assert body["system"]["memory"]["total"] > 0
    # The master is on loopback, so the address is the first real interface's (README),
    # found over netlink: RestrictAddressFamilies= must keep AF_NETLINK.
    assert body["address"] == first_real_ipv4()

    # The sandbox changes nothing in the disks it reports: the same mounts as the program
    # run outside it, with df's figures (a real /home included: ProtectHome=yes would
    # have put an empty tmpfs there).
    outside = json.loads(box.run(["dm-agent", "--once", "--dry-run", "-f", INI]).stdout)
    reported = body["system"]["disks"]
    assert set(reported) == set(outside["system"]["disks"])
    assert "/home" in reported
    for path, disk in reported.items():
        df = box.run(["df", "-B1", "--output=size,used", path]).stdout.split()
        size, used = int(df[-2]), int(df[-1])
        assert disk["total"] == size, path
        assert abs(disk["used"] - used) <= size // 100, path  # the host's disk is busy

    assert show(box, "ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": pid}
    assert box.journal(UNIT, priority="err", after=mark).strip() == ""

    started = time.monotonic()
    box.run(["systemctl", "stop", UNIT])
    assert time.monotonic() - started < 5
    assert show(box, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
    journal = box.journal(UNIT, after=mark)
    assert "SIGKILL" not in journal, journal
    assert box.run(["test", "-e", "/run/dm-agent"], check=False).returncode != 0


# -- the harness itself: a leftover container, cgroup or mount would break later runs ------


def leftovers(machine: str, tree: Path) -> list[str]:
    found = []
    for proc in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"--machine={machine}".encode() in proc.read_bytes():
                found.append(f"process {proc.parent.name}")
        except OSError:
            pass
    cgroups = [c / f"dm-nspawn.{machine}" for c in nspawn._cgroup_roots()]
    found += [f"cgroup {c}" for c in cgroups if c.exists()]
    if Path("/run/systemd/nspawn/propagate", machine).exists():
        found.append(f"nspawn propagation directory of {machine}")
    if str(tree) in Path("/proc/self/mountinfo").read_text():
        found.append(f"mount {tree}")
    if tree.parent.exists():
        found.append(f"directory {tree.parent}")
    return found


@pytest.mark.parametrize("copy", [False, True], ids=["overlay", "copy"])
def test_harness_powers_off_and_leaves_nothing(copy: bool) -> None:
    with nspawn.boot("bookworm", copy=copy) as booted:
        assert booted.run(["systemctl", "is-system-running"]).stdout.strip() == "running"
        # A system user can walk the tree (the root's / is 0755, not mkdtemp's 0700).
        assert booted.run(["runuser", "-u", "nobody", "--", "ls", "/etc/os-release"])
        machine, tree = booted.machine, booted.root
        assert booted.boot_seconds is not None and booted.boot_seconds < 30
    assert leftovers(machine, tree) == []


def test_harness_kills_a_container_that_does_not_answer() -> None:
    import signal

    with nspawn.boot("bookworm") as booted:
        machine, tree = booted.machine, booted.root
        assert booted.pid is not None
        os.kill(booted.pid, signal.SIGSTOP)  # its systemd cannot power off any more
        started = time.monotonic()
        booted.stop(timeout=2)
        assert time.monotonic() - started < 30
    assert leftovers(machine, tree) == []


def test_harness_cleans_up_a_boot_that_times_out() -> None:
    with pytest.raises(nspawn.BootError) as failure, nspawn.boot("bookworm", boot_timeout=0.05):
        pass
    assert "console" in str(failure.value)
    machine = re.search(r"container (\S+) on", str(failure.value))
    tree = re.search(r" on (\S+):", str(failure.value))
    assert machine and tree
    assert leftovers(machine.group(1), Path(tree.group(1))) == []
