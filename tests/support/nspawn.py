"""Boot a Debian root under systemd-nspawn and drive its systemd from the test process.

``BootedRoot`` boots ``systemd-nspawn -b`` on a directory, waits until the container's
systemd reports ``running`` (or ``degraded``; with ``expected_failures``, degraded only by
those units, as an arm64 root under qemu-user is: ``QEMU_USER_FAILURES``), runs commands
inside it through ``nsenter`` and powers it off again — bounded at every step and cleaned
up on every exit path: no container, cgroup or overlay outlives the ``with`` block.

The container shares the host's network namespace (no ``--private-network``), so a test
server on the host's 127.0.0.1 is reachable from inside, and needs no TTY or stdin: it runs
under CI as it does at a desk. ``boot()`` adds the cached root and the throwaway overlay of
``roots`` around it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from . import roots

#: What every command inside the container starts from: the container's own PATH, not the
#: test process's (a virtualenv or pyenv shim means nothing in there).
CONTAINER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}

_NSPAWN_RUN = "/run/systemd/nspawn"
_REQUIRED_TOOLS = {"systemd-nspawn": "systemd-container", "nsenter": "util-linux"}


#: Units that fail at every boot of an arm64 root under qemu-user, with the status they
#: fail with: 243/CREDENTIALS, "Failed to set up credentials: Invalid argument". They have
#: ``LoadCredential=``, whose setup in systemd 252 makes a call qemu-user does not emulate
#: (the others with it, systemd-sysctl and procps, are skipped by their conditions in a
#: container; dm-agent.service has none). Their work is done otherwise where a test needs
#: it: the package's postinst calls ``systemd-sysusers`` itself, and tests/test_arm64.py
#: checks that the user exists.
QEMU_USER_FAILURES = {
    "systemd-sysusers.service": 243,
    "systemd-tmpfiles-setup.service": 243,
    "systemd-tmpfiles-setup-dev.service": 243,
}

#: Host path → path in the container, as a mapping or as pairs (one host path may be bound
#: at several places).
Binds = Mapping[str | os.PathLike[str], str] | Sequence[tuple[str | os.PathLike[str], str]]


class BootError(RuntimeError):
    """The container did not boot, or did not stop, in time."""


class RunError(subprocess.CalledProcessError):
    """A command inside the container failed; the message carries what it printed."""

    def __str__(self) -> str:
        out = (self.stdout or "").strip()[-2000:]
        err = (self.stderr or "").strip()[-2000:]
        return f"{super().__str__()}\n--- stdout:\n{out}\n--- stderr:\n{err}"


class BootedRoot:
    """A booted systemd container on *root* (a directory that the container may change).

    Use as a context manager::

        with BootedRoot(path, binds=[("/tmp/d/docker.sock", "/var/run/docker.sock")]) as box:
            box.run(["systemctl", "start", "dm-agent"])
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        binds: Binds | None = None,
        read_only_binds: Binds | None = None,
        machine: str | None = None,
        boot_timeout: float = 90.0,
        nspawn_args: Sequence[str] = (),
        expected_failures: Mapping[str, int] | None = None,
    ) -> None:
        self.root = Path(root)
        #: None: a ``degraded`` boot passes as it is; else the only units that may have
        #: failed, each with its exit status (any other failure fails the boot)
        self.expected_failures = expected_failures
        self.machine = machine or f"dm-{secrets.token_hex(4)}"
        self.boot_timeout = boot_timeout
        self.binds = _pairs(binds)
        self.read_only_binds = _pairs(read_only_binds)
        self.nspawn_args = list(nspawn_args)
        self.pid: int | None = None  # the container's systemd, as the host sees it
        self.boot_seconds: float | None = None
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._scratch: Path | None = None
        self._cgroups: list[Path] = []

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> BootedRoot:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Boot the container and return once its systemd has finished starting up."""
        if os.geteuid() != 0:
            raise BootError("booting a container needs root (systemd-nspawn, nsenter, mount)")
        for tool, package in _REQUIRED_TOOLS.items():
            if shutil.which(tool) is None:
                raise BootError(f"{tool} is missing: apt-get install {package}")
        started = time.monotonic()
        try:
            self._scratch = Path(tempfile.mkdtemp(prefix=f"{self.machine}."))
            self._spawn()
            self.pid = self._find_init(started + self.boot_timeout)
            self._wait_booted(started + self.boot_timeout)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - started

    def _nspawn_command(self) -> list[str]:
        cmd = [
            "systemd-nspawn",
            f"--directory={self.root}",
            f"--machine={self.machine}",
            "--boot",
            # No systemd (or no machined) needed on the host, and nothing registered there.
            "--register=no",
            "--keep-unit",
            # Leave the host's files alone, and need no TTY.
            "--resolv-conf=off",
            "--timezone=off",
            "--link-journal=no",
            "--console=read-only",
        ]
        cmd += [f"--bind={host}:{path}" for host, path in self.binds]
        cmd += [f"--bind-ro={host}:{path}" for host, path in self.read_only_binds]
        return cmd + self.nspawn_args

    def _spawn(self) -> None:
        assert self._scratch is not None
        self._cgroups = _make_cgroups(f"dm-nspawn.{self.machine}")
        # Enter a cgroup of our own before exec, so that nspawn's "payload" cgroup (it makes
        # one under its current cgroup with --keep-unit) is not shared by parallel boots.
        # A shell does it rather than preexec_fn, which is unsafe with threads around.
        # Best effort: where that is not allowed, nspawn shares its parent's cgroup.
        enter = 'for p in $DM_CGROUP_PROCS; do echo $$ 2>/dev/null > "$p"; done; exec "$@"'
        env = dict(os.environ)
        env["DM_CGROUP_PROCS"] = " ".join(str(c / "cgroup.procs") for c in self._cgroups)
        # nspawn 252 needs this for an image whose systemd has dropped cgroup v1 (trixie's)
        # when the host itself runs the hybrid hierarchy; harmless on a unified host.
        env.setdefault("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
        with open(self._scratch / "console.log", "wb") as console:
            self._nspawn = subprocess.Popen(
                ["sh", "-c", enter, "sh", *self._nspawn_command()],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def console(self) -> str:
        """What nspawn and the container's console printed so far (boot messages)."""
        if self._scratch is None:
            return ""
        try:
            return (self._scratch / "console.log").read_text(errors="replace")
        except OSError:
            return ""

    def _failure(self, what: str) -> BootError:
        tail = "\n".join(self.console().splitlines()[-40:])
        return BootError(f"container {self.machine} on {self.root}: {what}\n--- console:\n{tail}")

    def _find_init(self, deadline: float) -> int:
        """The host PID of the container's PID 1: nspawn's child that is PID 1 in its ns."""
        assert self._nspawn is not None
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise self._failure(f"systemd-nspawn exited with {self._nspawn.returncode}")
            for child in _children(self._nspawn.pid):
                if _ns_pid(child) == 1:
                    return child
            time.sleep(0.05)
        raise self._failure("no init process appeared")

    def _wait_booted(self, deadline: float) -> None:
        state = "unknown"
        while time.monotonic() < deadline:
            assert self._nspawn is not None
            if self._nspawn.poll() is not None:
                raise self._failure(f"systemd-nspawn exited with {self._nspawn.returncode}")
            try:
                result = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
                state = result.stdout.strip() or result.stderr.strip()
            except subprocess.TimeoutExpired:
                state = "not answering"
            if state == "running" or (state == "degraded" and self._only_expected_failures()):
                return
            time.sleep(0.1)
        raise self._failure(f"not booted after {self.boot_timeout:.0f} s (state: {state})")

    def _only_expected_failures(self) -> bool:
        if self.expected_failures is None:
            return True
        failed = self.failed_units()
        unexpected = {u: s for u, s in failed.items() if self.expected_failures.get(u) != s}
        if unexpected:
            raise self._failure(f"degraded by units not expected to fail: {unexpected} "
                                f"(expected: {dict(self.expected_failures)})")
        return True

    def failed_units(self) -> dict[str, int]:
        """The container's failed units, each with its main process's exit status."""
        out = self.run(["systemctl", "list-units", "--state=failed", "--plain",
                        "--no-legend", "--no-pager", "--full"]).stdout
        units = [line.split()[0] for line in out.splitlines() if line.strip()]
        statuses = {}
        for unit in units:
            show = self.run(["systemctl", "show", "--property=ExecMainStatus", unit]).stdout
            statuses[unit] = int(show.strip().partition("=")[2] or 0)
        return statuses

    def is_active(self, unit: str) -> str:
        """``systemctl is-active UNIT``: active, inactive, failed, activating..."""
        return self.run(["systemctl", "is-active", unit], check=False).stdout.strip()

    def stop(self, timeout: float = 30.0) -> None:
        """Power the container off (bounded), then kill what is left and clean up."""
        nspawn = self._nspawn
        try:
            if nspawn is not None and nspawn.poll() is None:
                self._power_off(nspawn, timeout)
        finally:
            self._nspawn = None
            self.pid = None
            self._forget_nspawn_state()
            for cgroup in self._cgroups:
                _remove_cgroup(cgroup)
            self._cgroups = []
            if self._scratch is not None:
                shutil.rmtree(self._scratch, ignore_errors=True)
                self._scratch = None

    def _forget_nspawn_state(self) -> None:
        """Remove what nspawn leaves in the host's /run when it could not clean up itself
        (it was killed, or /run is not a tmpfs): the image lock and the propagation dir."""
        with contextlib.suppress(OSError):
            st = os.stat(self.root)
            Path(f"{_NSPAWN_RUN}/locks/inode-{st.st_dev}:{st.st_ino}").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (Path(_NSPAWN_RUN) / "propagate" / self.machine).rmdir()

    def _power_off(self, nspawn: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self.pid is not None:  # else there is no systemd yet to ask
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.run(["systemctl", "poweroff", "--no-block"], check=False,
                         timeout=min(10.0, max(1.0, timeout)))
            with contextlib.suppress(subprocess.TimeoutExpired):
                nspawn.wait(max(0.1, deadline - time.monotonic()))
                return
        # The container's systemd does not answer: ask nspawn (it halts the container),
        # then kill its PID 1 (the whole PID namespace dies with it) and nspawn.
        with contextlib.suppress(ProcessLookupError):
            nspawn.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            nspawn.wait(5)
            return
        inits = {p for p in _children(nspawn.pid) if _ns_pid(p) == 1}
        for pid in inits | ({self.pid} if self.pid else set()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            nspawn.kill()
        nspawn.wait(10)

    # -- inside the container -----------------------------------------------------------

    def _enter(self) -> list[str]:
        if self.pid is None:
            raise BootError(f"container {self.machine} is not running")
        return ["nsenter", f"--target={self.pid}", "--all", "--root", "--wd", "env", "-i"] + [
            f"{k}={v}" for k, v in CONTAINER_ENV.items()
        ]

    def run(
        self,
        cmd: Sequence[str] | str,
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run *cmd* (argv, or a string for ``sh -c``) as root inside the container."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        result = subprocess.run(
            self._enter() + extra + argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise RunError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def copy_in(
        self, host_path: str | os.PathLike[str], path: str, *, mode: int | None = None
    ) -> None:
        """Copy a host file or directory tree to *path* in the container, owned by root.

        Goes through the container's own view of its tree, so its absolute symlinks
        (``/var/run`` → ``/run``) resolve inside it rather than on the host.
        """
        source = Path(host_path)
        if source.is_dir():
            script = 'mkdir -p "$1" && tar --no-same-owner -C "$1" -xf -'
            with subprocess.Popen(
                ["tar", "-C", str(source), "-cf", "-", "."], stdout=subprocess.PIPE
            ) as pack:
                unpack = subprocess.run(
                    [*self._enter(), "sh", "-c", script, "sh", path],
                    stdin=pack.stdout, capture_output=True, timeout=300,
                )
            failed = pack.returncode or unpack.returncode
        else:
            script = 'mkdir -p "$(dirname "$1")" && cat > "$1"'
            unpack = subprocess.run(
                [*self._enter(), "sh", "-c", script, "sh", path],
                input=source.read_bytes(), capture_output=True, timeout=300,
            )
            failed = unpack.returncode
            if mode is None:
                mode = source.stat().st_mode & 0o7777
        if failed:
            detail = unpack.stderr.decode(errors="replace").strip()
            raise BootError(f"copy_in {source} -> {path} failed: {detail}")
        if mode is not None:
            self.run(["chmod", f"{mode:o}", path])

    def write(self, path: str, text: str, *, mode: int = 0o644) -> None:
        """Create or replace the file *path* in the container with *text*."""
        self.run(
            ["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
             "sh", path, f"{mode:o}"],
            input=text,
        )

    def read(self, path: str) -> str:
        """The text of *path* in the container."""
        return self.run(["cat", path]).stdout

    def journal(
        self,
        unit: str | None = None,
        *,
        priority: str | int | None = None,
        output: str = "short",
        after: str | None = None,
    ) -> str:
        """The container's journal (of one unit: ``journalctl -u``), after a ``cursor()``."""
        argv = ["journalctl", "--no-pager", "--quiet", f"--output={output}"]
        if unit is not None:
            argv.append(f"--unit={unit}")
        if priority is not None:
            argv.append(f"--priority={priority}")
        if after is not None and unit is None and priority is None:
            argv.append(f"--after-cursor={after}")
        elif after is not None:
            # journalctl 247 and 252 (Debian 11, 12) drop the first matching entry after
            # --after-cursor when the cursor's own entry does not match the filter: start
            # at the first matching entry after it instead (--cursor includes it).
            first = self._first_after(after, argv[4:])
            if first is None:
                return ""
            argv.append(f"--cursor={first}")
        return self.run(argv).stdout

    def _first_after(self, cursor: str, matches: list[str]) -> str | None:
        boot, seq = _cursor_seq(cursor)
        out = self.run(["journalctl", "--no-pager", "--quiet", "--output=json",
                        *matches]).stdout
        for line in out.splitlines():
            if line.startswith("{"):
                found = str(json.loads(line)["__CURSOR"])
                found_boot, found_seq = _cursor_seq(found)
                if found_boot != boot or found_seq > seq:
                    return found
        return None

    def cursor(self) -> str | None:
        """The journal's position now, for ``journal(after=...)``; None while it is empty."""
        out = self.run(["journalctl", "--no-pager", "--lines=1", "--output=json"]).stdout
        for line in out.splitlines():
            if line.startswith("{"):
                cursor = json.loads(line).get("__CURSOR")
                return str(cursor) if cursor else None
        return None


def timespan(value: str) -> float:
    """Seconds in a systemd time span as ``systemctl show`` prints it: "5s", "500ms",
    "1min 30s"."""
    units = {"min": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    total = sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(min|ms|us|s)", value))
    assert total > 0, value
    return total


@contextlib.contextmanager
def boot(
    release: str = "bookworm",
    *,
    binds: Binds | None = None,
    read_only_binds: Binds | None = None,
    machine: str | None = None,
    boot_timeout: float = 90.0,
    copy: bool = False,
) -> Iterator[BootedRoot]:
    """Boot a throwaway overlay (or with *copy*, a copy) of the cached *release* root;
    all of it is gone afterwards. A foreign-architecture root (``roots.FOREIGN``) boots
    under qemu-user: degraded by ``QEMU_USER_FAILURES`` and by nothing else."""
    with roots.use(release) as cached, roots.throwaway(cached, copy=copy) as tree, BootedRoot(
        tree,
        binds=binds,
        read_only_binds=read_only_binds,
        machine=machine,
        boot_timeout=boot_timeout,
        expected_failures=QEMU_USER_FAILURES if release in roots.FOREIGN else None,
    ) as box:
        yield box


# -- host-side helpers ---------------------------------------------------------------------


def _pairs(binds: Binds | None) -> list[tuple[Path, str]]:
    items = binds.items() if isinstance(binds, Mapping) else (binds or [])
    return [(Path(host).resolve(), path) for host, path in items]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _ns_pid(pid: int) -> int | None:
    """The innermost PID of *pid* (its PID inside its own PID namespace)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return None


def _cgroup_roots() -> list[Path]:
    """Our own cgroup in the hierarchies nspawn uses: cgroup2 and v1 ``name=systemd``."""
    mounts: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3]
        if fstype == "cgroup2":
            mounts.setdefault("", Path(fields[4]))
        elif fstype == "cgroup" and "name=systemd" in options.split(","):
            mounts.setdefault("name=systemd", Path(fields[4]))
    found = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers in mounts:
            found.append(mounts[controllers] / path.lstrip("/"))
    return found


def _make_cgroups(name: str) -> list[Path]:
    made = []
    for parent in _cgroup_roots():
        with contextlib.suppress(OSError):
            (parent / name).mkdir()
            made.append(parent / name)
    return made


def _remove_cgroup(path: Path) -> None:
    """Remove an emptied cgroup tree, deepest first (the kernel may lag a moment)."""
    for _ in range(50):
        if not path.exists():
            return
        dirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        with contextlib.suppress(OSError):
            for sub in [*dirs, path]:
                sub.rmdir()
        time.sleep(0.1)


def _cursor_seq(cursor: str) -> tuple[str, int]:
    """(seqnum id, seqnum) of a journal cursor, to order entries of one journal."""
    fields = dict(part.split("=", 1) for part in cursor.split(";") if "=" in part)
    return fields["s"], int(fields["i"], 16)
