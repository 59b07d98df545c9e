"""Two builds of this tree give bit-identical products, whatever the umask, directory,
time zone and wall-clock time of the build.

Two clean clones of this tree (its uncommitted changes applied), in different
directories, under umask 0002 and 0022 and different time zones, one with its files'
times older than the commit, each run
``freeze.sh``, ``build-deb.sh`` and ``build-rpm.sh`` one after the other (so at
different times), for amd64 and for arm64, in the cached build roots: the .deb, the
.rpm, the tarball and the bill of materials of each architecture must have the same
sha256. The umask-0002 build's packages must ship
the modes the packaging sets (0755 directories and executables, 0644 the rest, the
rpm's conffile 0640), not group-writable ones. A release from such a clone without
the release key is refused; with DM_REPO_THROWAWAY=1 it is made, and says what it is.

About 7 minutes with warm build roots (an amd64 freeze takes ~20 s, an arm64 one ~2 min
under qemu-user, the packages ~30 s each).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.packages

REPO = Path(__file__).resolve().parents[1]


def version() -> str:
    m = re.search(r'^__version__ = "([^"]+)"$', (REPO / "dm_agent/__init__.py").read_text(), re.M)
    assert m
    return m.group(1)


VERSION = version()
PRODUCTS = (f"dm-agent_{VERSION}_amd64.deb", f"dm-agent-{VERSION}-1.x86_64.rpm",
            f"dm-agent-{VERSION}-linux-x86_64.tar.gz", f"dm-agent-{VERSION}.cdx.json",
            f"dm-agent_{VERSION}_arm64.deb", f"dm-agent-{VERSION}-1.aarch64.rpm",
            f"dm-agent-{VERSION}-linux-aarch64.tar.gz", f"dm-agent-{VERSION}-aarch64.cdx.json")


def sh(script: str, *, cwd: Path, umask: str = "0022", env: dict[str, str] | None = None,
       check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["bash", "-c", f"umask {umask} && {script}"], cwd=cwd, text=True,
                       capture_output=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"{script} (umask {umask}) exited {p.returncode}\n--- stdout\n{p.stdout}"
                    f"\n--- stderr\n{p.stderr[-6000:]}", pytrace=False)
    return p


def clone(dest: Path, umask: str, commit: str, diff: bytes) -> Path:
    """A clean clone of this tree at `commit` with `diff` (its uncommitted changes) applied,
    made under `umask` as a developer's checkout would be (0002: group-writable files)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    sh(f"git clone --quiet --no-hardlinks --no-checkout {REPO} {dest} && "
       f"git -C {dest} checkout --quiet --detach {commit}", cwd=dest.parent, umask=umask)
    if diff:
        subprocess.run(["bash", "-c", f"umask {umask} && git apply --whitespace=nowarn"],
                       cwd=dest, input=diff, check=True, capture_output=True)
    return dest


@dataclass
class Build:
    tree: Path
    umask: str
    log: str

    def sha256(self, name: str) -> str:
        return hashlib.sha256((self.tree / "dist" / name).read_bytes()).hexdigest()


def build(tree: Path, umask: str, tz: str) -> Build:
    # SOURCE_DATE_EPOCH is not passed on: each clone takes it from its last commit
    env = {"TZ": tz, "SOURCE_DATE_EPOCH": ""}
    p = sh(" && ".join(f"packaging/{script} --arch {arch}" for arch in ("amd64", "arm64")
                       for script in ("freeze.sh", "build-deb.sh", "build-rpm.sh")),
           cwd=tree, umask=umask, env=env, timeout=3600)
    return Build(tree, umask, p.stderr)


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Build, Build]]:
    if os.geteuid() != 0:
        pytest.fail("freeze.sh needs root: run the tests as root", pytrace=False)
    # one commit and one diff for both clones, whatever is committed meanwhile
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    diff = subprocess.run(["git", "-C", str(REPO), "diff", commit, "--binary"],
                          capture_output=True, check=True).stdout
    a_dir = tmp_path_factory.mktemp("repro-a")
    b_dir = tmp_path_factory.mktemp("repro-b") / "a/deeper/path"
    a = build(clone(a_dir / "dm-agent", "0002", commit, diff), "0002", "Pacific/Kiritimati")
    b_tree = clone(b_dir / "checkout", "0022", commit, diff)
    # a checkout older than its last commit (one updated by a pull keeps its unchanged
    # files' times): every file a day older than the commit
    sh("t=$(( $(git log -1 --format=%ct) - 86400 )) && "
       "find . -path ./.git -prune -o -exec touch -h -d @$t {} +", cwd=b_tree)
    b = build(b_tree, "0022", "America/Los_Angeles")
    yield a, b


def test_two_builds_are_bit_identical(builds: tuple[Build, Build]) -> None:
    a, b = builds
    assert (a.tree / "packaging/freeze.sh").stat().st_mode & 0o020, "the 0002 clone is not g+w"
    sums = {name: (a.sha256(name), b.sha256(name)) for name in PRODUCTS}
    for name, (x, y) in sums.items():
        print(f"{x}  {name}  ({a.tree})\n{y}  {name}  ({b.tree})")
    differ = [name for name, (x, y) in sums.items() if x != y]
    assert not differ, f"differ between the two builds: {differ} (diffoscope A B shows how)"


@pytest.mark.parametrize("first", [0, 4], ids=["amd64", "arm64"])
def test_modes_set_by_the_packaging_not_the_umask(builds: tuple[Build, Build], first: int) -> None:
    a, _ = builds  # the umask 0002 build
    deb_name, rpm_name, tarball_name = PRODUCTS[first:first + 3]
    deb = a.tree / "dist" / deb_name
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    for line in listing.splitlines():
        mode, _owner, _size, _d, _t, name = line.split(None, 5)
        if mode.startswith("d"):
            assert mode == "drwxr-xr-x", line
        elif mode.startswith("-"):
            assert mode in ("-rwxr-xr-x", "-rw-r--r--"), line
    rpm = a.tree / "dist" / rpm_name
    rows = subprocess.run(["rpm", "-qp", "--queryformat", "[%{FILEMODES:perms} %{FILENAMES}\n]",
                           str(rpm)], capture_output=True, text=True, check=True).stdout
    for line in rows.splitlines():
        mode, name = line.split(" ", 1)
        if name == "/etc/dm-agent.ini":
            assert mode == "-rw-r-----", line
        elif mode.startswith("d"):
            assert mode == "drwxr-xr-x", line
        elif mode.startswith("-"):
            assert mode in ("-rwxr-xr-x", "-rw-r--r--"), line
    with tarfile.open(a.tree / "dist" / tarball_name) as tf:
        for m in tf.getmembers():
            if not m.issym():
                assert m.mode in (0o755, 0o644), (m.name, oct(m.mode))


def test_release_from_a_clone_refuses_then_says_throwaway(builds: tuple[Build, Build]) -> None:
    a, _ = builds
    url = {"DM_REPO_URL": "https://packages.example.com/dm-agent", "DM_REPO_KEY": ""}
    p = sh("packaging/build-repo.sh", cwd=a.tree, env=url, check=False, timeout=600)
    assert p.returncode == 1 and "needs the release key" in p.stderr, p.stderr
    assert not (a.tree / "dist/repo").exists()
    sh("packaging/build-repo.sh", cwd=a.tree, env={**url, "DM_REPO_THROWAWAY": "1"}, timeout=600)
    listing = (a.tree / "dist/repo/dm-agent.list").read_text()
    assert "https://packages.example.com/dm-agent/apt stable main" in listing
    assert "throwaway key: not for nodes" in listing
