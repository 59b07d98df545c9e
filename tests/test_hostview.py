"""The host collector inside a container (dm_agent/collectors/hostview.py): parsing real
``mountinfo`` and ``net/dev`` texts, the "in a container" rule, and which host mounts
are measured under the host root. The end-to-end (the image with and without
``--pid=host -v /:/host:ro``) is tests/test_image.py's."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from dm_agent.collectors.host import HostCollector
from dm_agent.collectors.hostview import (
    ContainerView,
    in_container,
    parse_mountinfo,
    parse_net_dev,
)

# /proc/self/mountinfo of a busybox container of Docker 20.10 on this kind of machine
# (-v /run/docker.sock, -v "/tmp:/data/with space"), cut to the kinds of line it has, and
# a malformed line last; /proc/net/dev of this machine.
DATA = Path(__file__).parent / "data"
CONTAINER_MOUNTINFO = (DATA / "container.mountinfo").read_text()
NET_DEV = (DATA / "net.dev").read_text()


def test_mountinfo_fields_binds_and_escapes() -> None:
    mounts = parse_mountinfo(CONTAINER_MOUNTINFO)
    assert len(mounts) == 10  # the malformed line is skipped
    by_point = {m.mountpoint: m for m in mounts}
    assert by_point["/"].fstype == "overlay"
    assert by_point["/data/with space"].root == "/tmp"
    assert by_point["/data/with space"].dev == os.makedev(254, 0)
    assert by_point["/etc/hosts"].root.endswith("/hosts")
    assert by_point["/run/docker.sock"].source == "/dev/vda"


def test_net_dev_counters() -> None:
    assert parse_net_dev(NET_DEV) == {"lo": (43668932915, 43668932915), "ifb0": (0, 0),
                                      "eth0": (2130961065, 5212197)}
    assert parse_net_dev("") == {}


def test_in_container_rule() -> None:
    assert in_container({"container": "podman"}, lambda p: False) == \
        "container=podman in the environment"
    assert in_container({}, lambda p: p == "/run/.containerenv") == "/run/.containerenv exists"
    # Docker's /.dockerenv alone is not taken (hostview's docstring says why)
    assert in_container({}, lambda p: p == "/.dockerenv") is None


def fake_proc(tmp: Path, self_text: str, pid1_text: str, net: str = NET_DEV) -> Path:
    proc = tmp / "proc"
    for pid, text in (("self", self_text), ("1", pid1_text)):
        (proc / pid / "net").mkdir(parents=True)
        (proc / pid / "mountinfo").write_text(text)
        (proc / pid / "net" / "dev").write_text(net)
    return proc


def test_without_the_hosts_pid1_nothing_is_reported_and_it_is_said_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    proc = fake_proc(tmp_path, CONTAINER_MOUNTINFO, CONTAINER_MOUNTINFO)
    host = HostCollector(container=ContainerView(str(proc), str(tmp_path / "host")))
    with caplog.at_level(logging.WARNING, "dm_agent.host"):
        for _ in range(2):
            assert host.disk_usage() == {}
            assert host.network() == {}
    assert [r.getMessage() for r in caplog.records] == [
        "running in a container without the host's PID 1: host disks and network are "
        "not reported (add --pid=host -v /:/host:ro to show them)"]


def test_pid1_without_the_host_root_gives_the_network_not_the_disks(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    host_mounts = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
    proc = fake_proc(tmp_path, CONTAINER_MOUNTINFO, host_mounts)
    host = HostCollector(container=ContainerView(str(proc), "/host"))
    with caplog.at_level(logging.WARNING, "dm_agent.host"):
        assert host.disk_usage() == {}
    assert set(host.network()) == {"ifb0", "eth0"}  # lo excluded, as on the host
    assert "add -v /:/host:ro to show them" in caplog.text


def test_host_mounts_are_measured_under_the_host_root_when_their_device_is_there(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "host"
    (root / "late").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "hosts").write_text("")
    dev = os.stat(root).st_dev
    ours = CONTAINER_MOUNTINFO + f"130 81 254:0 / {root} ro,relatime - ext4 /dev/vda ro\n"
    pid1 = (f"27 1 {os.major(dev)}:{os.minor(dev)} / / rw,relatime - ext4 /dev/vda rw\n"
            # mounted after the container started, not under the host root (no rslave)
            "40 27 259:7 / /late rw,relatime - xfs /dev/vdb rw\n"
            "41 27 0:50 / /run rw,relatime - tmpfs tmpfs rw\n"
            f"42 27 {os.major(dev)}:{os.minor(dev)} /x /etc/hosts rw - ext4 /dev/vda rw\n")
    proc = fake_proc(tmp_path, ours, pid1)
    host = HostCollector(container=ContainerView(str(proc), str(root)))
    with caplog.at_level(logging.WARNING, "dm_agent.host"):
        disks = host.disk_usage()
    # What is stable of a live filesystem: which mounts, and the size of the one under
    # the host root (another filesystem would have another). Its used bytes move with
    # whatever else writes to the disk meanwhile, so they are only bounded.
    vfs = os.statvfs(root)
    assert set(disks) == {"/"}
    assert disks["/"]["total"] == vfs.f_blocks * vfs.f_frsize
    assert 0 < disks["/"]["used"] <= disks["/"]["total"]
    assert f"host mount /late is not visible under {root}" in caplog.text
    assert "rslave" in caplog.text
