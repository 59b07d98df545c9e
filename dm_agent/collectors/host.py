"""Host collector: CPU load since the previous round, memory, disks, network, via psutil.

A filesystem that does not answer (a dead NFS server) must never stall a round: every
mount is probed (``stat`` + ``statvfs``) in its own short-lived thread with a shared
deadline. A mount whose probe is still stuck is not probed again until that thread
returns, so threads never pile up on the same mount, and it is reported stuck once.

In a container (the rule is in ``hostview``'s docstring), disks and network come from the
host's PID 1 and the host's root bind-mounted at ``/host``, or are left empty: never the
container's own overlay, bind mounts or network namespace (docs/design.md §7).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psutil

from .hostview import ContainerView, in_container

log = logging.getLogger("dm_agent.host")

def is_excluded(name: str, patterns: Sequence[str]) -> bool:
    """Whether the interface ``name`` matches one of ``net_exclude``'s patterns."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# Filesystem types that are not a host's storage (pseudo, memory, image or overlay).
PSEUDO_FS = frozenset((
    "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs", "devpts",
    "devtmpfs", "efivarfs", "fusectl", "hugetlbfs", "mqueue", "nsfs", "overlay", "overlayfs",
    "proc", "pstore", "ramfs", "rpc_pipefs", "securityfs", "selinuxfs", "squashfs", "sysfs",
    "tmpfs", "tracefs", "fuse.lxcfs", "fuse.gvfsd-fuse", "fuse.portal", "iso9660", "udf",
    "aufs", "shm", "nullfs", "devfs",
))


def _real_fs(fstype: str, mountpoint: str) -> bool:
    return fstype not in PSEUDO_FS and fstype not in ("none", "") and mountpoint.startswith("/")


class _Probe:
    """One in-flight stat+statvfs of a mount point, run in a daemon thread."""

    __slots__ = ("done", "error", "path", "result", "thread")

    def __init__(self, path: str, fn: Callable[[str], tuple[int, int, int, bool]]) -> None:
        self.path = path
        self.done = threading.Event()
        self.result: tuple[int, int, int, bool] | None = None
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True,
                                       name=f"statvfs {path}")
        self.thread.start()

    def _run(self, fn: Callable[[str], tuple[int, int, int, bool]]) -> None:
        try:
            self.result = fn(self.path)
        except OSError as exc:
            self.error = exc
        finally:
            self.done.set()


def stat_mount(path: str) -> tuple[int, int, int, bool]:
    """(st_dev, total bytes, used bytes, is_dir) of a mount point; may block on NFS."""
    st = os.stat(path)
    vfs = os.statvfs(path)
    total = vfs.f_blocks * vfs.f_frsize
    used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
    return st.st_dev, total, used, stat.S_ISDIR(st.st_mode)


class DiskProber:
    """Measures mount points within a deadline, never blocking on a stuck one."""

    def __init__(self, deadline: float = 1.0,
                 probe: Callable[[str], tuple[int, int, int, bool]] = stat_mount) -> None:
        self.deadline = deadline
        self._probe_fn = probe
        self._stuck: dict[str, _Probe] = {}

    @property
    def stuck(self) -> list[str]:
        return sorted(self._stuck)

    def measure(self, mounts: Iterable[str]) -> dict[str, tuple[int, int, int, bool]]:
        probes: list[_Probe] = []
        for path in mounts:
            old = self._stuck.get(path)
            if old is not None:
                if not old.done.is_set():
                    continue  # still stuck: one thread per mount, at most
                del self._stuck[path]
                log.warning("mount %s answers again", path)
            probes.append(_Probe(path, self._probe_fn))
        end = time.monotonic() + self.deadline
        results: dict[str, tuple[int, int, int, bool]] = {}
        for probe in probes:
            if probe.done.wait(max(0.0, end - time.monotonic())):
                if probe.result is not None:
                    results[probe.path] = probe.result
            else:
                self._stuck[probe.path] = probe
                log.warning("mount %s did not answer within %.1fs; skipping it until it does",
                            probe.path, self.deadline)
        return results


class HostCollector:
    """CPU, memory, disks and network counters of the host, as the payload wants them."""

    def __init__(self, net_exclude: Sequence[str] = ("lo", "veth*"),
                 disk_deadline: float = 1.0, ps: Any = psutil,
                 container: ContainerView | None = None) -> None:
        self.net_exclude = tuple(net_exclude)
        self.ps = ps
        if container is None and ps is psutil and in_container():
            container = ContainerView()
        self.container = container
        self.disks = DiskProber(disk_deadline)
        self._cpu_prev: tuple[float, float] | None = None
        self._cpu_prev_at = 0.0
        self._cpu_last = 0.0
        self._cpu_measured = False

    # -- CPU: busy share of all CPUs between two samples of /proc/stat
    def _cpu_sample(self) -> tuple[float, float]:
        t = self.ps.cpu_times()
        total = sum(t)
        # Linux counts guest time inside user time already.
        total -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
        idle = t.idle + getattr(t, "iowait", 0.0)
        return total - idle, total

    def prime(self) -> None:
        """Take the first CPU sample, so the first round measures a real interval."""
        self._cpu_prev = self._cpu_sample()
        self._cpu_prev_at = time.monotonic()

    def cpu_load(self, min_window: float = 0.25) -> float:
        """Percent of all CPUs busy since the previous call (the first call measures
        at least ``min_window`` seconds after priming, never an unprimed 0.0)."""
        if self._cpu_prev is None:
            self.prime()
        wait = self._cpu_prev_at + min_window - time.monotonic()
        if not self._cpu_measured and wait > 0:
            time.sleep(wait)
        busy, total = self._cpu_sample()
        assert self._cpu_prev is not None
        dbusy, dtotal = busy - self._cpu_prev[0], total - self._cpu_prev[1]
        if dtotal > 0:
            self._cpu_last = round(min(100.0, max(0.0, 100.0 * dbusy / dtotal)), 2)
            self._cpu_prev = (busy, total)
            self._cpu_prev_at = time.monotonic()
            self._cpu_measured = True
        return float(self._cpu_last)

    def memory(self) -> dict[str, int]:
        vm = self.ps.virtual_memory()
        return {"total": int(vm.total), "available": int(vm.available), "used": int(vm.used)}

    def _candidates(self) -> dict[str, tuple[str, int | None]]:
        """Mount point -> (path to measure, the st_dev expected there, None: any)."""
        if self.container is not None:
            return {m.mountpoint: (path, m.dev) for m, path in self.container.mounts()
                    if _real_fs(m.fstype, m.mountpoint)}
        return {part.mountpoint: (part.mountpoint, None)
                for part in self.ps.disk_partitions(all=True)
                if _real_fs(part.fstype, part.mountpoint)}

    def disk_usage(self) -> dict[str, dict[str, int]]:
        """One entry per filesystem, as df shows it: real filesystems, no file binds,
        and where one filesystem is mounted several times the shortest mount point."""
        candidates = self._candidates()
        measured = self.disks.measure(dict.fromkeys(path for path, _ in candidates.values()))
        best: dict[int, tuple[str, int, int]] = {}
        for mountpoint, (path, want) in candidates.items():
            if path not in measured:
                continue
            dev, total, used, is_dir = measured[path]
            if want is not None and dev != want:
                assert self.container is not None
                self.container.hidden(mountpoint)
                continue
            if not is_dir or total <= 0:
                continue  # a bind-mounted file (docker.sock) or an empty pseudo fs
            kept = best.get(dev)
            if kept is None or (len(mountpoint), mountpoint) < (len(kept[0]), kept[0]):
                best[dev] = (mountpoint, total, used)
        return {path: {"total": total, "used": used}
                for path, total, used in sorted(best.values())}

    def network(self) -> dict[str, dict[str, int]]:
        if self.container is not None:
            pairs = self.container.net()
        else:
            pairs = {name: (c.bytes_recv, c.bytes_sent) for name, c in
                     (self.ps.net_io_counters(pernic=True) or {}).items()}
        return {
            name: {"bytesIn": int(rx), "bytesOut": int(tx)}
            for name, (rx, tx) in sorted(pairs.items())
            if not is_excluded(name, self.net_exclude)
        }

    def collect(self) -> dict[str, Any]:
        """The payload's ``system`` object. Each part that fails is left empty, not raised."""
        system: dict[str, Any] = {"cpuLoad": 0.0, "memory": {}, "disks": {}, "net": {}}
        for key, fn in (("cpuLoad", self.cpu_load), ("memory", self.memory),
                        ("disks", self.disk_usage), ("net", self.network)):
            try:
                system[key] = fn()
            except Exception as exc:  # a failing source leaves a gap, not a crash
                log.warning("cannot read %s: %s", key, exc)
        return system
