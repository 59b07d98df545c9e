"""Cached Debian roots with systemd (and without Python), to boot under systemd-nspawn.

One debootstrapped root per release lives under ``${DM_ROOTS_CACHE:-/var/cache/dm-agent/roots}``
as ``<release>/``, next to ``<release>.key.json`` that records how it was built. The root is
rebuilt when the key is absent or its recipe differs from the current one, and is never
booted itself: each test boots a throwaway overlay (``throwaway()``) so the cache stays
pristine. The roots have no Python on purpose: the frozen agent must run without one.

The roots carry no apt source: a test that installs a package does so from a file or a
local repository, and nothing inside a booted root can reach the network's mirrors.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from . import binfmt

RELEASES = ("bullseye", "bookworm", "trixie")

#: Roots with more packages than the booted ones, each cached under its own name (its own
#: key and lock), so the shared release roots keep their recipe: flavour -> (release,
#: extra packages). ``trixie-engines`` holds Docker Engine 26 and Podman 5, run through
#: ``chroot`` (never booted) by ``tests/support/engines.py``. ``<release>-ansible`` is a
#: node managed by Ansible (tests/test_ansible.py): its modules run with the node's python3
#: (the apt module with python3-apt), reached over ssh as a user who becomes root with
#: sudo, as a server is; the agent itself still uses no Python.
_ANSIBLE_NODE = ("python3", "python3-apt", "openssh-server", "sudo")
FLAVOURS: dict[str, tuple[str, tuple[str, ...]]] = {
    "trixie-engines": ("trixie", ("docker.io", "containerd", "runc", "podman", "conmon",
                                  "iptables", "util-linux")),
    "bullseye-ansible": ("bullseye", _ANSIBLE_NODE),
    "trixie-ansible": ("trixie", _ANSIBLE_NODE),
    # a fresh Debian 12 node as the README's operator path expects it: curl for the key
    # (gnupg is in every root); tests/test_operator_path.py
    "bookworm-operator": ("bookworm", ("curl",)),
}

#: Packages on top of debootstrap's minbase: a booting systemd with D-Bus (systemctl,
#: journalctl, systemd-analyze, systemd-sysusers all come with ``systemd``), and what an
#: apt/yum-style repository test needs to verify signatures and TLS.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "ca-certificates", "gnupg")

#: Roots of another architecture, whose programs run through qemu-user (``binfmt.ensure``),
#: each under its own name: name -> (release, Debian architecture, packages on top of
#: minbase). ``bookworm-arm64`` boots like bookworm (tests/test_arm64.py installs the arm64
#: package in it); ``bullseye-arm64-bare`` is minbase alone, no systemd and no Python, where
#: the arm64 frozen program runs through ``chroot`` (the arm64 twin of the bare root of
#: packaging/smoke-frozen.sh).
FOREIGN: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "bookworm-arm64": ("bookworm", "arm64", PACKAGES),
    "bullseye-arm64-bare": ("bullseye", "arm64", ()),
}

#: Bump when the recipe changes in a way the fields below do not show (the post-build steps).
RECIPE_FORMAT = 3

DEFAULT_CACHE = "/var/cache/dm-agent/roots"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


class RootError(RuntimeError):
    """A root could not be built or prepared."""


def cache_dir() -> Path:
    """Where the cached roots live (``$DM_ROOTS_CACHE`` or /var/cache/dm-agent/roots)."""
    return Path(os.environ.get("DM_ROOTS_CACHE") or DEFAULT_CACHE)


def _host_arch() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], check=True, capture_output=True, text=True
    ).stdout.strip()


def recipe(release: str) -> dict[str, object]:
    """What a root for *release* is built from; a cached root whose key differs is rebuilt."""
    if release in FLAVOURS:
        base, extra = FLAVOURS[release]
        return {**recipe(base), "flavour": release, "packages": sorted({*PACKAGES, *extra})}
    if release in FOREIGN:
        base, arch, packages = FOREIGN[release]
        return {**recipe(base), "flavour": release, "arch": arch, "packages": sorted(packages)}
    if release not in RELEASES:
        names = ", ".join((*RELEASES, *FLAVOURS, *FOREIGN))
        raise RootError(f"unknown release {release!r}: expected one of {names}")
    return {
        "format": RECIPE_FORMAT,
        "release": release,
        "arch": _host_arch(),
        "mirror": os.environ.get("DM_DEBIAN_MIRROR") or DEFAULT_MIRROR,
        "variant": "minbase",
        "packages": sorted(PACKAGES),
    }


def _key_path(release: str) -> Path:
    return cache_dir() / f"{release}.key.json"


def _read_key(release: str) -> dict[str, object] | None:
    try:
        data = json.loads(_key_path(release).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_current(release: str) -> bool:
    """True when the cached root for *release* exists and was built by the current recipe."""
    key = _read_key(release)
    return (
        key is not None
        and key.get("recipe") == recipe(release)
        and (cache_dir() / release / "usr/lib/os-release").exists()
    )


@contextlib.contextmanager
def _lock(release: str, mode: int) -> Iterator[None]:
    """The release's lock: builders hold it exclusively, boots (``use``) shared, so a
    rebuild never pulls a root from under a running container (parallel runs share the
    cache)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f".{release}.lock", "a") as handle:
        fcntl.flock(handle, mode)
        yield


def ensure_root(release: str = "bookworm", *, log: bool = True) -> Path:
    """Return the cached root for *release*, building it first when absent or stale.

    A cold build runs debootstrap against the Debian mirror (about a minute); reuse
    costs one key comparison. A rebuild waits for the boots using the old root.
    """
    root = cache_dir() / release
    wanted = recipe(release)
    if wanted["arch"] != _host_arch():  # building and running it both need qemu-user
        binfmt.ensure(str(wanted["arch"]))
    if is_current(release):
        return root
    with _lock(release, fcntl.LOCK_EX):
        if is_current(release):
            return root
        started = time.monotonic()
        if log:
            print(f"roots: building {release} root in {root} (debootstrap, a few minutes)")
        _key_path(release).unlink(missing_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{release}.", dir=cache_dir()))
        try:
            staging.chmod(0o755)  # it becomes the container's /; mkdtemp made it 0700
            _debootstrap(wanted, staging)
            _finish(staging)
            if release not in FLAVOURS:  # booted roots run the frozen agent: no Python
                _assert_no_python(staging)
            if "openssh-server" in FLAVOURS.get(release, ("", ()))[1]:
                _no_sshd_at_boot(staging)
            if root.exists():
                shutil.rmtree(root)
            staging.rename(root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        seconds = round(time.monotonic() - started, 1)
        key = {"recipe": wanted, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "seconds": seconds, "debootstrap": _debootstrap_version()}
        tmp_key = _key_path(release).with_suffix(".tmp")
        tmp_key.write_text(json.dumps(key, indent=2) + "\n")
        tmp_key.rename(_key_path(release))
        if log:
            print(f"roots: built {release} in {seconds} s")
        return root


@contextlib.contextmanager
def use(release: str = "bookworm") -> Iterator[Path]:
    """The current root for *release* (built if needed), kept from rebuilds while in use."""
    for _ in range(3):
        root = ensure_root(release)
        with _lock(release, fcntl.LOCK_SH):
            if is_current(release):
                yield root
                return
    raise RootError(f"the {release} root keeps being rebuilt by another recipe")


def _debootstrap_version() -> str:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "debootstrap"], capture_output=True, text=True
    )
    return result.stdout.strip() or "unknown"


def _debootstrap(wanted: dict[str, object], target: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise RootError("debootstrap is not installed (apt-get install debootstrap)")
    packages = wanted["packages"]
    assert isinstance(packages, list)
    cmd = [
        "debootstrap",
        f"--variant={wanted['variant']}",
        f"--arch={wanted['arch']}",
        *(["--include=" + ",".join(packages)] if packages else []),
        str(wanted["release"]),
        str(target),
        str(wanted["mirror"]),
    ]
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        log = target / "debootstrap/debootstrap.log"
        detail = log.read_text(errors="replace")[-4000:] if log.exists() else result.stderr[-4000:]
        raise RootError(f"{' '.join(cmd)} failed ({result.returncode}):\n{detail}")


def _finish(root: Path) -> None:
    """Make the fresh root boot quietly and stay off the network."""
    subprocess.run(["chroot", str(root), "apt-get", "clean"], check=True, capture_output=True)
    # No mirror inside: an `apt-get update` in a test must not leave the host.
    (root / "etc/apt/sources.list").write_text(
        "# dm-agent test root: no network sources; install from files or a local repository\n"
    )
    for lists in (root / "var/lib/apt/lists").glob("*_*"):
        lists.unlink()
    if not (root / "etc/systemd/system").is_dir():  # a bare root: nothing boots in it
        return
    # Nothing to log into inside a test boot, and nothing that wakes up on its own to
    # compete with a test (timers fire late, on a boot that lasts seconds, but may).
    for unit in ("console-getty.service", "getty@tty1.service", "apt-daily.timer",
                 "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
                 "fstrim.timer"):
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")


def _no_sshd_at_boot(root: Path) -> None:
    """Mask the ssh server: the container shares the host's network, where port 22 is
    the host's. A test gives it a port of its own, unmasks it and starts it."""
    subprocess.run(["chroot", str(root), "systemctl", "disable", "ssh.service"],
                   check=True, capture_output=True)
    for unit in ("ssh.service", "ssh.socket"):
        link = root / "etc/systemd/system" / unit
        if not link.is_symlink():
            link.symlink_to("/dev/null")


def _assert_no_python(root: Path) -> None:
    found = sorted(str(p.relative_to(root)) for p in (root / "usr/bin").glob("python*"))
    if found:
        raise RootError(f"root {root} has Python ({', '.join(found)}); it must not")


@contextlib.contextmanager
def throwaway(root: Path, *, copy: bool = False) -> Iterator[Path]:
    """Yield a writable copy of *root* that vanishes afterwards, leaving *root* untouched.

    An overlay (upper directory in a temporary directory) when the kernel allows one on this
    filesystem — instant — else (or with *copy*) a ``cp -a --reflink=auto`` copy. Unmounted
    and removed on every exit path.
    """
    scratch = Path(tempfile.mkdtemp(prefix="dm-root.", dir=os.environ.get("DM_ROOTS_TMP")))
    merged = scratch / "root"
    mounted = False
    try:
        for sub in ("upper", "work", "root"):
            (scratch / sub).mkdir()
        options = f"lowerdir={root},upperdir={scratch / 'upper'},workdir={scratch / 'work'}"
        mount = None if copy else subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
            capture_output=True, text=True,
        )
        if mount is not None and mount.returncode == 0:
            mounted = True
        else:
            merged.rmdir()
            subprocess.run(
                ["cp", "-a", "--reflink=auto", str(root), str(merged)], check=True
            )
        yield merged
    finally:
        if mounted:
            _unmount(merged)
        shutil.rmtree(scratch, ignore_errors=True)


def chroot_run(
    root: Path,
    command: list[str],
    *,
    binds: Mapping[str | os.PathLike[str], str],
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run *command* with ``chroot`` in *root* (never booted), in a private mount
    namespace: /proc and *binds* (host path -> absolute path in the root, a file or a
    directory) are mounted for this process only and vanish with it. Their mount points
    are made in *root* when missing (empty)."""
    mounts = ["mount --make-rprivate /"]
    for host, path in binds.items():
        target = root / path.lstrip("/")
        if Path(host).is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        mounts.append(f"mount --bind {shlex.quote(str(host))} {shlex.quote(str(target))}")
    mounts.append(f"mount -t proc proc {shlex.quote(str(root / 'proc'))}")
    script = " && ".join([
        *mounts,
        "exec chroot " + shlex.quote(str(root)) + " /usr/bin/env -i PATH=/usr/bin:/bin "
        "HOME=/root " + " ".join(shlex.quote(c) for c in command),
    ])
    return subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _unmount(path: Path) -> None:
    """Unmount *path*; lazily if something still holds it, so cleanup never fails."""
    for attempt in range(10):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.2 * (attempt + 1))
    subprocess.run(["umount", "--lazy", str(path)], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m support.roots [RELEASE...]`` (from tests/): build (or check) the cached roots."""
    import sys

    for release in (argv if argv is not None else sys.argv[1:]) or ["bookworm"]:
        started = time.monotonic()
        path = ensure_root(release)
        print(f"{release}: {path} ready in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
