"""The built packages: .deb, .rpm, the apt and yum repositories, as files.

Every check of a package runs for both architectures, amd64 (x86_64) and arm64 (aarch64):
the ``arch`` fixture parametrizes them. The arm64 payload's programs run here through
qemu-user (binfmt_misc), with the loader and libc of the arm64 build root
(QEMU_LD_PREFIX): that proves the program starts, not how it behaves on real hardware.

Session fixtures build what the tests inspect, once per run, from this tree:

- the frozen onedir and the tarball (``packaging/freeze.sh``) only when they are missing
  or hold another version (a cold freeze takes minutes; it needs root);
- the .deb, the .rpm and ``dist/repo/`` (``packaging/build-{deb,rpm,repo}.sh``) always,
  so that what is checked is what this tree builds (seconds each).

Then: paths, modes, owners and conffile marks of both packages, their dependencies (the
glibc floor is recomputed here from the payload's ELF files), the payload byte for byte,
no RUNPATH or RPATH in it, lintian (0 errors, 0 warnings) and rpmlint (0 errors), every
override and filter with its reason, the bill of materials (validated by CycloneDX's
validator, complete, the same in every place it ships), the licence files, the
repositories' signatures (and that a forged one fails), that a release refuses the
throwaway key, apt reading the signed repository, and the extracted program running on
this host. Installing the packages into booted systems is the lifecycle tests' job; that
two builds are identical is test_reproducible.py's.

Nothing is skipped: a missing tool fails the test, naming the Debian package to install.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import marshal
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.elf import elf_header, is_elf

pytestmark = pytest.mark.packages

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging"
DIST = REPO / "dist"
GLIBC_SUPPORTED = (2, 31)  # Debian 11: the newest glibc the payload may need

TOOLS = {
    "dpkg-deb": "dpkg",
    "dpkg-buildpackage": "dpkg-dev",
    "dh": "debhelper",
    "lintian": "lintian",
    "rpm": "rpm",
    "rpmbuild": "rpm",
    "rpmsign": "rpm",
    "rpm2cpio": "rpm2cpio",
    "rpmlint": "rpmlint",
    "reprepro": "reprepro",
    "createrepo_c": "createrepo-c",
    "gpg": "gnupg",
    "gpgv": "gpgv",
    "objdump": "binutils",
    "cpio": "cpio",
    "apt-get": "apt",
    "man": "man-db",
    "readelf": "binutils",
    "shellcheck": "shellcheck",
    "openssl": "openssl",
}


def version() -> str:
    text = (REPO / "dm_agent/__init__.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    assert m, "no __version__ in dm_agent/__init__.py"
    return m.group(1)


VERSION = version()


@dataclass(frozen=True)
class Arch:
    """One architecture's products, by the names packaging/ gives them (amd64's have no
    suffix: they predate arm64)."""

    name: str  # Debian's name: amd64, arm64
    machine: str  # uname -m, rpm's: x86_64, aarch64
    e_machine: int  # the ELF header's: 62, 183

    @property
    def amd64(self) -> bool:
        return self.name == "amd64"

    @property
    def frozen(self) -> Path:
        return REPO / ("build/frozen" if self.amd64 else f"build/frozen-{self.name}") / "dm-agent"

    @property
    def deb(self) -> Path:
        return DIST / f"dm-agent_{VERSION}_{self.name}.deb"

    @property
    def rpm(self) -> Path:
        return DIST / f"dm-agent-{VERSION}-1.{self.machine}.rpm"

    @property
    def tarball(self) -> Path:
        return DIST / f"dm-agent-{VERSION}-linux-{self.machine}.tar.gz"

    @property
    def sbom(self) -> Path:
        return DIST / (f"dm-agent-{VERSION}.cdx.json" if self.amd64
                       else f"dm-agent-{VERSION}-{self.machine}.cdx.json")

    def env(self) -> dict[str, str]:
        """An environment to run this architecture's programs here (without DM_AGENT_*
        settings, so that only the file counts): an aarch64 one through qemu-user, with
        the arm64 build root's loader and libc."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DM_AGENT_")}
        if not self.amd64 and os.uname().machine != self.machine:
            env["QEMU_LD_PREFIX"] = build_root(self)
        return env


ARCHES = (Arch("amd64", "x86_64", 62), Arch("arm64", "aarch64", 183))


@functools.cache
def build_root(arch: Arch) -> str:
    script = "buildroot.sh" if arch.amd64 else f"buildroot-{arch.name}.sh"
    return subprocess.run([PACKAGING / script, "--path"], capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def run(cmd: list[str | Path], *, check: bool = True, timeout: float = 600,
        **kw: object) -> subprocess.CompletedProcess[str]:
    """Run, capture text output; on failure (check) fail the test with both outputs."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                       timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {p.returncode}\n"
                    f"--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}", pytrace=False)
    return p  # type: ignore[no-any-return]


def run_bytes(cmd: list[str | Path], timeout: float = 600) -> bytes:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {p.returncode}: {p.stderr!r}",
                    pytrace=False)
    return p.stdout


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def glibc_floor(onedir: Path) -> tuple[int, int]:
    """The highest GLIBC_x.y symbol version any ELF file of the payload needs."""
    top = (0, 0)
    for f in sorted(onedir.rglob("*")):
        if f.is_file() and not f.is_symlink() and is_elf(f):
            out = run(["objdump", "-T", f]).stdout
            for major, minor in re.findall(r"GLIBC_(\d+)\.(\d+)", out):
                top = max(top, (int(major), int(minor)))
    assert top != (0, 0), f"no GLIBC_ symbol versions in {onedir}"
    return top


def payload_md5s(onedir: Path) -> dict[str, str]:
    return {str(f.relative_to(onedir)): md5(f)
            for f in sorted(onedir.rglob("*")) if f.is_file() and not f.is_symlink()}


# --- fixtures: build once per session ---------------------------------------------------


@pytest.fixture(scope="session")
def tools() -> None:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        pytest.fail(f"missing tools: apt-get install {' '.join(missing)}", pytrace=False)


@pytest.fixture(scope="session", params=ARCHES, ids=[a.name for a in ARCHES])
def arch(request: pytest.FixtureRequest) -> Arch:
    return request.param  # type: ignore[no-any-return]


@functools.cache
def freeze(arch: Arch) -> Path:
    """The onedir, its bill of materials and the tarball of this version; frozen here
    when absent or stale."""
    program = arch.frozen / "dm-agent"
    current = False
    if os.access(program, os.X_OK) and arch.tarball.is_file() and arch.sbom.is_file() and \
            arch.frozen.with_name("dm-agent.cdx.json").is_file():
        p = run([program, "--version"], check=False, env=arch.env())
        current = p.returncode == 0 and p.stdout.strip() == f"dm-agent {VERSION}"
        # ... and the tarball holds the same program (both come from one freeze.sh run)
        with tarfile.open(arch.tarball) as tf:
            member = tf.extractfile(f"dm-agent-{VERSION}/dm-agent")
            current = current and member is not None and member.read() == program.read_bytes()
    if not current:
        if os.geteuid() != 0:
            pytest.fail("the frozen program is missing or stale and packaging/freeze.sh "
                        "needs root: run the tests as root", pytrace=False)
        run([PACKAGING / "freeze.sh", "--arch", arch.name], timeout=3 * 3600)
    assert os.access(program, os.X_OK) and arch.tarball.is_file()
    return arch.frozen


@dataclass
class Built:
    path: Path
    log: str


@functools.cache
def build(arch: Arch, kind: str) -> Built:
    """build-deb.sh or build-rpm.sh for arch, once per session."""
    freeze(arch)
    want = arch.deb if kind == "deb" else arch.rpm
    p = run([PACKAGING / f"build-{kind}.sh", "--arch", arch.name], timeout=1800)
    assert Path(p.stdout.strip()) == want and want.is_file(), p.stdout
    return Built(want, p.stderr)


@pytest.fixture(scope="session")
def frozen(tools: None, arch: Arch) -> Path:
    return freeze(arch)


@pytest.fixture(scope="session")
def deb(tools: None, arch: Arch) -> Built:
    return build(arch, "deb")


@pytest.fixture(scope="session")
def rpm(tools: None, arch: Arch) -> Built:
    return build(arch, "rpm")


@pytest.fixture(scope="session")
def repo(tools: None) -> Path:
    """dist/repo/, of the packages of every architecture."""
    for a in ARCHES:
        build(a, "deb")
        build(a, "rpm")
    p = run([PACKAGING / "build-repo.sh"], timeout=600)
    out = Path(p.stdout.strip())
    assert out == DIST / "repo"
    return out


@pytest.fixture(scope="session")
def payload(deb: Built, arch: Arch) -> Path:
    """The onedir the packages were built from (build-deb.sh's snapshot of build/frozen)."""
    snap = REPO / f"build/deb{'' if arch.amd64 else '-' + arch.name}/payload"
    assert (snap / "dm-agent").is_file()
    return snap


@pytest.fixture(scope="session")
def deb_tree(deb: Built) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dm-deb-") as tmp:
        run(["dpkg-deb", "-x", deb.path, tmp])
        run(["dpkg-deb", "-e", deb.path, Path(tmp) / "DEBIAN"])
        yield Path(tmp)


@pytest.fixture(scope="session")
def rpm_tree(rpm: Built) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dm-rpm-") as tmp:
        cpio = run_bytes(["rpm2cpio", rpm.path])
        subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=cpio,
                       cwd=tmp, check=True, timeout=300)
        yield Path(tmp)


# --- .deb ------------------------------------------------------------------------------


@dataclass
class Entry:
    mode: str
    owner: str
    size: int
    path: str
    target: str | None


def deb_entries(path: Path) -> dict[str, Entry]:
    entries = {}
    for line in run(["dpkg-deb", "-c", path]).stdout.splitlines():
        mode, owner, size, _date, _time, rest = line.split(None, 5)
        name, _, target = rest.partition(" -> ")
        name = "/" + name.removeprefix("./").rstrip("/")
        entries[name] = Entry(mode, owner, int(size), name, target or None)
    return entries


def test_deb_control_fields(deb: Built, payload: Path, arch: Arch) -> None:
    fields = run(["dpkg-deb", "-f", deb.path]).stdout
    print(fields)
    info = dict(re.findall(r"^(\S+): (.*)$", fields, re.M))
    assert info["Package"] == "dm-agent"
    assert info["Version"] == VERSION
    assert info["Architecture"] == arch.name
    floor = glibc_floor(payload)
    assert floor <= GLIBC_SUPPORTED, f"the payload needs GLIBC_{floor}, above Debian 11's"
    depends = [d.strip() for d in info["Depends"].split(",")]
    assert f"libc6 (>= {floor[0]}.{floor[1]})" in depends, depends
    assert any(d.startswith("systemd") for d in depends), "systemd-sysusers runs in postinst"
    assert not re.search(r"python|libssl|libffi|zlib|libbz2|liblzma",
                         info["Depends"] + info.get("Pre-Depends", "")), (
        "the payload bundles Python and its libraries: nothing of them is a dependency")
    assert "Recommends" not in info and "Pre-Depends" not in info


def test_deb_contents_modes_owners(deb: Built, payload: Path) -> None:
    entries = deb_entries(deb.path)
    for e in entries.values():
        assert e.owner == "root/root", e
        if not e.mode.startswith("l"):  # no group/other write, no setuid/setgid
            assert not re.match(r"^.....w|^........w|^...s|^......s", e.mode), e
    ini = entries["/etc/dm-agent.ini"]
    # dpkg unpacks it before the dm-agent group exists; postinst makes it 0640 root:dm-agent
    sample = REPO / "dm_agent/data/dm-agent.ini"
    assert (ini.mode, ini.size) == ("-rw-r--r--", sample.stat().st_size)
    link = entries["/usr/bin/dm-agent"]
    assert link.mode.startswith("l") and link.target == "../lib/dm-agent/dm-agent"
    assert entries["/usr/lib/dm-agent/dm-agent"].mode == "-rwxr-xr-x"
    # /usr/lib, not the /lib alias of merged-/usr systems (DEP 17)
    assert entries["/usr/lib/systemd/system/dm-agent.service"].mode == "-rw-r--r--"
    assert not [p for p in entries if p == "/lib" or p.startswith("/lib/")]
    assert entries["/usr/lib/sysusers.d/dm-agent.conf"].mode == "-rw-r--r--"
    for doc in ("copyright", "changelog.gz", "README.md.gz", "dm-agent.ini"):
        assert entries[f"/usr/share/doc/dm-agent/{doc}"].mode == "-rw-r--r--", doc
    assert entries["/usr/share/man/man8/dm-agent.8.gz"].mode == "-rw-r--r--"
    # the whole onedir, and nothing else below /usr/lib/dm-agent
    files = {p for p, e in entries.items() if p.startswith("/usr/lib/dm-agent/")
             and not e.mode.startswith("d")}
    assert files == {f"/usr/lib/dm-agent/{rel}" for rel in payload_md5s(payload)}
    # nothing outside the documented layout
    allowed = re.compile(r"^/(etc/dm-agent\.ini|usr/bin/dm-agent|usr/lib/dm-agent(/.*)?|"
                         r"usr/lib/systemd/system/dm-agent\.service|"
                         r"usr/lib/sysusers\.d/dm-agent\.conf|usr/lib/tmpfiles\.d/dm-agent\.conf|"
                         r"usr/share/doc/dm-agent/.*|usr/share/man/man8/dm-agent\.8\.gz|"
                         r"usr/share/lintian/overrides/dm-agent)$")
    stray = [p for p, e in entries.items() if not e.mode.startswith("d") and not allowed.match(p)]
    assert not stray, stray


def test_deb_conffiles_and_scripts(deb_tree: Path) -> None:
    ctl = deb_tree / "DEBIAN"
    assert (ctl / "conffiles").read_text().split() == ["/etc/dm-agent.ini"]
    postinst = (ctl / "postinst").read_text()
    # users first (dh_installsysusers), then enable + start (dh_installsystemd), then the mode
    i_users = postinst.index("systemd-sysusers ${DPKG_ROOT:+--root=\"$DPKG_ROOT\"} dm-agent.conf")
    i_enable = postinst.index("deb-systemd-helper enable 'dm-agent.service'")
    i_start = postinst.index("deb-systemd-invoke $_dh_action 'dm-agent.service'")
    i_mode = postinst.index('chmod 0640 "$conf"')
    assert i_users < i_enable < i_start < i_mode
    assert "dpkg-statoverride" in postinst and 'chgrp "$gid" "$conf"' in postinst
    assert "#DEBHELPER#" not in postinst
    assert "deb-systemd-invoke stop 'dm-agent.service'" in (ctl / "prerm").read_text()
    postrm = (ctl / "postrm").read_text()
    assert "deb-systemd-helper purge 'dm-agent.service'" in postrm
    assert 'rm -rf "${DPKG_ROOT:-}/var/lib/dm-agent"' in postrm and "#DEBHELPER#" not in postrm
    # private libraries: no shlibs, no ldconfig trigger
    assert not (ctl / "shlibs").exists() and not (ctl / "triggers").exists()
    for script in ("postinst", "prerm", "postrm"):
        run(["sh", "-n", ctl / script])
    run(["shellcheck", "-s", "sh", "-e", "SC2016", ctl / "postinst", ctl / "postrm"])


def test_deb_postinst_conffile_mode(deb_tree: Path, tmp_path: Path) -> None:
    """The postinst's mode fix, run against a scratch root (DPKG_ROOT): set while the
    file is as dpkg left it, not over an admin's mode, not over a statoverride."""
    postinst = (deb_tree / "DEBIAN/postinst").read_text()
    block = postinst[postinst.index('if [ "$1" = configure ]; then\n\t# /etc/dm-agent.ini'):]
    script = "set -e\nconf=${DPKG_ROOT:-}/etc/dm-agent.ini\n" + block
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/statoverride").write_text("")
    (root / "etc/group").write_text("root:x:0:\ndm-agent:x:987:\n")
    ini = root / "etc/dm-agent.ini"

    def configure(mode: int) -> tuple[int, int]:
        ini.write_text((REPO / "dm_agent/data/dm-agent.ini").read_text())
        os.chown(ini, 0, 0)
        ini.chmod(mode)
        p = run(["sh", "-c", script, "postinst", "configure", ""],
                env={**os.environ, "DPKG_ROOT": str(root)})
        assert "set 'master'" in p.stderr  # the shipped file has no master
        st = ini.stat()
        return st.st_gid, stat.S_IMODE(st.st_mode)

    assert configure(0o644) == (987, 0o640)
    assert configure(0o600) == (0, 0o600)  # an admin's choice stays
    (root / "var/lib/dpkg/statoverride").write_text("root root 0644 /etc/dm-agent.ini\n")
    assert configure(0o644) == (0, 0o644)  # dpkg applies the statoverride, not postinst


def test_deb_postrm_purges_the_state_directory(deb_tree: Path, tmp_path: Path) -> None:
    """The postrm's own part, run against a scratch root (DPKG_ROOT): purge removes
    /var/lib/dm-agent (the gateway's self-issued certificate and key, docs/gateway.md),
    remove keeps it, and neither touches the operator's /etc/dm-agent/."""
    postrm = (deb_tree / "DEBIAN/postrm").read_text()
    block = postrm[postrm.index('if [ "$1" = purge ]; then\n\trm -rf'):]
    root = tmp_path / "root"
    state = root / "var/lib/dm-agent/gateway"
    operator = root / "etc/dm-agent/gateway_password_hash"

    def postrm_run(action: str) -> None:
        run(["sh", "-c", "set -e\n" + block, "postrm", action],
            env={**os.environ, "DPKG_ROOT": str(root)})

    state.mkdir(parents=True)
    (state / "gateway.key").write_text("made by the agent\n")
    operator.parent.mkdir(parents=True)
    operator.write_text("$2b$12$operator\n")
    postrm_run("remove")
    assert (state / "gateway.key").is_file()
    postrm_run("purge")
    assert not (root / "var/lib/dm-agent").exists() and (root / "var/lib").is_dir()
    assert operator.is_file()
    postrm_run("purge")  # again, with nothing left: still exits 0


#: A PEM private key of any kind (PKCS#8, RSA, EC, ENCRYPTED, OPENSSH): issue 20's rule
#: that no key is shared between installs (the original agent shipped its CA's key).
PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


def test_no_private_key_in_the_packages(deb_tree: Path, rpm_tree: Path, tmp_path: Path) -> None:
    """No file of either payload holds a PEM private key; the pattern is first shown to
    find the keys openssl writes, so a scan that finds nothing means something."""
    for algorithm in ("EC", "RSA"):
        key = tmp_path / f"{algorithm}.key"
        opts = ["-pkeyopt", "ec_paramgen_curve:P-256"] if algorithm == "EC" else []
        run(["openssl", "genpkey", "-algorithm", algorithm, *opts, "-out", key])
        assert PEM_PRIVATE_KEY.search(key.read_bytes()), key
        legacy = key.with_suffix(".legacy")  # "BEGIN EC/RSA PRIVATE KEY"
        run(["openssl", "pkey", "-in", key, "-traditional", "-out", legacy])
        assert PEM_PRIVATE_KEY.search(legacy.read_bytes()), legacy
    found = []
    scanned = 0
    for tree in (deb_tree, rpm_tree):
        for path in sorted(tree.rglob("*")):
            if path.is_file() and not path.is_symlink():
                scanned += 1
                if PEM_PRIVATE_KEY.search(path.read_bytes()):
                    found.append(str(path.relative_to(tree)))
    assert scanned > 50, scanned  # both payloads were there to scan
    assert not found, f"private keys shipped: {found}"


def test_deb_payload_byte_for_byte(deb_tree: Path, payload: Path) -> None:
    shipped = payload_md5s(deb_tree / "usr/lib/dm-agent")
    assert shipped == payload_md5s(payload)
    # and dpkg's md5sums agree
    sums = dict(reversed(line.split(None, 1))
                for line in (deb_tree / "DEBIAN/md5sums").read_text().splitlines())
    for rel, digest in shipped.items():
        assert sums[f"usr/lib/dm-agent/{rel}"] == digest


def test_deb_program_runs_here(deb_tree: Path, arch: Arch) -> None:
    for exe in ("usr/lib/dm-agent/dm-agent", "usr/bin/dm-agent"):
        p = run([deb_tree / exe, "--version"], env=arch.env())
        assert p.stdout.strip() == f"dm-agent {VERSION}"
    # the shipped config: valid, but no master, so the unit's ExecCondition skips the start
    p = run([deb_tree / "usr/bin/dm-agent", "--check-config", "-f",
             deb_tree / "etc/dm-agent.ini"], check=False, env=arch.env())
    assert p.returncode == 78, p
    assert "master" in p.stderr
    p = run([deb_tree / "usr/bin/dm-agent", "--once", "--dry-run", "-d",
             "unix:///nonexistent/docker.sock", "-f", deb_tree / "etc/dm-agent.ini"],
            timeout=300, env=arch.env())
    body = json.loads(p.stdout)
    assert body["system"]["memory"]["total"] > 0


def test_deb_changelog_copyright_man(deb_tree: Path, payload: Path) -> None:
    doc = deb_tree / "usr/share/doc/dm-agent"
    first = gzip.decompress((doc / "changelog.gz").read_bytes()).decode().splitlines()[0]
    assert first.startswith(f"dm-agent ({VERSION}) "), first
    assert (doc / "dm-agent.ini").read_bytes() == (REPO / "dm_agent/data/dm-agent.ini").read_bytes()
    copyright_text = (doc / "copyright").read_text()
    assert copyright_text.startswith(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/")
    # every bundled ELF file is named by a Files paragraph of its own, not only by "*"
    patterns = [p for block in re.findall(r"^Files: (.*?)^(?:Copyright|License):",
                                          copyright_text, re.M | re.S)
                for p in block.split() if p != "*"]
    for f in payload.rglob("*"):
        if f.is_file() and is_elf(f):
            rel = "usr/lib/dm-agent/" + str(f.relative_to(payload))
            assert any(Path(rel).match(p) or rel == p or
                       (p.endswith("/*") and rel.startswith(p[:-1])) for p in patterns), (
                f"{rel} is bundled but debian/copyright has no Files paragraph for it")
    man = deb_tree / "usr/share/man/man8/dm-agent.8.gz"
    p = run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", man],
            env={**os.environ, "LC_ALL": "C.UTF-8", "MANROFFSEQ": "", "MANWIDTH": "80"})
    assert p.stderr == "", p.stderr
    text = run(["man", "-l", man], env={**os.environ, "MANWIDTH": "80"}).stdout
    for word in ("--check-config", "SIGHUP", "DM_AGENT_", "/etc/dm-agent.ini", "78", "75"):
        assert word in text, word


def overrides_have_reasons(path: Path, is_override: re.Pattern[str]) -> None:
    prev_comment = False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("#"):
            prev_comment = True
        elif is_override.match(line):
            assert prev_comment, f"{path.name}:{n}: no reason written above: {line}"
        elif not line.strip():
            prev_comment = False


def test_lintian(deb: Built) -> None:
    overrides_have_reasons(REPO / "debian/dm-agent.lintian-overrides", re.compile(r"^dm-agent: "))
    # (--show-overrides would make --fail-on count the overridden tags too)
    p = run(["lintian", "--fail-on", "error,warning", "--pedantic", "-E",
             "--tag-display-limit", "0", deb.path], check=False, timeout=900)
    tags = [t for t in p.stdout.splitlines() if re.match(r"^[EWIPX]: ", t)]
    print("\n".join(tags) or "lintian: no tags")
    assert p.returncode == 0, p.stdout + p.stderr
    assert not [t for t in tags if t[0] in "EW"]
    # an override that no longer matches must go (the reason it states is gone)
    assert not [t for t in tags if "unused-override" in t or "mismatched-override" in t], tags
    assert not re.search(r"\d+ unused overrides?", p.stdout), p.stdout


# --- .rpm ------------------------------------------------------------------------------


def rpmq(path: Path, *args: str) -> str:
    return run(["rpm", "-qp", *args, path]).stdout


def test_rpm_header(rpm: Built, payload: Path, arch: Arch) -> None:
    fmt = "%{NAME}|%{VERSION}|%{RELEASE}|%{ARCH}|%{LICENSE}|%{SIGPGP:pgpsig}"
    name, ver, rel, rpm_arch, lic, _sig = rpmq(rpm.path, "--queryformat", fmt).split("|")
    assert (name, ver, rel, rpm_arch) == ("dm-agent", VERSION, "1", arch.machine)
    assert "Apache-2.0" in lic
    requires = rpmq(rpm.path, "--requires").splitlines()
    print("\n".join(requires))
    floor = glibc_floor(payload)
    assert f"glibc >= {floor[0]}.{floor[1]}" in requires
    assert "systemd" in requires
    # AutoReqProv: no — nothing about the bundled libraries, no Python
    assert not [r for r in requires if ".so" in r or "python" in r.lower()], requires
    provides = rpmq(rpm.path, "--provides").splitlines()
    assert not [p for p in provides if ".so" in p], provides
    assert f"{VERSION}-1" in rpmq(rpm.path, "--changelog").splitlines()[0]


def test_rpm_contents_modes_owners_flags(rpm: Built, payload: Path) -> None:
    fmt = "[%{FILENAMES}\t%{FILEMODES:perms}\t%{FILEUSERNAME}\t%{FILEGROUPNAME}\t" \
          "%{FILEFLAGS:fflags}\t%{FILELINKTOS}\n]"
    rows = {}
    for line in rpmq(rpm.path, "--queryformat", fmt).splitlines():
        name, perms, user, group, flags, target = line.split("\t")
        rows[name] = (perms, user, group, flags, target)
    print(rpmq(rpm.path, "-lv"))
    assert rows["/etc/dm-agent.ini"][:4] == ("-rw-r-----", "root", "dm-agent", "cn")
    assert rpmq(rpm.path, "--configfiles").split() == ["/etc/dm-agent.ini"]
    assert rows["/usr/bin/dm-agent"][0].startswith("l")
    assert rows["/usr/bin/dm-agent"][4] == "../lib/dm-agent/dm-agent"
    assert rows["/usr/lib/dm-agent/dm-agent"][0] == "-rwxr-xr-x"
    assert rows["/usr/lib/systemd/system/dm-agent.service"][0] == "-rw-r--r--"
    assert rows["/usr/lib/sysusers.d/dm-agent.conf"][0] == "-rw-r--r--"
    assert rows["/usr/share/man/man8/dm-agent.8.gz"][3] == "d"
    assert rows["/usr/share/doc/dm-agent/README.md"][3] == "d"
    assert rows["/usr/share/licenses/dm-agent/COPYRIGHT"][3] == "l"
    for name, (perms, user, group, _flags, _t) in rows.items():
        if name != "/etc/dm-agent.ini":
            assert (user, group) == ("root", "root"), name
        if not perms.startswith("l"):
            assert perms[5] != "w" and perms[8] != "w", name
    files = {n for n, r in rows.items() if n.startswith("/usr/lib/dm-agent/")
             and not r[0].startswith("d")}
    assert files == {f"/usr/lib/dm-agent/{rel}" for rel in payload_md5s(payload)}


def test_rpm_scripts(rpm: Built) -> None:
    scripts = rpmq(rpm.path, "--scripts")
    print(scripts)
    sections = dict(re.findall(r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)",
                               scripts, re.M | re.S))
    sysusers = "systemd-sysusers --replace=/usr/lib/sysusers.d/dm-agent.conf -"
    assert sysusers in sections["preinstall"]
    assert "u dm-agent -" in sections["preinstall"]
    assert "systemctl --no-reload preset dm-agent.service" in sections["postinstall"]
    assert "disable --now dm-agent.service" in sections["preuninstall"]
    assert "try-restart dm-agent.service" in sections["postuninstall"]
    for body in sections.values():
        run(["sh", "-n", "-c", body])
    assert rpmq(rpm.path, "--qf", "[%{FILENAMES}\n]").count("80-dm-agent.preset") == 1


def test_rpm_payload_and_program(rpm_tree: Path, payload: Path, arch: Arch) -> None:
    assert payload_md5s(rpm_tree / "usr/lib/dm-agent") == payload_md5s(payload)
    for exe in ("usr/lib/dm-agent/dm-agent", "usr/bin/dm-agent"):
        p = run([rpm_tree / exe, "--version"], env=arch.env())
        assert p.stdout.strip() == f"dm-agent {VERSION}"
    assert (rpm_tree / "usr/lib/systemd/system-preset/80-dm-agent.preset").read_text() \
        .strip().endswith("enable dm-agent.service")
    lic = rpm_tree / "usr/share/licenses/dm-agent"
    assert (lic / "COPYRIGHT").read_bytes() == (REPO / "debian/copyright").read_bytes()
    assert any(lic.glob("Python-*-LICENSE")) and any(lic.glob("openssl-*"))


def test_rpmlint(rpm: Built) -> None:
    rc = REPO / "rpm/dm-agent.rpmlintrc"
    overrides_have_reasons(rc, re.compile(r"^addFilter\("))
    p = run(["rpmlint", "-r", rc, rpm.path], check=False, timeout=600)
    print(p.stdout, p.stderr)
    # unused filters are errors too (rpmlint: unused-rpmlintrc-filter)
    m = re.search(r"(\d+) errors, (\d+) warnings", p.stdout)
    assert m and m.group(1) == "0", p.stdout
    assert p.returncode == 0


# --- repositories and tarball --------------------------------------------------------------


def test_apt_repository_signed(repo: Path, tmp_path: Path) -> None:
    keyring = repo / "dm-agent-archive-keyring.gpg"
    stable = repo / "apt/dists/stable"
    run(["gpgv", "--keyring", keyring, stable / "InRelease"])
    run(["gpgv", "--keyring", keyring, stable / "Release.gpg", stable / "Release"])
    # a forged Release does not verify
    forged = tmp_path / "InRelease"
    forged.write_text((stable / "InRelease").read_text().replace("Suite: stable", "Suite: stolen"))
    assert run(["gpgv", "--keyring", keyring, forged], check=False).returncode != 0
    release = (stable / "Release").read_text()
    assert re.search(r"^Suite: stable$", release, re.M)
    assert re.search(r"^Components: main$", release, re.M)
    assert re.search(r"^Architectures: amd64 arm64$", release, re.M)
    for a in ARCHES:
        # the signed Release covers each architecture's index, which names its .deb
        index = stable / f"main/binary-{a.name}/Packages"
        packages = index.read_text()
        assert f"Version: {VERSION}" in packages and f"Architecture: {a.name}" in packages
        assert hashlib.sha256(build(a, "deb").path.read_bytes()).hexdigest() in packages
        digest = hashlib.sha256(index.read_bytes()).hexdigest()
        assert re.search(rf"^ {digest} +\d+ main/binary-{a.name}/Packages$", release, re.M), a
    assert (repo / "dm-agent-archive-keyring.asc").read_text().startswith(
        "-----BEGIN PGP PUBLIC KEY BLOCK-----")
    sources = (repo / "dm-agent.list").read_text()
    assert "signed-by=/usr/share/keyrings/dm-agent-archive-keyring.gpg" in sources
    assert "arch=" not in sources, "a node of any architecture uses the same line"

    # apt itself, with a private configuration, reads the signed repository as a node of
    # each architecture would, from the same sources line
    for a in ARCHES:
        etc = tmp_path / a.name / "etc"
        (etc / "sources.list.d").mkdir(parents=True)
        (etc / "preferences.d").mkdir()
        (etc / "sources.list").write_text(
            f"deb [signed-by={keyring}] file://{repo / 'apt'} stable main\n")
        state, cache = tmp_path / a.name / "state", tmp_path / a.name / "cache"
        opts = [f"-oDir::Etc={etc}", f"-oDir::Etc::sourcelist={etc / 'sources.list'}",
                f"-oDir::Etc::sourceparts={etc / 'sources.list.d'}",
                f"-oDir::State={state}", f"-oDir::Cache={cache}",
                "-oDir::State::status=/dev/null", "-oAPT::Sandbox::User=root",
                "-oDebug::NoLocking=1", f"-oAPT::Architecture={a.name}",
                f"-oAPT::Architectures={a.name}"]
        (state / "lists/partial").mkdir(parents=True)
        (cache / "archives/partial").mkdir(parents=True)
        p = run(["apt-get", *opts, "update"])
        assert "NO_PUBKEY" not in p.stderr and "not signed" not in p.stderr, p.stderr
        policy = run(["apt-cache", *opts, "policy", "dm-agent"]).stdout
        assert f"Candidate: {VERSION}" in policy, policy
        show = run(["apt-cache", *opts, "show", f"dm-agent={VERSION}"]).stdout
        assert f"Architecture: {a.name}" in show, show


def test_yum_repository_signed(repo: Path, tmp_path: Path) -> None:
    yum = repo / "yum"
    keyring = repo / "dm-agent-archive-keyring.gpg"
    repodata = yum / "repodata"
    run(["gpgv", "--keyring", keyring, repodata / "repomd.xml.asc", repodata / "repomd.xml"])
    repomd = (yum / "repodata/repomd.xml").read_text()
    for kind in ("primary", "filelists", "other"):
        assert f'<data type="{kind}">' in repomd
    primary_file = next((yum / "repodata").glob("*-primary.xml.gz"))
    # the signed repomd.xml pins primary.xml by its sha256
    assert hashlib.sha256(primary_file.read_bytes()).hexdigest() in repomd
    primary = gzip.decompress(primary_file.read_bytes()).decode()
    dbpath = tmp_path / "rpmdb"
    dbpath.mkdir()
    run(["rpm", "--dbpath", dbpath, "--import", repo / "dm-agent-archive-keyring.asc"])
    # signed by the repository's key: "(none)" where an unsigned package has nothing
    keys = run(["gpg", "--homedir", tmp_path, "--show-keys", "--with-colons",
                repo / "dm-agent-archive-keyring.asc"])
    fpr = next(f.split(":")[9] for f in keys.stdout.splitlines() if f.startswith("fpr:"))
    for a in ARCHES:
        # one repository, one package per architecture: dnf takes the node's own
        signed = yum / a.machine / a.rpm.name
        unsigned = build(a, "rpm").path
        assert re.search(rf'<arch>{a.machine}</arch>.*?ver="{re.escape(VERSION)}" rel="1".*?'
                         rf'<location href="{a.machine}/{re.escape(a.rpm.name)}"/>',
                         primary, re.S), a
        check = run(["rpm", "--dbpath", dbpath, "-K", signed]).stdout
        assert "signatures OK" in check, check
        for package, signature in ((signed, rf"RSA/SHA\d+, .+, Key ID {fpr[-16:].lower()}"),
                                   (unsigned, r"\(none\)")):
            sig = rpmq(package, "--qf", "%{RSAHEADER:pgpsig}")
            assert re.fullmatch(signature, sig), (package, sig)
        # the same payload as the unsigned build output
        assert run_bytes(["rpm2cpio", signed]) == run_bytes(["rpm2cpio", unsigned])
    assert len(re.findall(r"<package type=\"rpm\">", primary)) == len(ARCHES)
    text = (repo / "dm-agent.repo").read_text()
    assert "gpgcheck=1" in text and "repo_gpgcheck=1" in text
    assert re.search(r"^baseurl=\S+/yum$", text, re.M), text


def test_tarball(frozen: Path, arch: Arch) -> None:
    with tarfile.open(arch.tarball) as tf:
        names = tf.getnames()
    top = f"dm-agent-{VERSION}"
    assert f"{top}/dm-agent" in names and f"{top}/_internal" in names


# --- the payload's ELF files, the bill of materials, the licence -----------------------


def test_no_runpath_or_rpath_in_the_payload(deb_tree: Path, payload: Path) -> None:
    elves = [f for f in sorted((deb_tree / "usr/lib/dm-agent").rglob("*"))
             if f.is_file() and not f.is_symlink() and is_elf(f)]
    assert len(elves) > 20, elves  # libpython, OpenSSL, lib-dynload, psutil, ...
    found = {}
    for f in elves:
        dyn = run(["readelf", "-d", f]).stdout
        if paths := re.findall(r"\((RUNPATH|RPATH)\)\s+Library r\w+: (\S+)", dyn):
            found[str(f.relative_to(deb_tree))] = paths
    assert not found, f"{len(found)} payload files carry a search path: {found}"
    # and the build's own check agrees
    p = run([PACKAGING / "check-runpath.sh", payload])
    assert f"{len(elves)} ELF files" in p.stdout and "no RUNPATH, no RPATH" in p.stdout, p.stdout


def test_payload_is_all_of_its_architecture(deb_tree: Path, rpm_tree: Path, arch: Arch) -> None:
    """Every ELF file of the .deb and the .rpm is a 64-bit little-endian object of the
    package's own machine, and needs glibc 2.31 at most."""
    for tree in (deb_tree, rpm_tree):
        elves = [f for f in sorted(tree.rglob("*"))
                 if f.is_file() and not f.is_symlink() and is_elf(f)]
        assert len(elves) > 20, elves
        other = {str(f.relative_to(tree)): elf_header(f) for f in elves
                 if elf_header(f) != (2, 1, arch.e_machine)}
        assert not other, f"ELF files not for {arch.machine}: {other}"
        floor = glibc_floor(tree / "usr/lib/dm-agent")
        print(f"{arch.name} {tree.name}: {len(elves)} ELF files, glibc floor {floor}")
        assert floor <= GLIBC_SUPPORTED, f"the payload needs GLIBC_{floor}, above Debian 11's"
    # the build's own check agrees, and fails on the other machine
    p = run([PACKAGING / "check-elf-arch.sh", deb_tree, arch.machine])
    assert f"all {arch.machine}" in p.stdout, p.stdout
    wrong = next(a for a in ARCHES if a != arch)
    p = run([PACKAGING / "check-elf-arch.sh", deb_tree, wrong.machine], check=False)
    assert p.returncode == 1 and f"{arch.machine} (class/data 2 1), expected {wrong.machine}" \
        in p.stderr, p


def pyz_modules(executable: Path) -> set[str]:
    """The modules PyInstaller put into the executable, read from its archive here
    (PyInstaller's CArchive format: a cookie at the end, a table of contents, one PYZ
    entry whose own table of contents is a marshalled list of (module, entry))."""
    data = executable.read_bytes()
    cookie = data.rfind(b"MEI\014\013\012\013\016")
    assert cookie > 0, f"{executable}: no PyInstaller archive"
    fmt = "!8sIIII64s"
    _magic, length, toc_offset, toc_length, _pyvers, _pylib = struct.unpack_from(fmt, data, cookie)
    start = cookie + struct.calcsize(fmt) - length
    toc = data[start + toc_offset:start + toc_offset + toc_length]
    pos = 0
    while pos < len(toc):
        entry_length, offset, *_sizes, typecode = struct.unpack_from("!IIIIBc", toc, pos)
        pos += entry_length
        if typecode == b"z":
            pyz = start + offset
            assert data[pyz:pyz + 4] == b"PYZ\0"
            (pyz_toc,) = struct.unpack_from("!i", data, pyz + 8)
            return {name for name, _entry in marshal.loads(data[pyz + pyz_toc:])}
    pytest.fail(f"{executable}: no PYZ archive in its table of contents")


def bom_components(bom: dict) -> list[dict]:
    """Every component of a CycloneDX document, nested ones and the described one too."""
    out = []
    todo = [bom["metadata"]["component"], *bom.get("components", [])]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.get("components", []))
    return out


def lock_pins() -> dict[str, str]:
    text = (PACKAGING / "requirements.lock").read_text()
    return {re.sub(r"[-_.]+", "-", n).lower(): v
            for n, v in re.findall(r"^([A-Za-z0-9][\w.-]*)==(\S+)", text, re.M)}


def test_sbom_validates_and_lists_every_file_and_python_package(deb: Built, deb_tree: Path,
                                                                arch: Arch) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    sbom = arch.sbom
    text = sbom.read_text()
    bom = json.loads(text)
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.5"
    error = JsonStrictValidator(SchemaVersion.V1_5).validate_str(text)
    assert error is None, f"{sbom} is not valid CycloneDX 1.5: {error}"

    comps = bom_components(bom)
    files = {c["name"]: c["hashes"][0]["content"] for c in comps if c["type"] == "file"}
    libraries = [c for c in bom["components"] if c["type"] != "file"]
    print(f"SBOM: {len(libraries)} components, {len(files)} files")
    # every file of the shipped payload, ELF or not, with its sha256
    onedir = deb_tree / "usr/lib/dm-agent"
    for f in sorted(onedir.rglob("*")):
        if f.is_file() and not f.is_symlink():
            rel = str(f.relative_to(onedir))
            kind = "ELF file" if is_elf(f) else "file"
            assert rel in files, f"the bundled {kind} {rel} is missing from the SBOM"
            assert files[rel] == hashlib.sha256(f.read_bytes()).hexdigest(), rel
    # CPython and OpenSSL, from the tarballs pinned in build-env.sh
    env = (PACKAGING / "build-env.sh").read_text()
    pins = dict(re.findall(r"^(PY_VERSION|PY_SHA256|OSSL_VERSION|OSSL_SHA256)=(\S+)$", env, re.M))
    by_name = {c["name"]: c for c in libraries}
    for name, prefix in (("cpython", "PY"), ("openssl", "OSSL")):
        c = by_name[name]
        assert c["version"] == pins[f"{prefix}_VERSION"]
        assert c["externalReferences"][0]["hashes"][0]["content"] == pins[f"{prefix}_SHA256"]
        assert c.get("components"), f"{name}: no bundled files listed"
    # Debian 11's libraries, by package name and version (libz.so.1 at least)
    debs = [c for c in libraries if c["purl"].startswith("pkg:deb/debian/")]
    assert "zlib1g" in {c["name"] for c in debs}, debs
    for c in debs:
        assert re.match(r"^\d", c["version"]) and c.get("components"), c
    # every third-party module in the executable's archive belongs to a Python package
    # of the lock, at the version it pins
    pinned = lock_pins()
    claimed: dict[str, str] = {}
    for c in libraries:
        if c["purl"].startswith("pkg:pypi/"):
            assert pinned.get(c["name"]) == c["version"], f"{c['name']} {c['version']} unpinned"
            for prop in c.get("properties", []):
                if prop["name"] == "dm-agent:python:import":
                    claimed.update(dict.fromkeys(prop["value"].split(), c["name"]))
    tops = {m.split(".")[0] for m in pyz_modules(onedir / "dm-agent")}
    third_party = sorted(t for t in tops if not t.startswith(("_", "pyimod")) and t != "dm_agent"
                         and t not in sys.stdlib_module_names)
    assert {"requests", "urllib3", "docker", "psutil", "daemon", "lockfile"} <= set(third_party)
    missing = [t for t in third_party if t not in claimed]
    assert not missing, f"modules in the executable that no SBOM component claims: {missing}"
    assert {claimed[t] for t in ("requests", "docker", "daemon")} == \
        {"requests", "docker", "python-daemon"}


def test_sbom_ships_everywhere(deb: Built, deb_tree: Path, rpm_tree: Path, repo: Path,
                               frozen: Path, arch: Arch) -> None:
    sbom = arch.sbom
    want = sbom.read_bytes()
    assert (deb_tree / "usr/share/doc/dm-agent/dm-agent.cdx.json").read_bytes() == want
    assert (rpm_tree / "usr/share/doc/dm-agent/dm-agent.cdx.json").read_bytes() == want
    assert (repo / sbom.name).read_bytes() == want
    run(["gpgv", "--keyring", repo / "dm-agent-archive-keyring.gpg",
         repo / f"{sbom.name}.asc", repo / sbom.name])
    with tarfile.open(arch.tarball) as tf:
        member = tf.extractfile(f"dm-agent-{VERSION}/dm-agent.cdx.json")
        assert member is not None and member.read() == want


def test_licence_files_agree(deb_tree: Path, rpm_tree: Path, rpm: Built, frozen: Path,
                             arch: Arch) -> None:
    text = (REPO / "LICENSE").read_text()
    assert re.match(r"\s*Apache License\s+Version 2\.0, January 2004", text), text[:200]
    assert "END OF TERMS AND CONDITIONS" in text
    assert re.search(r"^license = Apache-2\.0$", (REPO / "setup.cfg").read_text(), re.M)
    copyright_text = (deb_tree / "usr/share/doc/dm-agent/copyright").read_text()
    assert re.search(r"^Files: \*\nCopyright: .*\nLicense: Apache-2\.0$", copyright_text, re.M)
    assert rpmq(rpm.path, "--queryformat", "%{LICENSE}").startswith("Apache-2.0 AND ")
    assert (rpm_tree / "usr/share/licenses/dm-agent/LICENSE").read_text() == text
    with tarfile.open(arch.tarball) as tf:
        member = tf.extractfile(f"dm-agent-{VERSION}/LICENSE")
        assert member is not None and member.read().decode() == text
    bom = json.loads(arch.sbom.read_text())
    assert bom["metadata"]["component"]["licenses"] == [{"license": {"id": "Apache-2.0"}}]


def test_throwaway_repository_says_not_for_nodes(repo: Path) -> None:
    for name in ("dm-agent.list", "dm-agent.repo"):
        assert "throwaway key: not for nodes" in (repo / name).read_text(), name
    assert "not for nodes" in (repo / "apt/dists/stable/Release").read_text()


@pytest.mark.parametrize("release", [{"DM_REPO_URL": "https://packages.example.com/dm-agent"},
                                     {"DM_RELEASE": "1"}])
def test_release_refuses_the_throwaway_key(repo: Path, release: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DM_REPO")} | release
    before = (repo / "apt/dists/stable/InRelease").read_bytes()
    p = run([PACKAGING / "build-repo.sh"], check=False, env=env, timeout=600)
    assert p.returncode == 1, p
    assert "needs the release key" in p.stderr and "DM_REPO_KEY" in p.stderr, p.stderr
    assert "DM_REPO_THROWAWAY=1" in p.stderr, p.stderr
    # refused before anything was touched
    assert (repo / "apt/dists/stable/InRelease").read_bytes() == before
