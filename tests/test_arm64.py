"""The arm64 build under a real arm64 userland and systemd, through qemu-user (binfmt_misc).

What is proven here is the package, not the speed: every arm64 program runs emulated
(tests/support/binfmt.py), about ten times slower than natively, so the steps are the
ones that prove the arm64 artifacts and no more; tests/test_lifecycle.py covers the
rest of the service's lifecycle on amd64, from the same sources.

1. The frozen arm64 program from ``dist/dm-agent-<v>-linux-aarch64.tar.gz``, every ELF
   file of it aarch64, in a bare Debian 11 arm64 root without Python
   (``bullseye-arm64-bare``): ``--version``, and ``--once --dry-run`` against the
   session's real dockerd, its socket bound in, printing that node's containers.
2. A booted Debian 12 arm64 root (``bookworm-arm64``; degraded by the units qemu-user
   cannot start, ``nspawn.QEMU_USER_FAILURES``, and by nothing else), driven through the
   lifecycle's core from the signed two-architecture repository ``dist/repo``: install
   unconfigured (the postinst's sysusers call makes the user; the start is skipped with one
   journal line), configure and start (registrations reach the strict master on the
   host), reload, reboot (the unit starts at boot and registers: the node's time from
   start to first registration), stop, purge.

The artifacts are the tree's own ``dist/`` (``make repo`` builds both architectures
before ``make test``); they are copied away first, so a rebuild cannot swap them mid-test.
``DM_LIFECYCLE_NOTES=path`` appends what the booted node measured (JSON lines).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import lifecycle, nspawn, roots
from support.dockerd import Dockerd, populate
from support.elf import EM_AARCH64, elf_machine
from support.lifecycle import INI, PIDFILE, UNIT, Node
from support.master import Master
from test_lifecycle import SKIP_LINE, install_deb

pytestmark = pytest.mark.system

BARE = "bullseye-arm64-bare"
BOOTED = "bookworm-arm64"
DIST = lifecycle.REPO / "dist"
NODE_NAME = "dm-arm64-node"
DOCKER_LABELS = {"zone": "arm64", "dm.query": "a=b=c"}
#: emulated: a boot, an apt-get install or a start takes several times its amd64 time
BOOT_TIMEOUT = 600.0
SLOW = 300.0


@pytest.fixture(scope="module")
def arm64() -> Iterator[lifecycle.Packages]:
    """A private copy of the arm64 artifacts in dist/ (and the repository serving both)."""
    ver = lifecycle.version()
    wanted = [DIST / f"dm-agent-{ver}-linux-aarch64.tar.gz", DIST / f"dm-agent_{ver}_arm64.deb",
              DIST / "repo/apt/dists/stable/main/binary-arm64/Packages",
              DIST / f"repo/yum/aarch64/dm-agent-{ver}-1.aarch64.rpm"]
    missing = [str(p.relative_to(lifecycle.REPO)) for p in wanted if not p.exists()]
    if missing:
        pytest.fail(f"not built: {', '.join(missing)}: run `make repo` first", pytrace=False)
    snap = Path(tempfile.mkdtemp(prefix="dm-arm64-pkgs."))
    try:
        shutil.copytree(DIST / "repo", snap / "repo", symlinks=True)
        for path in wanted[:2]:
            shutil.copy2(path, snap / path.name)
        yield lifecycle.Packages(
            version=ver, deb=snap / wanted[1].name,
            rpm=snap / "repo/yum/aarch64" / wanted[3].name, repo=snap / "repo",
            keyring=snap / "repo/dm-agent-archive-keyring.gpg",
            keyring_asc=snap / "repo/dm-agent-archive-keyring.asc")
    finally:
        shutil.rmtree(snap, ignore_errors=True)


# --- 1. the frozen program in the bare arm64 root -------------------------------------------


@pytest.fixture(scope="module")
def onedir(arm64: lifecycle.Packages) -> Iterator[Path]:
    """The tarball's onedir, unpacked (its single top directory holds ``dm-agent``)."""
    tarball = next(arm64.deb.parent.glob("dm-agent-*-linux-aarch64.tar.gz"))
    with tempfile.TemporaryDirectory(prefix="dm-arm64-onedir.") as tmp:
        subprocess.run(["tar", "-C", tmp, "-xzf", str(tarball)], check=True)
        (program,) = [p for p in Path(tmp).glob("*/dm-agent") if p.is_file()]
        yield program.parent


def test_onedir_is_aarch64_only(onedir: Path) -> None:
    machines = {p.relative_to(onedir): elf_machine(p) for p in onedir.rglob("*")
                if p.is_file() and not p.is_symlink()}
    elves = {p: m for p, m in machines.items() if m is not None}
    assert Path("dm-agent") in elves and len(elves) > 10, sorted(machines)
    assert {p: m for p, m in elves.items() if m != EM_AARCH64} == {}


def test_frozen_arm64_in_the_bare_root(onedir: Path, dockerd: Dockerd) -> None:
    """--version and --once --dry-run, emulated, against the real dockerd."""
    with roots.use(BARE) as cached, roots.throwaway(cached) as root:
        assert (root / "etc/debian_version").read_text().startswith("11.")
        assert not list((root / "usr/bin").glob("python*"))
        assert elf_machine(root / "usr/bin/env") == EM_AARCH64
        binds = {onedir: "/opt/dm-agent", dockerd.socket_path: "/run/docker.sock"}
        version = roots.chroot_run(root, ["/opt/dm-agent/dm-agent", "--version"],
                                   binds=binds, timeout=SLOW)
        assert version.returncode == 0, version.stderr
        assert version.stdout.strip() == f"dm-agent {lifecycle.version()}"
        once = roots.chroot_run(root, ["/opt/dm-agent/dm-agent", "--once", "--dry-run",
                                       "-d", "unix:///run/docker.sock"],
                                binds=binds, timeout=SLOW)
    assert once.returncode == 0, once.stderr
    body = json.loads(once.stdout)
    assert body["name"] == dockerd.api("/info")["Name"]
    sent = sorted(body["containers"], key=lambda c: c["id"])
    assert sent == lifecycle.docker_containers(dockerd) and sent, once.stdout[:2000]


# --- 2. the booted arm64 root -----------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    """The booted arm64 root (it needs no artifact: test_boot proves the root itself)."""
    if os.geteuid() != 0:
        pytest.fail("the arm64 tests need root (dockerd, systemd-nspawn)", pytrace=False)
    secret = "s3cr3t-" + secrets.token_hex(12)
    master = Master(secret=secret, expected_version=lifecycle.version(), expected_name=NODE_NAME)
    engine = Dockerd(labels=DOCKER_LABELS, hostname=NODE_NAME)
    try:
        engine.start()
        populate(engine)
        master.start()
        binds = [(engine.socket_path, "/var/run/docker.sock")]
        with nspawn.boot(BOOTED, binds=binds, boot_timeout=BOOT_TIMEOUT) as box:
            n = Node(name=BOOTED, box=box, master=master, dockerd=engine, secret=secret)
            n.notes["boot_seconds"] = round(box.boot_seconds or 0, 1)
            try:
                yield n
            finally:
                _save_notes(n)
        master.assert_valid()
    finally:
        master.stop()
        engine.close()


def _save_notes(n: Node) -> None:
    print(f"\narm64 node: {json.dumps(n.notes)}")
    path = os.environ.get("DM_LIFECYCLE_NOTES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"node": n.name, "passed": sorted(n.passed), **n.notes}) + "\n")


def test_boot(node: Node) -> None:
    """The arm64 userland boots, degraded only by what qemu-user cannot start."""
    with node.step("boot"):
        assert node.run(["uname", "-m"]).stdout.strip() == "aarch64"
        assert node.run(["dpkg", "--print-architecture"]).stdout.strip() == "arm64"
        failed = node.box.failed_units()
        assert failed.items() <= nspawn.QEMU_USER_FAILURES.items(), failed
        node.notes["failed_at_boot"] = sorted(failed)
        for unit in ("multi-user.target", "systemd-journald.service", "dbus.socket"):
            assert node.box.is_active(unit) == "active", unit
        assert node.has_python() == []


def test_install_unconfigured(node: Node, arm64: lifecycle.Packages) -> None:
    """Installed from the signed repository: the user made in spite of the failed
    systemd-sysusers.service, enabled, the start skipped with one journal line."""
    with node.step("install", needs=["boot"]):
        install_deb(node, arm64, arch="arm64")
        assert node.has_python() == [], "installing dm-agent brought Python"
        status = node.run(["dpkg-query", "-W", "-f", "${Architecture}", "dm-agent"]).stdout
        assert status == "arm64"
        assert node.run(["getent", "passwd", "dm-agent"]).stdout.startswith("dm-agent:")
        assert node.stat(INI) == "640 root:dm-agent"
        assert node.run(["systemctl", "is-enabled", UNIT]).stdout.strip() == "enabled"
        state = node.show("ActiveState", "Result", "NRestarts")
        assert state == {"ActiveState": "inactive", "Result": state["Result"],
                         "NRestarts": "0"} and state["Result"] in ("success",
                                                                   "exec-condition"), state
        lines = node.agent_lines()
        assert len(lines) == 1 and re.search(SKIP_LINE, lines[0]), lines


def test_configured_start(node: Node) -> None:
    """Configured and started: registrations with Docker's own list reach the master."""
    with node.step("configured", needs=["install"]):
        node.give_docker_socket()
        node.configure(timeout=1)
        since = time.monotonic()
        node.run(["systemctl", "start", UNIT], timeout=SLOW)
        state = node.show("ActiveState", "SubState", "MainPID")
        assert state["ActiveState"] == "active" and state["SubState"] == "running", state
        assert node.run(["cat", PIDFILE]).stdout.strip() == state["MainPID"]
        pid = state["MainPID"]
        assert node.run(["stat", "-c", "%U", f"/proc/{pid}"]).stdout.strip() == "dm-agent"
        reg = node.wait_registration(since, ttl=2, timeout=SLOW)[0]
        node.notes["start_to_first_registration_seconds"] = round(reg.time - since, 1)
        assert reg.node_name == NODE_NAME and reg.auth_ok is True
        body: dict[str, Any] = reg.json
        assert sorted(body["containers"], key=lambda c: c["id"]) == \
            lifecycle.docker_containers(node.dockerd)
        assert body["labels"] == DOCKER_LABELS
        assert node.agent_lines(priority="err") == []


def test_reload(node: Node) -> None:
    """A new interval applies on reload (ttl = 2 × timeout), same process."""
    with node.step("reload", needs=["configured"]):
        node.reload_interval(2, timeout=SLOW)


def test_reboot(node: Node) -> None:
    """Powered off and booted again, configured: the unit starts at boot and registers.
    The time from the container's start to that first registration is the node's."""
    with node.step("reboot", needs=["configured"]):
        node.box.stop()
        since = time.monotonic()
        node.box.start()
        reg = node.wait_registration(since, ttl=4, timeout=SLOW)[0]
        node.notes["reboot_seconds"] = round(node.box.boot_seconds or 0, 1)
        node.notes["boot_to_first_registration_seconds"] = round(reg.time - since, 1)
        assert node.box.is_active(UNIT) == "active"
        assert node.run(["cat", PIDFILE]).stdout.strip() == str(node.main_pid())


def test_stop(node: Node) -> None:
    """Stopped by SIGTERM alone (no SIGKILL after TimeoutStopSec), nothing left of it,
    and no registration after it."""
    with node.step("stop", needs=["configured"]):
        pid = node.main_pid()
        mark = node.cursor()
        started = time.monotonic()
        node.run(["systemctl", "stop", UNIT], timeout=SLOW)
        stopped = time.monotonic()
        node.notes["stop_seconds"] = round(stopped - started, 1)
        assert node.show("ActiveState", "Result", "MainPID") == {
            "ActiveState": "inactive", "Result": "success", "MainPID": "0"}
        assert not node.exists("/run/dm-agent") and not node.exists(f"/proc/{pid}")
        assert not [m for m in node.messages(mark) if "SIGKILL" in m or "Killing" in m]
        time.sleep(5)  # longer than two intervals (timeout = 2)
        assert node.registrations_since(stopped) == []


def test_purge(node: Node) -> None:
    """Purged: the package and its configuration gone, the system user kept."""
    with node.step("purge", needs=["install"]):
        node.apt("purge", "dm-agent", timeout=SLOW)
        out = node.run(["dpkg-query", "-W", "-f", "${Status}", "dm-agent"], check=False)
        assert out.returncode != 0 or "not-installed" in out.stdout, out.stdout
        for path in (INI, "/usr/bin/dm-agent", "/usr/lib/dm-agent"):
            assert not node.exists(path), path
        assert node.run(["getent", "passwd", "dm-agent"], check=False).returncode == 0

