"""The frozen program (make frozen) where there is no Python: a bare Debian 11 root.

packaging/smoke-frozen.sh proves --version, --check-config, --once --dry-run, https with
a private CA, psutil and --daemon there; this test adds a real registration: the frozen
program in that root reaches the tests' real dockerd through its socket bound in, and
the real master on the loopback it shares with the host; and, with the loader's own
trace (LD_DEBUG=libs), that every library the program loads there is its bundled copy in
_internal/ whenever it bundles one (the payload has no RUNPATH to point elsewhere).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import roots
from support.frozen import FROZEN, require_frozen
from support.master import Master

pytestmark = pytest.mark.packages
ROOT = Path(__file__).resolve().parent.parent
BARE = Path(os.environ.get("DM_BAREROOT", "/var/cache/dm-agent/bareroot-bullseye"))
SECRET = "frozen-secret-4Qz"


@pytest.fixture(scope="module")
def bare_root() -> Path:
    require_frozen()
    proc = subprocess.run([str(ROOT / "packaging" / "smoke-frozen.sh")], capture_output=True,
                          text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (BARE / "etc" / "debian_version").read_text().startswith("11.")
    return BARE


def in_bare(root: Path, socket: str, command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run in the cached root, the onedir and the Docker socket bound in for this process."""
    return roots.chroot_run(root, command, binds={FROZEN: "/opt/dm-agent",
                                                  socket: "/run/docker.sock"})


def test_no_python_in_the_bare_root(bare_root: Path) -> None:
    for name in ("python3", "python3.9", "python"):
        assert not (bare_root / "usr" / "bin" / name).exists()


def test_frozen_once_against_real_docker_and_master(bare_root: Path, dockerd: Any,
                                                    master_factory: Any) -> None:
    master: Master = master_factory(secret=SECRET)
    proc = in_bare(bare_root, str(dockerd.socket_path),
                   ["/opt/dm-agent/dm-agent", "--once", "-d", "unix:///run/docker.sock",
                    "-m", master.url, "-s", SECRET, "-t", "3"])
    assert proc.returncode == 0, proc.stderr
    (req,) = master.requests
    assert req.valid, req.errors
    assert req.query == {"ttl": ["6"]} and req.header("X-Auth-Node") == SECRET
    assert req.json["name"] == dockerd.info()["Name"]
    truth = dockerd.api("/containers/json", params={"all": 1})
    assert {c["id"] for c in req.json["containers"]} == {c["Id"] for c in truth}
    assert req.json["labels"] == dockerd.labels
    assert SECRET not in proc.stdout + proc.stderr


def test_frozen_check_config_and_version_in_the_bare_root(bare_root: Path, dockerd: Any) -> None:
    from dm_agent import __version__

    proc = in_bare(bare_root, str(dockerd.socket_path), ["/opt/dm-agent/dm-agent", "--version"])
    assert proc.returncode == 0 and proc.stdout.strip() == f"dm-agent {__version__}"
    proc = in_bare(bare_root, str(dockerd.socket_path),
                   ["/opt/dm-agent/dm-agent", "--check-config", "-t", "0"])
    assert proc.returncode == 78 and "invalid timeout = '0'" in proc.stderr


def test_every_bundled_library_loads_from_internal(bare_root: Path, dockerd: Any) -> None:
    internal = FROZEN / "_internal"
    bundled = {f.name for f in internal.rglob("*") if f.is_file() and ".so" in f.name}
    proc = in_bare(bare_root, str(dockerd.socket_path),
                   ["/usr/bin/env", "LD_DEBUG=libs", "/opt/dm-agent/dm-agent", "--once",
                    "--dry-run", "-d", "unix:///run/docker.sock"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # "  1234:\tcalling init: /opt/dm-agent/_internal/libssl.so.3"
    loaded = set(re.findall(r"calling init: (\S+)", proc.stderr))
    names = {Path(p).name for p in loaded}
    for lib in ("libpython", "libssl.so.3", "libcrypto.so.3", "_ssl.", "_psutil_linux"):
        assert any(n.startswith(lib) for n in names), f"{lib} was not loaded: {sorted(loaded)}"
    # The bootloader's own libraries (DT_NEEDED of the executable: glibc's and libz) are
    # loaded by ld.so before the bootloader runs, hence from the system (payload-deps.sh
    # makes them the packages' dependencies); everything else bundled must come from
    # _internal/.
    dyn = subprocess.run(["readelf", "-d", str(FROZEN / "dm-agent")], capture_output=True,
                         text=True, check=True).stdout
    bootloader_needs = set(re.findall(r"\(NEEDED\)\s+Shared library: \[(\S+)\]", dyn))
    assert bootloader_needs, dyn
    foreign = sorted(p for p in loaded if Path(p).name in bundled - bootloader_needs
                     and not p.startswith("/opt/dm-agent/_internal/"))
    assert not foreign, f"bundled libraries loaded from outside _internal/: {foreign}"
    system = sorted(p for p in loaded if not p.startswith("/opt/dm-agent/"))
    print("\n".join(["from the system:", *system]))
    glibc = r"/(libc|libm|libdl|libpthread|librt|libutil|ld-linux-x86-64)\.so"
    assert all(re.search(glibc, p) or Path(p).name in bootloader_needs for p in system), system
