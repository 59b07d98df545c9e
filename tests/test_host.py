"""Unit tests of the host collector: real psutil figures, disk filtering, stuck mounts."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import namedtuple

import pytest

from dm_agent.collectors.host import DiskProber, HostCollector

Part = namedtuple("Part", "device mountpoint fstype opts")


def test_real_figures_have_the_dto_types() -> None:
    host = HostCollector()
    system = host.collect()
    assert isinstance(system["cpuLoad"], float) and 0.0 <= system["cpuLoad"] <= 100.0
    assert all(isinstance(v, int) and v >= 0 for v in system["memory"].values())
    assert set(system["memory"]) == {"total", "available", "used"}
    assert "/" in system["disks"]
    for fig in system["disks"].values():
        assert set(fig) == {"total", "used"} and all(isinstance(v, int) for v in fig.values())
    assert "lo" not in system["net"]
    assert not any(name.startswith("veth") for name in system["net"])


def test_root_disk_equals_df() -> None:
    host = HostCollector()
    disks = host.disk_usage()
    usage = shutil.disk_usage("/")
    assert disks["/"]["total"] == usage.total
    assert abs(disks["/"]["used"] - usage.used) < 64 * 1024 * 1024  # moves while we look


def test_cpu_load_is_measured_not_a_zero_first_sample() -> None:
    host = HostCollector()
    host.prime()
    stop = time.monotonic() + 0.6

    def spin() -> None:
        while time.monotonic() < stop:
            pass

    worker = threading.Thread(target=spin)
    worker.start()
    worker.join()
    load = host.cpu_load()
    assert load > 100.0 / (2 * os.cpu_count()), load  # one busy core of N shows


class FakePs:
    def __init__(self, parts: list[Part]) -> None:
        self.parts = parts

    def disk_partitions(self, all: bool = False) -> list[Part]:
        return self.parts


def test_disks_real_filesystems_once_shortest_mountpoint() -> None:
    parts = [
        Part("/dev/vda1", "/", "ext4", "rw"),
        Part("/dev/vda1", "/var/tmp", "ext4", "rw"),  # PrivateTmp= bind of the same fs
        Part("/dev/vda1", "/run/docker.sock", "ext4", "rw"),  # a bind-mounted file
        Part("tmpfs", "/run", "tmpfs", "rw"),
        Part("overlay", "/var/lib/docker/overlay2/x/merged", "overlay", "rw"),
        Part("/dev/loop0", "/snap/core/1", "squashfs", "ro"),
        Part("proc", "/proc", "proc", "rw"),
        Part("srv:/export", "/mnt/nfs", "nfs4", "rw"),
        Part("/dev/vdb", "/data", "xfs", "rw"),
    ]
    stats = {
        "/": (1, 1000, 400, True), "/var/tmp": (1, 1000, 400, True),
        "/run/docker.sock": (1, 1000, 400, False), "/mnt/nfs": (7, 5000, 10, True),
        "/data": (2, 2000, 0, True),
    }
    seen: list[str] = []

    def probe(path: str) -> tuple[int, int, int, bool]:
        seen.append(path)
        return stats[path]

    host = HostCollector(ps=FakePs(parts))
    host.disks = DiskProber(0.5, probe)
    assert host.disk_usage() == {
        "/": {"total": 1000, "used": 400},
        "/data": {"total": 2000, "used": 0},
        "/mnt/nfs": {"total": 5000, "used": 10},
    }
    assert "/run" not in seen and "/proc" not in seen  # pseudo filesystems are not probed


def test_stuck_mount_is_skipped_reported_once_and_never_piles_up(
        caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    calls: dict[str, int] = {}

    def probe(path: str) -> tuple[int, int, int, bool]:
        calls[path] = calls.get(path, 0) + 1
        if path == "/mnt/dead":
            release.wait(30)
        return (hash(path) & 0xFFFF, 100, 1, True)

    prober = DiskProber(0.2, probe)
    caplog.set_level(logging.WARNING, "dm_agent.host")
    try:
        for _ in range(5):
            start = time.monotonic()
            got = prober.measure(["/", "/mnt/dead"])
            # the round keeps its schedule: the 0.2 s deadline, with 5× margin
            assert time.monotonic() - start < 1.0
            assert "/" in got and "/mnt/dead" not in got
        assert calls["/mnt/dead"] == 1  # one thread on the stuck mount, not five
        assert prober.stuck == ["/mnt/dead"]
        stuck_lines = [r for r in caplog.records if "did not answer" in r.getMessage()]
        assert len(stuck_lines) == 1
    finally:
        release.set()
    # the released probe's thread returns; the next measure after that probes it again
    deadline = time.monotonic() + 10
    while "/mnt/dead" not in (got := prober.measure(["/", "/mnt/dead"])):
        assert time.monotonic() < deadline, "the released mount is never measured again"
    assert prober.stuck == [] and calls["/mnt/dead"] == 2
    assert any("answers again" in r.getMessage() for r in caplog.records)
