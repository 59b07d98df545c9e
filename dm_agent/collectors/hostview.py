"""Where the host collector reads disks and network from when the agent runs in a
container (docs/design.md §7).

Inside a container, psutil's sources are the container's own: the mounts are
``/proc/self/mounts`` (the image's overlay, the bind-mounted ``/run/docker.sock``,
``/etc/hosts``, ``/etc/resolv.conf``, ``/etc/hostname``) and the network counters are
``/proc/self/net/dev`` (the container's network namespace). The host's own figures are
reachable only through what the operator shares:

- ``--pid=host``: the host's PID 1 is ``/proc/1``, so its mount table is
  ``/proc/1/mountinfo`` and its network counters are ``/proc/1/net/dev``;
- ``-v /:/host:ro`` (``,rslave`` where the host's ``/`` is a shared mount): the host's
  filesystems are under ``/host``, so each host mount point is measured (``statvfs``) at
  ``/host`` + the mount point, and only when the device found there is the one the mount
  table names (a mount made after the container started, without ``rslave``, is not
  there: the directory below it would be measured instead).

**The rule for "in a container":** the agent's own environment has ``container`` set (the
Container Interface convention: Podman, LXC and systemd-nspawn set it for the process they
start, and the dm-agent image sets ``container=oci`` because Docker does not), or
``/run/.containerenv`` exists (Podman's marker). ``/.dockerenv`` alone is not taken: Docker
creates it in every container, including build and CI machines that are themselves the
host an operator runs the agent on, where the agent's own mount table *is* the host's; an
agent started by a service manager (systemd) never inherits ``container`` from it.

**The host's view** is taken when the host's PID 1 is visible: ``/proc/1/mountinfo``
differs from ``/proc/self/mountinfo`` (PID 1 lives in another mount namespace, which is
what ``--pid=host`` gives; without it PID 1 is the agent or the container's init). Then
the network counters are PID 1's, and the disks are PID 1's mounts measured under
``/host`` when ``/host`` is a mount point. Whatever is not visible is reported empty,
never replaced by the container's own mounts or interfaces, and logged once at WARNING
with the flag that shows it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger("dm_agent.host")

HOST_ROOT = "/host"
_NO_PID1 = ("running in a container without the host's PID 1: host disks and network "
            "are not reported (add --pid=host -v /:/host:ro to show them)")
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of a ``mountinfo`` file (proc(5)); paths unescaped."""

    dev: int  # os.makedev(major, minor): the st_dev of files on this filesystem
    root: str  # the part of the filesystem mounted here ("/" unless a bind of a subtree)
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in paths as ``\\ooo``."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a ``/proc/PID/mountinfo`` text; malformed lines are skipped."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            major, minor = (int(n) for n in fields[2].split(":"))
            mounts.append(Mount(dev=os.makedev(major, minor), root=_unescape(fields[3]),
                                mountpoint=_unescape(fields[4]), fstype=fields[sep + 1],
                                source=_unescape(fields[sep + 2])))
        except (ValueError, IndexError):
            continue
    return mounts


def parse_net_dev(text: str) -> dict[str, tuple[int, int]]:
    """(bytes received, bytes sent) per interface of a ``/proc/PID/net/dev`` text."""
    counters: dict[str, tuple[int, int]] = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        nums = rest.split()
        if not sep or len(nums) < 9:
            continue
        try:
            counters[name.strip()] = (int(nums[0]), int(nums[8]))
        except ValueError:
            continue
    return counters


def in_container(environ: Mapping[str, str] = os.environ,
                 exists: Callable[[str], bool] = os.path.exists) -> str | None:
    """Why the agent is in a container (the module's rule), or None when it is not."""
    if environ.get("container"):
        return f"container={environ['container']} in the environment"
    if exists("/run/.containerenv"):
        return "/run/.containerenv exists"
    return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


class ContainerView:
    """The host's mounts and network as seen from inside a container, or what is missing."""

    def __init__(self, proc: str = "/proc", host_root: str = HOST_ROOT) -> None:
        self.proc = proc
        self.host_root = host_root
        self._warned: set[str] = set()

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def _host_mountinfo(self) -> str | None:
        """PID 1's mount table when PID 1 is the host's (``--pid=host``), else None."""
        theirs = _read(f"{self.proc}/1/mountinfo")
        ours = _read(f"{self.proc}/self/mountinfo")
        if theirs is None or ours is None or theirs == ours:
            return None
        return theirs

    def _host_root_mounted(self) -> bool:
        ours = parse_mountinfo(_read(f"{self.proc}/self/mountinfo") or "")
        return any(m.mountpoint == self.host_root for m in ours)

    def mounts(self) -> list[tuple[Mount, str]]:
        """Every host mount with the path that measures it here (under the host root),
        or [] (logged once) when the host's mounts cannot be seen."""
        text = self._host_mountinfo()
        if text is None:
            self._warn_once("pid1", _NO_PID1)
            return []
        if not self._host_root_mounted():
            self._warn_once("root", "running in a container without the host's / at %s: "
                            "host disks are not reported (add -v /:%s:ro to show them)",
                            self.host_root, self.host_root)
            return []
        return [(m, self.host_root + m.mountpoint.rstrip("/"))
                for m in parse_mountinfo(text) if m.mountpoint.startswith("/")]

    def hidden(self, mountpoint: str) -> None:
        """A host mount whose filesystem is not under the host root (mounted later)."""
        self._warn_once(f"hidden {mountpoint}",
                        "host mount %s is not visible under %s (mounted after the "
                        "container started; -v /:%s:ro,rslave shows such mounts where "
                        "the host's / is a shared mount)", mountpoint, self.host_root,
                        self.host_root)

    def net(self) -> dict[str, tuple[int, int]]:
        """PID 1's network counters, or {} (logged once) when PID 1 is not the host's."""
        if self._host_mountinfo() is None:
            self._warn_once("pid1", _NO_PID1)
            return {}
        return parse_net_dev(_read(f"{self.proc}/1/net/dev") or "")
