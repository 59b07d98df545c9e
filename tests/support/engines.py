"""The Docker-compatible engines operators run, each a real server the tests start.

- ``docker-20.10``: the host's Debian 12 ``dockerd`` (``Dockerd`` as it is);
- ``docker-26``: Debian 13's ``dockerd``, run inside the cached ``trixie-engines`` root;
- ``podman-4.3``: the host's Debian 12 ``podman system service``;
- ``podman-5``: Debian 13's, inside the ``trixie-engines`` root.

An engine in the root runs there through ``chroot`` in a mount and UTS namespace of its
own (``unshare``): ``/proc``, ``/sys`` and ``/dev`` are bound in, and so is the engine's
temporary directory at the same path, so its socket, data and logs are where the host
expects them. The root itself is a throwaway overlay (``roots.throwaway``): the cache
stays pristine. Every engine has its own data root, run root, socket and cgroup parent,
and a host name of the test's choice, which becomes ``Name`` in ``/info``.

Podman runs as this sandbox allows (see ``Podman``). Both kinds are driven through the
Docker-compatible API with ``Dockerd.api``, so a test reads the same on every engine.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from . import roots
from .dockerd import Dockerd, DockerdError
from .image import IMAGE, ensure_image, rootfs_tarball

__all__ = ["ENGINES", "Podman", "RootDockerd", "engine"]

#: name -> (kind, root flavour or None for the host)
ENGINES: dict[str, tuple[str, str | None]] = {
    "docker-20.10": ("docker", None),
    "docker-26": ("docker", "trixie-engines"),
    "podman-4.3": ("podman", None),
    "podman-5": ("podman", "trixie-engines"),
}

# $1 host name, $2 root, $3 the engine's directory; then the engine's command line.
# unshare, sh and chroot all exec, so the PID the test holds is the engine's own.
_IN_ROOT = (
    'h=$1 r=$2 b=$3; shift 3; printf %s "$h" > /proc/sys/kernel/hostname'
    ' && for d in proc sys dev; do mount --rbind "/$d" "$r/$d"; done'
    ' && mkdir -p "$r$b" && mount --bind "$b" "$r$b" && exec chroot "$r" "$@"'
)


def _wrap(args: list[str], hostname: str, root: Path | None, base: Path) -> list[str]:
    if root is None:
        script = 'printf %s "$1" > /proc/sys/kernel/hostname && shift 3 && exec "$@"'
    else:
        script = _IN_ROOT
    return ["unshare", "--mount", "--uts", "--", "sh", "-c", script, "dmtest",
            hostname, str(root or "/"), str(base), *args]


class RootDockerd(Dockerd):
    """A ``Dockerd`` whose binary and helpers (containerd, runc) come from ``root``."""

    def __init__(self, root: Path, *, hostname: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.node_name = hostname

    def _args(self) -> list[str]:
        return _wrap(super()._args(), self.node_name, self.root, self.base_dir)


class Podman(Dockerd):
    """``podman system service --time=0`` on a unix socket, rootful, private storage.

    What this sandbox needs (and an operator's Podman does not): runc (crun refuses the
    host's hybrid cgroups), the cgroupfs manager, the file events logger and file locks
    (no systemd, journald or shared-memory locks of its own), vfs storage, no network
    namespace, and ulimits pinned to the service's own hard limits (``create_body``): without
    CAP_SYS_RESOURCE, Podman's default ``nofile`` of 1048576 fails at ``setrlimit``.
    Containers get the instance's cgroup parent through ``HostConfig.CgroupParent``
    (``create_body``), so ``stop()`` sweeps their processes as it does dockerd's.
    """

    def __init__(self, root: Path | None, *, hostname: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.node_name = hostname
        self.conf = self.base_dir / "containers.conf"
        self.storage_conf = self.base_dir / "storage.conf"
        self.log_path = self.base_dir / "podman.log"

    def _write_conf(self) -> None:
        self.conf.write_text(
            "[containers]\n"
            'netns = "none"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{self.exec_root}/events.log"\n'
            'lock_type = "file"\n'
            'runtime = "runc"\n'
        )
        self.storage_conf.write_text(
            '[storage]\ndriver = "vfs"\n'
            f'graphroot = "{self.data_root}"\nrunroot = "{self.exec_root}"\n'
        )

    def _args(self) -> list[str]:
        self._write_conf()
        args = [
            "podman", "--root", str(self.data_root), "--runroot", str(self.exec_root),
            "--tmpdir", str(self.exec_root / "tmp"), "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--runtime", "runc",
            "system", "service", "--time=0", self.unix_url,
        ]  # fmt: skip
        return _wrap(args, self.node_name, self.root, self.base_dir)

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env["CONTAINERS_CONF"] = str(self.conf)
        env["CONTAINERS_STORAGE_CONF"] = str(self.storage_conf)
        return env

    def stop(self) -> None:
        super().stop()
        self.socket_path.unlink(missing_ok=True)  # Podman leaves it behind


def hard_ulimits(pid: int) -> list[dict[str, Any]]:
    """``nofile`` and ``nproc`` at process ``pid``'s hard limits, as the API spells them."""
    rows = {" ".join(line.split()[:-3]): line.split()[-2]
            for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]}
    return [{"Name": name, "Soft": int(rows[row]), "Hard": int(rows[row])}
            for name, row in (("nofile", "Max open files"), ("nproc", "Max processes"))]


def create_body(d: Dockerd, image: str, labels: Mapping[str, str]) -> dict[str, Any]:
    """A ``/containers/create`` body that sleeps, with no network, in ``d``'s cgroup.

    On Podman the ulimits are the service's own hard limits (it lowers its ``nproc`` to
    32768 at start): its compat API ignores containers.conf's ``default_ulimits`` and
    asks for more than that, which ``setrlimit`` refuses without CAP_SYS_RESOURCE."""
    host: dict[str, Any] = {"NetworkMode": "none", "CgroupParent": d.cgroup_parent}
    if isinstance(d, Podman) and d.pid is not None:
        host["Ulimits"] = hard_ulimits(d.pid)
    return {"Image": image, "Cmd": ["sleep", "3600"], "Labels": dict(labels),
            "StopSignal": "SIGKILL", "HostConfig": host}


def remove_all(d: Dockerd) -> None:
    """Force-remove every container (Podman's outlive the service otherwise)."""
    with contextlib.suppress(DockerdError):
        for c in d.api("/containers/json", params={"all": 1}):
            with contextlib.suppress(DockerdError):
                d.api(f"/containers/{c['Id']}", "DELETE", params={"force": 1},
                      expect_json=False)


@contextlib.contextmanager
def engine(name: str, hostname: str, labels: Mapping[str, str] | None = None) -> Iterator[Dockerd]:
    """Start engine ``name`` (a key of ENGINES) with the busybox image as ``IMAGE``.

    ``labels`` are daemon labels (Docker only: Podman has none to set)."""
    kind, flavour = ENGINES[name]
    with contextlib.ExitStack() as stack:
        root = None
        if flavour is not None:
            base = stack.enter_context(roots.use(flavour))
            root = stack.enter_context(roots.throwaway(base))
        d: Dockerd
        if kind == "podman":
            if root is None and shutil.which("podman") is None:
                raise DockerdError("podman is not installed (.ci/deps installs it)")
            d = Podman(root, hostname=hostname, start_timeout=120)
        elif root is not None:
            d = RootDockerd(root, hostname=hostname, labels=labels, start_timeout=120)
        else:
            d = Dockerd(hostname=hostname, labels=labels, start_timeout=120)
        stack.callback(d.close)
        d.start()
        stack.callback(remove_all, d)
        if kind == "podman":  # what `podman import` does: a short name becomes localhost/…
            d.api("/libpod/images/import", "POST", rootfs_tarball().read_bytes(),
                  params={"reference": IMAGE}, expect_json=False, timeout=120)
        else:
            ensure_image(d, IMAGE)
        yield d
