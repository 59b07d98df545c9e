"""Helpers of tests/test_lifecycle.py: the built packages, a next version to upgrade to,
and one booted node driven through the service lifecycle the way an operator drives it.

- ``build_packages()`` runs what tests/test_packages.py's session fixtures run (freeze.sh
  when the onedir is missing or stale, then build-deb.sh, build-rpm.sh, build-repo.sh),
  once per process, and snapshots the results into a private directory, so that a
  concurrent build in the shared tree cannot swap a package under a running test.
- ``publish_next_version()`` makes version N+1 of the .deb (``dpkg-deb -R``, Version
  bumped, ``dpkg-deb -b``; the payload's own ``--version`` stays N) and publishes it as
  build-repo.sh publishes N: a reprepro repository, suite ``stable``, signed with the same
  key, so a node upgrades with its existing source entry (``signed-by=`` that key).
- ``Node`` wraps a booted root (tests/support/nspawn.py) with the unit's state, the
  agent's journal lines and the configuration file, plus the strict master the node
  registers with and the private dockerd it reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .dockerd import Dockerd
from .master import Master, RecordedRequest
from .nspawn import BootedRoot

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
UNIT = "dm-agent.service"
INI = "/etc/dm-agent.ini"
PIDFILE = "/run/dm-agent/dm-agent.pid"
REPO_IN_ROOT = "/srv/dm-agent-repo"
KEYRING_IN_ROOT = "/usr/share/keyrings/dm-agent-archive-keyring.gpg"
#: what apt-get needs to run without a terminal (and without a debconf frontend)
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}

#: Host tools these tests use, with the Debian package that has each.
TOOLS = {
    "dpkg-deb": "dpkg", "reprepro": "reprepro", "gpg": "gnupg", "gpgconf": "gnupg",
    "rpm": "rpm", "ps": "procps", "systemd-nspawn": "systemd-container",
    "nsenter": "util-linux", "debootstrap": "debootstrap", "dockerd": "docker.io",
}


class LifecycleError(RuntimeError):
    """A build or publishing step of the lifecycle tests failed."""


def missing_tools() -> list[str]:
    """``apt-get install`` arguments for the host tools that are not installed."""
    return sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})


def version() -> str:
    """dm_agent.__version__, read as packaging/package-common.sh reads it."""
    text = (REPO / "dm_agent/__init__.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    if not m:
        raise LifecycleError("no __version__ in dm_agent/__init__.py")
    return m.group(1)


def _run(cmd: Sequence[str | os.PathLike[str]], *, timeout: float = 1800,
         env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=cwd)
    if p.returncode != 0:
        raise LifecycleError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n"
                             f"--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}")
    return p.stdout


@dataclasses.dataclass(frozen=True)
class Packages:
    """Snapshots of what this tree builds."""

    version: str
    deb: Path
    rpm: Path  # the signed one, as dist/repo/yum serves it
    repo: Path  # dist/repo: apt/, yum/, the keyrings, dm-agent.list
    keyring: Path  # binary public key (apt's signed-by=)
    keyring_asc: Path


@functools.cache
def build_packages() -> Packages:
    """Build the packages once per process, as tests/test_packages.py's fixtures do."""
    ver = version()
    # The repository carries both architectures (build-repo.sh refuses a missing one):
    # amd64 and arm64 are built, the latter's --version checked through qemu-user;
    # amd64 last, so deb and rpm below are its (the lifecycle's nodes are amd64).
    for arch, frozen, machine in (("arm64", "frozen-arm64", "aarch64"),
                                  ("amd64", "frozen", "x86_64")):
        program = REPO / f"build/{frozen}/dm-agent/dm-agent"
        tarball = REPO / f"dist/dm-agent-{ver}-linux-{machine}.tar.gz"
        env = dict(os.environ)
        if arch == "arm64" and os.uname().machine != machine:
            env["QEMU_LD_PREFIX"] = _run([PACKAGING / "buildroot-arm64.sh", "--path"]).strip()
        current = False
        if os.access(program, os.X_OK) and tarball.is_file():
            p = subprocess.run([program, "--version"], capture_output=True, text=True, env=env)
            current = p.returncode == 0 and p.stdout.strip() == f"dm-agent {ver}"
        if not current:
            _run([PACKAGING / "freeze.sh", "--arch", arch], timeout=3 * 3600)
        deb = Path(_run([PACKAGING / "build-deb.sh", "--arch", arch]).strip())
        rpm = Path(_run([PACKAGING / "build-rpm.sh", "--arch", arch]).strip())
    repo = Path(_run([PACKAGING / "build-repo.sh"], timeout=600).strip())
    if deb.name != f"dm-agent_{ver}_amd64.deb" or rpm.name != f"dm-agent-{ver}-1.x86_64.rpm":
        raise LifecycleError(f"unexpected package names: {deb}, {rpm}")
    snap = Path(tempfile.mkdtemp(prefix="dm-lifecycle-pkgs."))
    _cleanup_at_exit(snap)
    shutil.copytree(repo, snap / "repo", symlinks=True)
    shutil.copy2(deb, snap / deb.name)
    return Packages(
        version=ver,
        deb=snap / deb.name,
        rpm=snap / "repo/yum/x86_64" / rpm.name,
        repo=snap / "repo",
        keyring=snap / "repo/dm-agent-archive-keyring.gpg",
        keyring_asc=snap / "repo/dm-agent-archive-keyring.asc",
    )


def _cleanup_at_exit(path: Path) -> None:
    import atexit

    atexit.register(shutil.rmtree, path, True)


def _signing_key() -> tuple[Path, str]:
    """The GnuPG home and key build-repo.sh signed dist/repo with (same rules as it)."""
    if os.environ.get("DM_REPO_KEY"):
        return Path(os.environ["DM_REPO_GNUPGHOME"]), os.environ["DM_REPO_KEY"]
    home = REPO / "build/repo-gnupg"
    return home, (home / "throwaway.fpr").read_text().strip()


@contextlib.contextmanager
def publish_next_version(pkgs: Packages, next_version: str) -> Iterator[Path]:
    """Yield a signed apt repository (the layout of dist/repo/apt) holding version
    *next_version* of the .deb: N+1, as the vendor would publish it."""
    with tempfile.TemporaryDirectory(prefix="dm-lifecycle-next.") as tmp:
        work = Path(tmp)
        tree = work / "tree"
        _run(["dpkg-deb", "-R", pkgs.deb, tree])
        control = tree / "DEBIAN/control"
        text = control.read_text()
        bumped = re.sub(r"^Version: .*$", f"Version: {next_version}", text, count=1, flags=re.M)
        if bumped == text:
            raise LifecycleError(f"no Version field in {control}")
        control.write_text(bumped)
        deb = work / f"dm-agent_{next_version}_amd64.deb"
        # gzip -1: xz, dpkg-deb's default, takes seconds on two cores for nothing here
        _run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "-b", tree, deb])
        # A private copy of the key's home: gpg-agent and lock files stay out of build/.
        source_home, key = _signing_key()
        home = work / "gnupg"
        shutil.copytree(source_home, home, ignore=shutil.ignore_patterns("S.*", "*.lock"))
        home.chmod(0o700)
        env = {**os.environ, "GNUPGHOME": str(home)}
        conf = work / "reprepro/conf"
        conf.mkdir(parents=True)
        (conf / "distributions").write_text(
            "Origin: dm-agent\nLabel: dm-agent\nSuite: stable\nCodename: stable\n"
            "Architectures: amd64\nComponents: main\n"
            "Description: dm-agent, the DockMaster node agent\n"
            f"SignWith: {key}\n")
        out = work / "apt"
        try:
            _run(["reprepro", "--silent", "--basedir", work / "reprepro", "--outdir", out,
                  "includedeb", "stable", deb], env=env, timeout=300)
            _run(["gpgv", "--keyring", pkgs.keyring, out / "dists/stable/InRelease"])
            yield out
        finally:
            subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"],
                           capture_output=True, timeout=30)


# --- the node -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mark:
    """A position in the journal: entries after it are newer."""

    cursor: str
    seqnum_id: str
    seqnum: int
    realtime: int

    @classmethod
    def of(cls, entry: dict[str, Any]) -> Mark:
        fields = dict(p.split("=", 1) for p in str(entry["__CURSOR"]).split(";"))
        return cls(str(entry["__CURSOR"]), fields["s"], int(fields["i"], 16),
                   int(entry["__REALTIME_TIMESTAMP"]))

    def before(self, entry: dict[str, Any]) -> bool:
        other = Mark.of(entry)
        if other.seqnum_id == self.seqnum_id:
            return other.seqnum > self.seqnum
        return other.realtime > self.realtime


class StepFailed(AssertionError):
    """A step needs an earlier one that did not pass on this node."""


@dataclasses.dataclass
class Node:
    """One booted root with the agent's package, its master and its dockerd."""

    name: str  # "bookworm", "bookworm-rpm"
    box: BootedRoot
    master: Master
    dockerd: Dockerd
    secret: str
    passed: set[str] = dataclasses.field(default_factory=set)
    #: what each step found worth reporting (figures, versions): printed at the end
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str, needs: Sequence[str] = ()) -> Iterator[None]:
        """Run one step: fails at once, naming it, when a step it needs did not pass."""
        missing = [n for n in needs if n not in self.passed]
        if missing:
            raise StepFailed(f"{self.name}: needs step(s) {', '.join(missing)}, which did "
                             "not pass (see their failures above)")
        started = time.monotonic()
        yield
        self.passed.add(name)
        self.notes.setdefault("seconds", {})[name] = round(time.monotonic() - started, 1)

    # -- running things ---------------------------------------------------------------

    def run(self, cmd: Sequence[str] | str, *, check: bool = True, timeout: float = 120.0,
            env: dict[str, str] | None = None, input: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
        return self.box.run(cmd, check=check, timeout=timeout, env=env, input=input)

    def apt(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return self.run(["apt-get", "-q", "-y", *args], env=APT_ENV, timeout=timeout)

    def show(self, *props: str) -> dict[str, str]:
        out = self.run(["systemctl", "show", UNIT, *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def cursor(self) -> Mark | None:
        """The journal's position now, for ``entries(after=...)``."""
        out = self.run(["journalctl", "--no-pager", "--lines=1", "--output=json"]).stdout
        for line in out.splitlines():
            if line.startswith("{"):
                return Mark.of(json.loads(line))
        return None

    def entries(self, after: Mark | None = None, unit: str | None = UNIT,
                priority: str | None = None) -> list[dict[str, Any]]:
        """The journal's entries (of *unit*, at *priority* or more urgent) after *after*.

        Filtered here rather than with ``--after-cursor``: journalctl 247 and 252
        (Debian 11 and 12; fixed in 257) skip one entry after seeking to the cursor,
        assuming it is the cursor's own, so with a match (``-u``, ``-p err``,
        ``FIELD=value``) that the cursor's entry does not satisfy, the first matching
        entry after it is silently dropped: one error line after the mark reads as none.
        """
        out = self.box.journal(unit, output="json", priority=priority)
        found = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return [e for e in found if after is None or after.before(e)]

    def agent_lines(self, after: Mark | None = None, priority: str | None = None) -> list[str]:
        """What the agent's own processes wrote to the unit's journal (not systemd's)."""
        return [str(e["MESSAGE"]) for e in self.entries(after, priority=priority)
                if e.get("_PID") != "1" and "MESSAGE" in e]

    def messages(self, after: Mark | None = None, priority: str | None = None) -> list[str]:
        """Every message of the unit (systemd's and the agent's)."""
        return [str(e.get("MESSAGE", "")) for e in self.entries(after, priority=priority)]

    def wait_lines(self, pattern: str, *, after: Mark | None, count: int = 1,
                   priority: str | None = None, timeout: float = 15.0) -> list[str]:
        """Wait until *count* agent lines after *after* match *pattern*; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.agent_lines(after, priority) if re.search(pattern, m)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: {len(found)} of {count} journal line(s) matching "
                    f"{pattern!r} after {timeout:.0f} s; the unit's journal since:\n"
                    + "\n".join(self.messages(after))[-4000:])
            time.sleep(0.2)

    def wait_state(self, want: dict[str, str], timeout: float = 15.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.show(*want)
            if state == want:
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: unit state {state}, wanted {want} "
                                     f"within {timeout:.0f} s")
            time.sleep(0.1)

    # -- the configuration file -----------------------------------------------------------

    def settings_block(self, *, timeout: int = 1, extra: str = "") -> str:
        return (
            "\n# --- set on this node by its operator (the lifecycle test) ---\n"
            f"master = {self.master.address}\n"
            "docker = unix:///var/run/docker.sock\n"
            f"timeout = {timeout}\n"
            f"secret = {self.secret}\n"
            # log_level = 1 (INFO) is the shipped file's own line already; a second one
            # is an error of the INI format (a duplicate key)
            "jitter = no\n"
            + extra
        )

    def edit_ini(self, text: str) -> None:
        """Replace the file's text as an editor does: same inode, owner and mode."""
        self.run(["sh", "-c", 'cat > "$1"', "sh", INI], input=text)

    def configure(self, *, timeout: int = 1, extra: str = "") -> None:
        """The shipped file (every key commented out) with the node's settings appended."""
        shipped = self.run(["cat", "/usr/share/doc/dm-agent/dm-agent.ini"]).stdout
        self.edit_ini(shipped + self.settings_block(timeout=timeout, extra=extra))

    def reload_interval(self, interval: int, *, timeout: float = 15.0) -> RecordedRequest:
        """Configure *interval* and ``systemctl reload``: the same process logs the reload and
        registers with ttl = 2 × interval. Returns that registration."""
        pid = self.main_pid()
        mark = self.cursor()
        since = time.monotonic()
        self.configure(timeout=interval)
        self.run(["systemctl", "reload", UNIT], timeout=timeout)
        reg = self.wait_registration(since, ttl=2 * interval, timeout=timeout)[0]
        self.wait_lines(rf"configuration reloaded from /etc/dm-agent\.ini: interval {interval}s",
                        after=mark, timeout=timeout)
        assert self.show("ActiveState", "MainPID") == {"ActiveState": "active",
                                                       "MainPID": str(pid)}
        assert self.messages(mark, priority="err") == []
        self.notes["reload_to_ttl_seconds"] = round(reg.time - since, 2)
        return reg

    def stat(self, path: str) -> str:
        return self.run(["stat", "-c", "%a %U:%G", path]).stdout.strip()

    def exists(self, path: str) -> bool:
        return self.run(["test", "-e", path], check=False).returncode == 0

    def has_python(self) -> list[str]:
        """Every python* program the root has (it must have none)."""
        out = self.run("ls -d /usr/bin/python* /usr/local/bin/python* /bin/python* "
                       "2>/dev/null; command -v python3 python; true").stdout
        return sorted(set(out.split()))

    def give_docker_socket(self) -> int:
        """Make the bound socket root:docker 0660 as the root's docker group knows it.

        The socket is this test's own dockerd's file: its group is set on the host to the
        numeric GID that ``docker`` has inside the root (made by the package's sysusers).
        """
        gid = int(self.run(["getent", "group", "docker"]).stdout.split(":")[2])
        os.chown(self.dockerd.socket_path, 0, gid)
        os.chmod(self.dockerd.socket_path, 0o660)
        return gid

    # -- registrations ----------------------------------------------------------------------

    def registrations_since(self, since: float) -> list[RecordedRequest]:
        return [r for r in self.master.requests if r.time >= since]

    def wait_registration(self, since: float, *, timeout: float = 15.0,
                          ttl: int | None = None, count: int = 1) -> list[RecordedRequest]:
        """Wait for *count* accepted registrations that arrived after *since* (monotonic),
        with ``ttl`` when given."""
        deadline = time.monotonic() + timeout
        while True:
            got = [r for r in self.registrations_since(since) if r.status == 200
                   and (ttl is None or r.query.get("ttl") == [str(ttl)])]
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                seen = [(round(r.time - since, 2), r.status, r.query.get("ttl"))
                        for r in self.registrations_since(since)]
                raise AssertionError(
                    f"{self.name}: {len(got)} of {count} registration(s) (ttl {ttl}) within "
                    f"{timeout:.0f} s; the master saw (s, status, ttl): {seen}")
            time.sleep(0.05)


def late_answer_lines(lines: Sequence[str], master_url: str) -> list[str]:
    """The agent's lines that say the test master answered late ("URL did not answer
    within…", "…answer too slowly"): see late_first_answer."""
    return [m for m in lines if m.startswith(f"{master_url} ")
            or re.search(r"did not answer within|answer too slowly", m)]


def late_first_answer(name: str, master: Master, since: float) -> list[Any]:
    """The master's view of the exchanges since *since* (arrived after it, answered
    within, status, client port), said as a warning: a booted node's first registration
    is sometimes answered late under CI load, and its cause is not found yet
    (docs/developer-guide.md); the warning shows in CI's summary even when the test
    passes."""
    seen = [(round(r.time - since, 3), None if r.answered is None else
             round(r.answered - r.time, 3), r.status, r.client[1])
            for r in master.requests if r.time >= since]
    warnings.warn(f"{name}: the test master's first answer was late for the agent; the "
                  f"master's view (arrived s, answered in s, status, port): {seen}",
                  stacklevel=2)
    return seen


def docker_containers(dockerd: Dockerd) -> list[dict[str, Any]]:
    """Docker's own list of every container, as docs/design.md §1 maps it into a registration."""
    out = []
    for c in dockerd.api("/containers/json", params={"all": 1}):
        name = (c.get("Names") or ["/"])[0].lstrip("/")
        out.append({"id": c["Id"], "name": name, "image": c["Image"],
                    "labels": c.get("Labels") or {}})
    return sorted(out, key=lambda c: c["id"])


#: File system types df shows that are not disks of the node (docs/design.md §1: "real
#: filesystems only").
PSEUDO_FS = {"tmpfs", "devtmpfs", "overlay", "squashfs", "proc", "sysfs", "cgroup",
             "cgroup2", "devpts", "mqueue", "fuse.lxcfs", "nsfs", "ramfs", "autofs",
             "efivarfs", "tracefs", "debugfs", "securityfs", "pstore", "bpf", "configfs",
             "hugetlbfs", "fusectl", "binfmt_misc", "rpc_pipefs", "nfsd"}


def df_real(node: Node) -> dict[str, dict[str, Any]]:
    """The node's disks as docs/design.md §1 and docs/registration.md define them, from
    ``df -a`` inside
    the root: real filesystems mounted on directories, one mount point per filesystem
    (device number), the shortest. Mount point → source, type, device, size, used.

    Not df's own pick (``df`` without ``-a``): among several bind mounts of one device it
    keeps the one nearest the root of the *source* (coreutils' "source_below_root"), which
    in a container whose every real mount is a bind (nspawn) may be a bind-mounted file
    such as /run/docker.sock, which is not a disk.
    """
    out = node.run(["df", "-a", "-B1", "--output=source,fstype,target,size,used"]).stdout
    rows = {}
    for line in out.splitlines()[1:]:
        source, fstype, target, size, used = line.split()
        if fstype not in PSEUDO_FS:
            rows[target] = {"source": source, "fstype": fstype, "size": int(size),
                            "used": int(used)}
    if not rows:
        return {}
    stat = node.run(["stat", "-c", "%d|%F|%n", *rows]).stdout
    by_dev: dict[str, list[str]] = {}
    for line in stat.splitlines():
        dev, kind, target = line.split("|", 2)
        if kind == "directory":
            rows[target]["dev"] = int(dev)
            by_dev.setdefault(dev, []).append(target)
    return {min(ts, key=lambda t: (len(t), t)): rows[min(ts, key=lambda t: (len(t), t))]
            for ts in by_dev.values()}


def df_of(node: Node, path: str) -> tuple[str, int, int]:
    """``df -B1 --output=target,size,used PATH``: the mount holding PATH and its figures."""
    out = node.run(["df", "-B1", "--output=target,size,used", path]).stdout.splitlines()
    target, size, used = out[-1].split()
    return target, int(size), int(used)


def df_default(node: Node) -> list[str]:
    """df's own view without -a (for the report: what an operator sees)."""
    return node.run(["df", "-B1", "--output=source,fstype,target,size,used"]
                    ).stdout.splitlines()
