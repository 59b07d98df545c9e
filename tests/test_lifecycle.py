"""The service's lifecycle under a real systemd, installed the way operators install it.

Each Debian release's cached root (tests/support/roots.py: Debian 11, 12 and 13, no
Python) is booted once under systemd-nspawn and driven with nsenter through the steps
below, in order, one test function per step; a step that needs an earlier one that
failed fails at once, naming it. A fourth boot (bookworm) installs the .rpm instead.

Around each node: a private real dockerd (tests/support/dockerd.py, Docker ``Name``
``NODE_NAME``, populated) whose socket is bound at /var/run/docker.sock, root:docker 0660
with the GID the package's sysusers gave ``docker`` inside the root; a strict master
(tests/support/master.py) on 127.0.0.1, which the container shares (no private
network), expecting the node's secret; a host directory bound at /srv/data, the one
real filesystem of the node besides its overlay root.

Steps (the issue's numbering):

1. install from the signed apt repository dist/repo (``signed-by=``, a ``file:`` URI),
   with no Python in the root before or after;
2. unconfigured: enabled, skipped by ExecCondition, one journal line saying what to set;
3. configured: ``systemctl start`` returns once the daemon is up; registrations carry
   Docker's own container list; user dm-agent; 0640 root:dm-agent; the secret nowhere;
4. journald: ``-p info`` shows the start, ``-p err`` one line per master outage and
   nothing while all is well, and the agent keeps logging after journald restarts;
5. reload: a new interval reaches the master as ttl = 2 × timeout; a broken edit is
   refused with an error and the running configuration kept; the secret as a systemd
   credential (``LoadCredential=``; ``secret_file`` on systemd 247) wins over the
   file's and shows nowhere;
6. stop within 3 s, SIGKILL restarted after RestartSec, a broken config skipped (no loop);
9. the reported disks are df's (``systemd-analyze verify`` and ``security`` of the same
   unit file are test_systemd_unit.py's, once per release);
7. upgrade to N+1 published in the same signed repository: the edited conffile kept, a
   new process, no registration gap longer than two intervals;
8. remove keeps the configuration, purge removes it (the system user stays).

10. rpm (bookworm): the .rpm's %pre and %post, read from the package, run inside the
    booted root, its files installed by the host's rpm (``--root``); then 2, 3, 4, 5, 6
    and 9 as above.

Needs root, systemd-container, debootstrap (cold roots), docker.io, dpkg-dev, reprepro,
rpm, gnupg, procps: a missing tool fails the tests, naming its package.
``DM_LIFECYCLE_NOTES=path`` appends what each node measured (JSON lines).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import lifecycle, nspawn, roots
from support.dockerd import Dockerd, populate
from support.lifecycle import INI, KEYRING_IN_ROOT, PIDFILE, REPO_IN_ROOT, UNIT, Node
from support.master import Master

pytestmark = pytest.mark.system

#: Docker's Name of the test dockerd: a space and a non-ASCII letter, percent-encoded
NODE_NAME = "dm-lifecycle-node-ü"  # a domain name to the master (non-ASCII passes Guava)
DOCKER_LABELS = {"zone": "lifecycle", "dm.query": "a=b=c"}
RPM_NODE = "bookworm-rpm"
#: every node: the three releases from the apt repository, then bookworm from the .rpm
NODES = (*roots.RELEASES, RPM_NODE)
#: the steps only a .deb node has (upgrade and purge through apt)
DEB_NODES = roots.RELEASES
assert NODES[: len(DEB_NODES)] == DEB_NODES  # one fixture instance per node (see pytest)
UNIT_PATH = f"/usr/lib/systemd/system/{UNIT}"
SKIP_LINE = (r"^dm-agent: master is not set: set 'master = host:port' in \[main\] of "
             r"/etc/dm-agent\.ini")


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pkgs() -> lifecycle.Packages:
    missing = lifecycle.missing_tools()
    if missing:
        pytest.fail(f"missing tools: apt-get install {' '.join(missing)}", pytrace=False)
    try:
        return lifecycle.build_packages()
    except lifecycle.LifecycleError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def docker_engine() -> Iterator[Dockerd]:
    if os.geteuid() != 0:
        pytest.fail("the lifecycle tests need root (dockerd, systemd-nspawn)", pytrace=False)
    d = Dockerd(labels=DOCKER_LABELS, hostname=NODE_NAME)
    try:
        d.start()
        populate(d)
        yield d
    finally:
        d.close()


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    """A host directory bound at /srv/data: a real filesystem inside the node."""
    base = Path(tempfile.mkdtemp(prefix="dm-lifecycle-data.", dir="/var/tmp"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", params=NODES)
def node(
    request: pytest.FixtureRequest, pkgs: lifecycle.Packages, docker_engine: Dockerd,
    data_dir: Path,
) -> Iterator[Node]:
    name = request.param
    release = name.removesuffix("-rpm")
    secret = "s3cr3t-" + secrets.token_hex(12)
    master = Master(secret=secret, expected_version=pkgs.version, expected_name=NODE_NAME)
    master.start()
    binds = [(docker_engine.socket_path, "/var/run/docker.sock"), (data_dir, "/srv/data")]
    try:
        with nspawn.boot(release, binds=binds) as box:
            n = Node(name=name, box=box, master=master, dockerd=docker_engine, secret=secret)
            n.notes["boot_seconds"] = round(box.boot_seconds or 0, 2)
            try:
                yield n
            finally:
                _save_notes(n)
    finally:
        master.stop()
    master.assert_valid()


def _save_notes(n: Node) -> None:
    path = os.environ.get("DM_LIFECYCLE_NOTES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"node": n.name, "passed": sorted(n.passed), **n.notes}) + "\n")


# --- steps ------------------------------------------------------------------------------


def test_install(node: Node, pkgs: lifecycle.Packages) -> None:
    """1. Install as operators do, and no Python comes with it."""
    with node.step("install"):
        assert node.has_python() == [], "the root must have no Python to begin with"
        if node.name == RPM_NODE:
            install_rpm(node, pkgs)
        else:
            install_deb(node, pkgs)
        assert node.has_python() == [], "installing dm-agent brought Python"
        assert node.run(["dm-agent", "--version"]).stdout.strip() == f"dm-agent {pkgs.version}"


def install_deb(node: Node, pkgs: lifecycle.Packages, arch: str = "amd64") -> str:
    """Install from the signed repository as operators do; apt-get install's output.
    *arch*: the node's architecture (tests/test_arm64.py installs the arm64 package)."""
    node.box.copy_in(pkgs.repo, REPO_IN_ROOT)
    node.box.copy_in(pkgs.keyring, KEYRING_IN_ROOT, mode=0o644)
    # The source line build-repo.sh ships (dm-agent.list), its URL pointed at the copy.
    shipped = (pkgs.repo / "dm-agent.list").read_text()
    line = next(ln for ln in shipped.splitlines() if ln.startswith("deb "))
    line = re.sub(r"(\]\s+)\S+(/apt\s)", rf"\1file:{REPO_IN_ROOT}\2", line)
    assert f"signed-by={KEYRING_IN_ROOT}]" in line and f"file:{REPO_IN_ROOT}/apt " in line
    node.box.write("/etc/apt/sources.list.d/dm-agent.list", line + "\n")
    update = node.apt("update")
    assert not re.search(r"^(W|E):|NO_PUBKEY|not signed", update.stderr, re.M), update.stderr
    started = time.monotonic()
    install = node.apt("install", "dm-agent")
    node.notes["apt_install_seconds"] = round(time.monotonic() - started, 1)
    out = install.stdout + install.stderr
    assert f"Setting up dm-agent ({pkgs.version})" in out, out
    # the postinst says what to do next
    assert "dm-agent: set 'master' in /etc/dm-agent.ini" in out, out
    status = node.run(["dpkg-query", "-W", "-f", "${Status} ${Version}", "dm-agent"]).stdout
    assert status == f"install ok installed {pkgs.version}"
    policy = node.run(["apt-cache", "policy", "dm-agent"]).stdout
    assert f"file:{REPO_IN_ROOT}/apt stable/main {arch} Packages" in policy, policy
    return out


def install_rpm(node: Node, pkgs: lifecycle.Packages) -> None:
    """rpm's own steps, each where it is honest to run it: the package's %pre and %post
    (read from its header) run in the booted root with rpm's argument ($1 = 1); the
    files, modes, owners and the rpm database come from a real rpm (the host's, with
    ``--root``: Debian has no rpm to install inside the root, and no network either);
    then the daemon-reload that systemd's own rpm file trigger does on Fedora."""
    root = str(node.box.root)
    scripts = {}
    for tag in ("PREIN", "POSTIN", "PREUN", "POSTUN"):
        fmt = f"%{{{tag}PROG}}\n%{{{tag}}}"
        prog, _, body = subprocess.run(
            ["rpm", "-qp", "--qf", fmt, str(pkgs.rpm)], capture_output=True, text=True,
            check=True).stdout.partition("\n")
        scripts[tag] = (prog, body)
    for tag in ("PREIN", "POSTIN"):
        assert scripts[tag][0] == "/bin/sh", scripts[tag]
    # signature: the key the repository serves, imported into the root's rpm database
    # (Debian's rpm keeps its database in ~/.rpmdb; RPM distributions in /var/lib/rpm)
    rpm_root = ["rpm", f"--root={root}", "--dbpath=/var/lib/rpm"]
    host([*rpm_root, "--import", str(pkgs.keyring_asc)])
    check = host([*rpm_root, "-K", str(pkgs.rpm)])
    assert "signatures OK" in check or "digests signatures OK" in check, check
    run_scriptlet(node, "pre", scripts["PREIN"][1])
    # --nodeps: the root's dpkg database is not an rpm one; --noscripts: they run inside
    host([*rpm_root, "-i", "--nodeps", "--noscripts", str(pkgs.rpm)])
    said = run_scriptlet(node, "post", scripts["POSTIN"][1])
    assert "dm-agent: set 'master' in /etc/dm-agent.ini" in said, said
    node.run(["systemctl", "daemon-reload"])
    assert host([*rpm_root, "-q", "dm-agent"]).strip() == f"dm-agent-{pkgs.version}-1.x86_64"
    # the payload, the unit and everything else as the package lists them
    assert host([*rpm_root, "-V", "--nodeps", "dm-agent"], check=False) == ""
    node.notes["rpm_scriptlets_run_in_root"] = ["%pre", "%post"]


def run_scriptlet(node: Node, what: str, body: str) -> str:
    """Run a scriptlet as rpm does on a first install (``/bin/sh FILE 1``); its output."""
    path = f"/tmp/rpm-{what}.sh"
    node.box.write(path, body, mode=0o700)
    done = node.run(["/bin/sh", path, "1"])
    node.run(["rm", "-f", path])
    return done.stdout + done.stderr


def host(cmd: list[str], *, check: bool = True) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p.stdout + p.stderr


def test_unconfigured(node: Node) -> None:
    """2. Installed, not configured: enabled, skipped with one line, no failure or loop."""
    with node.step("unconfigured", needs=["install"]):
        assert node.run(["systemctl", "is-enabled", UNIT]).stdout.strip() == "enabled"
        assert node.stat(INI) == "640 root:dm-agent"
        if node.name == RPM_NODE:
            # %post applies the presets, it does not start (Fedora's rule): start it now
            assert node.agent_lines() == []
            node.run(["systemctl", "start", UNIT])
        # (the .deb's postinst started it)
        state = node.show("ActiveState", "SubState", "Result", "NRestarts", "ConditionResult")
        node.notes["skipped_state"] = state
        assert state["ActiveState"] == "inactive" and state["SubState"] == "dead", state
        assert state["NRestarts"] == "0", state
        # a skip: Result=exec-condition on 247, 252 and 257 ("success" would do as well);
        # not "failed", and nothing scheduled (SubState dead, not auto-restart)
        assert state["Result"] in ("success", "exec-condition"), state
        assert node.run(["systemctl", "is-failed", UNIT], check=False).returncode != 0
        lines = node.agent_lines()
        assert len(lines) == 1, lines
        assert re.search(SKIP_LINE, lines[0]), lines


def test_configured(node: Node) -> None:
    """3. Configured and started: up when start returns, registering Docker's list."""
    with node.step("configured", needs=["unconfigured"]):
        mark = node.cursor()
        gid = node.give_docker_socket()
        node.configure(timeout=1)
        assert node.stat(INI) == "640 root:dm-agent"  # the editor kept the package's mode
        since = time.monotonic()
        started = time.monotonic()
        node.run(["systemctl", "start", UNIT])
        node.notes["start_seconds"] = round(time.monotonic() - started, 2)
        # Type=forking: start returned, so the daemon is up and its pidfile is written.
        state = node.show("ActiveState", "SubState", "MainPID")
        assert state["ActiveState"] == "active" and state["SubState"] == "running", \
            (state, node.messages(mark))
        pid = state["MainPID"]
        assert node.run(["cat", PIDFILE]).stdout.strip() == pid
        assert not [m for m in node.messages(mark) if "PID file" in m], node.messages(mark)
        assert node.run(["stat", "-c", "%U", f"/proc/{pid}"]).stdout.strip() == "dm-agent"
        groups = re.search(r"^Groups:(.*)$", node.run(["cat", f"/proc/{pid}/status"]).stdout,
                           re.M)
        assert groups and str(gid) in groups.group(1).split(), "not in the docker group"

        reg = node.wait_registration(since, ttl=2)[0]
        assert reg.node_name == NODE_NAME
        assert reg.auth_ok is True  # the master's secret, from the file
        body = reg.json
        assert sorted(body["containers"], key=lambda c: c["id"]) == \
            lifecycle.docker_containers(node.dockerd)
        assert body["labels"] == DOCKER_LABELS
        node.notes["containers"] = len(body["containers"])

        # the secret: nowhere in the journal (every field of every entry), nor in ps
        journal = node.run(["journalctl", "--no-pager", "-o", "export"]).stdout
        assert node.secret not in journal
        ps = host(["ps", "-e", "-ww", "-o", "pid=,args="])
        assert node.secret not in ps
        inside = node.run("cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
        assert node.secret not in inside
        errors = node.agent_lines(mark, priority="err")
        # a first answer of the test's master slower than the 0.5 s read timeout of a 1 s
        # interval happens under CI load (5 of 27 booted nodes over four full runs, never
        # standalone); the agent must then say so once and recover, nothing else
        # (docs/developer-guide.md, *A known intermittent*)
        slow = lifecycle.late_answer_lines(errors, node.master.url)
        assert errors == slow and len(slow) <= 1, errors
        node.notes["late_first_answer"] = slow
        if slow:  # (for the hunt of its cause: the master's side of it)
            node.notes["late_first_answer_master_view"] = lifecycle.late_first_answer(
                node.name, node.master, since)
            node.wait_lines(r"^registration recovered after", after=mark)


def test_journald(node: Node) -> None:
    """4. journalctl -p info shows the start, -p err one line per outage; journald
    restarts and the agent keeps registering and logging."""
    with node.step("journald", needs=["configured"]):
        info = "\n".join(node.messages(priority="info"))
        assert re.search(r"Started (dm-agent\.service - )?DockMaster node agent", info), info
        # (but the one late first answer the configured step may have accepted)
        late = node.notes.get("late_first_answer", [])
        assert [m for m in node.messages(priority="err") if m not in late] == [], \
            "errors while all is well"

        first = outage(node)
        node.notes["outage_err_line"] = first
        pid = node.main_pid()

        mark = node.cursor()
        since = time.monotonic()
        node.run(["systemctl", "restart", "systemd-journald"])
        node.wait_registration(since, count=2)
        second = outage(node)  # logged after the restart: the stream to journald survived
        assert second, "nothing logged after journald's restart"
        assert node.main_pid() == pid
        assert len(node.messages(mark, priority="err")) == 1
        # two outages, two lines in all
        assert len([m for m in node.messages(priority="err") if m not in late]) == 2


def outage(node: Node, seconds: float = 2.0) -> str:
    """Refuse the master's port for *seconds* (several failed attempts at timeout = 1);
    one ERROR line, then one INFO line when it answers again. Returns the ERROR line."""
    mark = node.cursor()
    before = len(node.master.requests)
    node.master.set_mode("refuse")
    try:
        errors = node.wait_lines(r"", after=mark, priority="err", timeout=10)
        time.sleep(seconds)  # retries meanwhile, logged at DEBUG only
    finally:
        node.master.resume()
    recovered = node.wait_lines(r"recovered after \d+ failed attempt", after=mark, timeout=15)
    attempts = int(re.search(r"after (\d+) failed", recovered[0]).group(1))  # type: ignore[union-attr]
    assert attempts >= 2, recovered  # so repeats happened, and were not logged at err
    errs = node.messages(mark, priority="err")
    assert len(errs) == 1, errs
    assert errs == errors
    assert "master" in errs[0].lower() or "127.0.0.1" in errs[0], errs
    info = node.messages(mark, priority="info")
    assert any("recovered" in m for m in info), info
    assert len(node.master.requests) > before
    return errs[0]


def test_reload(node: Node) -> None:
    """5. A new interval applies on reload (ttl = 2 × timeout); a broken edit does not."""
    with node.step("reload", needs=["configured"]):
        node.reload_interval(2)
        pid = node.main_pid()

        # a broken edit: logged, refused, the running configuration kept
        mark = node.cursor()
        shipped = node.run(["cat", "/usr/share/doc/dm-agent/dm-agent.ini"]).stdout
        node.edit_ini(shipped + node.settings_block(timeout=2).replace(
            "timeout = 2", "timeout = soon"))
        node.run(["systemctl", "reload", UNIT])
        errs = node.wait_lines(r"reload failed, keeping the running configuration",
                               after=mark, priority="err")
        assert "timeout" in errs[0], errs
        node.notes["reload_error"] = errs[0]
        assert node.show("ActiveState", "SubState", "MainPID") == {
            "ActiveState": "active", "SubState": "running", "MainPID": str(pid)}
        since = time.monotonic()
        kept = node.wait_registration(since, count=2, timeout=10)
        assert {r.query["ttl"][0] for r in kept} == {"4"}
        assert len(node.messages(mark, priority="err")) == 1

        # back to timeout = 1
        since = time.monotonic()
        node.configure(timeout=1)
        node.run(["systemctl", "reload", UNIT])
        node.wait_registration(since, ttl=2)
        assert node.main_pid() == pid


CREDENTIAL_FILE = "/etc/dm-agent/secret"
CREDENTIAL_DROPIN = f"/etc/systemd/system/{UNIT}.d/credential.conf"
#: systemd 247 (Debian 11) sets up the credentials only for ExecStart=, and any earlier
#: process of a unit with a mount namespace fails to bind them (systemd#18116): our
#: ExecCondition= exits 226/NAMESPACE and the start is skipped. The README's advice there
#: is ``secret_file``. (252 and 257 are fine.)
BROKEN_CREDENTIALS = 247


def systemd_version(node: Node) -> int:
    return int(node.run(["systemctl", "--version"]).stdout.split()[1])


def test_credentials(node: Node) -> None:
    """5b. The secret kept out of the config file and of ``systemctl show``, as the README
    advises: a systemd credential (``LoadCredential=``), which wins over ``secret`` in the
    file; on systemd 247, ``secret_file``. Registrations carry it; neither ``systemctl
    show``, the journal nor ``ps`` holds it; ``--check-config`` names its source."""
    with node.step("credentials", needs=["configured"]):
        version = systemd_version(node)
        credential = version > BROKEN_CREDENTIALS
        node.notes["credentials_systemd"] = version
        # the README's commands, for each case
        install = ["install", "-D", "-m", "0600", "/dev/stdin", CREDENTIAL_FILE]
        if not credential:
            install[2:4] = ["-m", "0640", "-g", "dm-agent"]
        node.run(install, input=node.secret + "\n")
        if credential:
            assert node.stat(CREDENTIAL_FILE) == "600 root:root"
            # the file keeps a wrong secret: the credential must win over it
            extra, source = "", (r"systemd credential "
                                 r"/run/credentials/dm-agent\.service/secret")
            node.run(["sh", "-c", 'mkdir -p "${1%/*}"; cat > "$1"', "sh", CREDENTIAL_DROPIN],
                     input=f"[Service]\nLoadCredential=secret:{CREDENTIAL_FILE}\n")
        else:
            assert node.stat(CREDENTIAL_FILE) == "640 root:dm-agent"
            extra = f"secret_file = {CREDENTIAL_FILE}\n"
            source = rf"{INI} \[main\] secret_file: secret_file {CREDENTIAL_FILE}"
        node.edit_ini(node.run(["cat", "/usr/share/doc/dm-agent/dm-agent.ini"]).stdout
                      + node.settings_block(timeout=1, extra=extra).replace(
                          f"secret = {node.secret}", "secret = not-the-node-secret"))
        try:
            node.run(["systemctl", "daemon-reload"])
            mark = node.cursor()
            since = time.monotonic()
            node.run(["systemctl", "restart", UNIT])
            try:
                regs = node.wait_registration(since, count=2)
            except AssertionError as e:
                raise AssertionError(f"{e}\n" + "\n".join(node.messages(mark))) from None
            assert all(r.auth_ok for r in node.registrations_since(since)), \
                [(r.status, r.auth_ok) for r in node.registrations_since(since)]
            assert all(r.auth_ok for r in regs)
            pid = node.main_pid()
            environ = node.run(["cat", f"/proc/{pid}/environ"]).stdout.split("\0")
            assert credential == any(v.startswith("CREDENTIALS_DIRECTORY=") for v in environ)
            # what an operator sees: the source, not the value
            check = node.run(["setpriv", "--reuid=dm-agent", "--regid=dm-agent",
                              "--init-groups", "env", *[v for v in environ if "=" in v],
                              "dm-agent", "--check-config", "-f", INI])
            line = re.search(rf"^secret = \*+  ; {source}$", check.stdout, re.M)
            assert line, check.stdout
            node.notes["credentials_check_config"] = line.group(0)
            shown = node.run(["systemctl", "show", "--all", UNIT]).stdout
            assert node.secret not in shown
            assert (CREDENTIAL_DROPIN in node.show("DropInPaths")["DropInPaths"]) == credential
            journal = node.run(["journalctl", "--no-pager", "-o", "export"]).stdout
            assert node.secret not in journal
            assert node.secret not in host(["ps", "-e", "-ww", "-o", "pid=,args="])
            assert node.agent_lines(mark, priority="err") == []
        finally:
            node.run(["rm", "-f", CREDENTIAL_DROPIN, CREDENTIAL_FILE])
            node.run(["systemctl", "daemon-reload"])
            node.configure(timeout=1)
            node.run(["systemctl", "restart", UNIT])
        node.wait_registration(time.monotonic())


GATEWAY_PASSWORD = "lifecycle gateway password"


def test_gateway(node: Node) -> None:
    """5c. The gateway under the unit's sandbox: with ``gateway`` and a hash, the agent
    issues itself a certificate in its StateDirectory (0600, the dm-agent user's), serves
    Docker's API over TLS with Basic auth (a wrong password is 401), registers only its
    https address, and ``dm-agent status`` shows the listener and the certificate."""
    with node.step("gateway", needs=["configured"]):
        import bcrypt

        with socket.socket() as probe:  # the node shares the host's network
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        hashed = bcrypt.hashpw(GATEWAY_PASSWORD.encode(), bcrypt.gensalt(4)).decode()
        pid = node.main_pid()
        node.configure(timeout=1, extra=f"gateway = 127.0.0.1:{port}\n"
                                        f"gateway_password_hash = {hashed}\n")
        try:
            mark = node.cursor()
            # a reload turns it on (and off again below): no start counts against the
            # unit's start limit, which the next step's kills need
            node.run(["systemctl", "reload", UNIT])
            node.wait_lines(rf"^gateway: listening on 127\.0\.0\.1:{port} ", after=mark)
            since = time.monotonic()
            regs = node.wait_registration(since, count=2)
            assert node.main_pid() == pid
            # one address, the gateway's (on loopback: the host's IP, as without it)
            (address,) = {r.json["address"] for r in regs}
            assert address.startswith("https://") and address.endswith(f":{port}"), address
            url = f"https://127.0.0.1:{port}"
            version = host(["curl", "-sS", "-k", "-u", f"admin:{GATEWAY_PASSWORD}",
                            f"{url}/version"])
            assert json.loads(version)["ApiVersion"], version
            containers = json.loads(host(["curl", "-sS", "-k", "-u",
                                          f"admin:{GATEWAY_PASSWORD}",
                                          f"{url}/containers/json?all=1"]))
            assert {c["Id"] for c in containers} == {
                c["id"] for c in lifecycle.docker_containers(node.dockerd)}
            wrong = host(["curl", "-sS", "-k", "-o", "/dev/null", "-w", "%{http_code}",
                          "-u", "admin:wrong", f"{url}/version"])
            assert wrong == "401"
            assert node.stat("/var/lib/dm-agent/gateway/gateway.key") == "600 dm-agent:dm-agent"
            status = node.run(["dm-agent", "status"]).stdout
            assert f"gateway: listening on 127.0.0.1:{port} (full access)" in status, status
            assert "gateway certificate (self-issued): SHA256:" in status
            lines = node.agent_lines(mark)
            assert any(m.startswith(f"gateway: listening on 127.0.0.1:{port}") for m in lines)
            assert any("gateway: authentication failed for 127.0.0.1" in m for m in lines)
            journal = node.run(["journalctl", "--no-pager", "-o", "export"]).stdout
            assert GATEWAY_PASSWORD not in journal and hashed not in journal
            assert node.agent_lines(mark, priority="err") == [], lines
            node.notes["gateway_status"] = status
        finally:
            plain_again(node)
        assert_plain_address(node)


@pytest.mark.parametrize("node", ["bookworm"], indirect=True)
def test_tunnel(node: Node) -> None:
    """5d. The tunnel under the unit's sandbox (Debian 12): the relay a real sshd in a
    namespace of the test's (tests/support/relay.py), its table holding the line
    ``dm-agent tunnel-key`` printed on the node (the key made by root for the dm-agent
    user, 0600); after a reload the node registers the relay's address, its gateway
    answers there with the master's password, status says up, and nothing is logged at
    error."""
    from support.netns import NatSite
    from support.relay import USER, Relay

    with node.step("tunnel", needs=["configured"]):
        import bcrypt

        with socket.socket() as probe:  # the node shares the host's network
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        hashed = bcrypt.hashpw(GATEWAY_PASSWORD.encode(), bcrypt.gensalt(4)).decode()
        with NatSite() as site, Relay(site.relay, site.relay_ip) as relay:
            listen = f"{site.relay_ip}:20011"
            node.configure(timeout=1, extra=f"gateway = 127.0.0.1:{port}\n"
                                            f"gateway_password_hash = {hashed}\n"
                                            f"tunnel = {USER}@{site.relay_ip}\n"
                                            f"tunnel_listen = {listen}\n"
                                            f"tunnel_host_key = {relay.host_key}\n")
            try:
                line = json.loads(node.run(["dm-agent", "tunnel-key", "--json"]).stdout)
                relay.authorize([line["authorized_keys"]])
                assert node.stat("/var/lib/dm-agent/tunnel/id_ed25519") == \
                    "600 dm-agent:dm-agent"
                mark = node.cursor()
                node.run(["systemctl", "reload", UNIT])
                node.wait_lines(rf"^tunnel: up through {USER}@", after=mark, timeout=60)
                since = time.monotonic()
                regs = node.wait_registration(since, count=2)
                assert {r.json["address"] for r in regs} == {f"https://{listen}"}
                version = host(["curl", "-sS", "-k", "-u", f"admin:{GATEWAY_PASSWORD}",
                                f"https://{listen}/version"])
                assert json.loads(version)["ApiVersion"], version
                status = node.run(["dm-agent", "status"]).stdout
                assert "tunnel: up since" in status and f"https://{listen}" in status, status
                assert node.agent_lines(mark, priority="err") == [], node.agent_lines(mark)
                node.notes["tunnel_status"] = status
            finally:
                plain_again(node)
        assert_plain_address(node)


def plain_again(node: Node) -> None:
    """The configured step's settings again, by a reload (no start counts against the
    unit's start limit, which the kills of step 6 need)."""
    node.configure(timeout=1)
    node.run(["systemctl", "reload", UNIT])


def assert_plain_address(node: Node) -> None:
    since = time.monotonic()
    regs = node.wait_registration(since)
    assert not regs[-1].json["address"].startswith("https://")  # off again, by reload


def restart_sec(node: Node) -> float:
    return nspawn.timespan(node.show("RestartUSec")["RestartUSec"])


def test_stop_kill_broken(node: Node) -> None:
    """6. stop within 3 s; SIGKILL → restarted after RestartSec; a broken config before
    start → skipped, no restart loop."""
    with node.step("stop_kill", needs=["configured"]):
        pid = node.main_pid()
        mark = node.cursor()
        started = time.monotonic()
        node.run(["systemctl", "stop", UNIT])
        stop_seconds = time.monotonic() - started
        node.notes["stop_seconds"] = round(stop_seconds, 2)
        assert stop_seconds < 3.0
        assert node.show("ActiveState", "Result") == {"ActiveState": "inactive",
                                                      "Result": "success"}
        assert not node.exists(PIDFILE) and not node.exists("/run/dm-agent")
        assert not node.exists(f"/proc/{pid}")
        assert not [m for m in node.messages(mark) if "SIGKILL" in m or "Killing" in m]

        # SIGKILL: Restart=on-failure brings it back after RestartSec
        node.run(["systemctl", "start", UNIT])
        pid = node.main_pid()
        delay = restart_sec(node)
        node.notes["restart_sec"] = delay
        since = time.monotonic()
        node.run(["sh", "-c", f"kill -9 {pid}"])
        deadline = since + delay + 15
        while True:
            state = node.show("ActiveState", "SubState", "MainPID", "NRestarts")
            if state["ActiveState"] == "active" and state["MainPID"] not in ("0", str(pid)):
                break
            assert time.monotonic() < deadline, f"not restarted: {state}"
            time.sleep(0.1)
        took = time.monotonic() - since
        node.notes["restarted_after_seconds"] = round(took, 2)
        assert took >= delay - 0.2, f"restarted after {took:.1f} s, RestartSec is {delay}"
        assert state["NRestarts"] == "1", state
        assert node.run(["cat", PIDFILE]).stdout.strip() == state["MainPID"]
        node.wait_registration(since + delay)
        assert any("status=9/KILL" in m for m in node.messages(mark)), node.messages(mark)

        # a configuration broken before start: skipped by ExecCondition, no restarts
        node.run(["systemctl", "stop", UNIT])
        mark = node.cursor()
        shipped = node.run(["cat", "/usr/share/doc/dm-agent/dm-agent.ini"]).stdout
        node.edit_ini(shipped + node.settings_block(timeout=1).replace(
            "timeout = 1", "timeout = soon"))
        assert node.run(["systemctl", "start", UNIT], check=False).returncode == 0
        watch_until = time.monotonic() + delay + 1.5  # a restart would have happened
        while True:
            state = node.show("ActiveState", "SubState", "Result", "NRestarts")
            assert state["ActiveState"] == "inactive" and state["SubState"] == "dead", state
            assert state["NRestarts"] == "0", state
            if time.monotonic() > watch_until:
                break
            time.sleep(0.5)
        assert state["Result"] in ("success", "exec-condition"), state
        node.notes["broken_start_state"] = state
        assert node.run(["systemctl", "is-failed", UNIT], check=False).returncode != 0
        lines = node.agent_lines(mark)
        assert len(lines) == 1 and "timeout" in lines[0], lines
        assert not [m for m in node.messages(mark) if "Scheduled restart" in m]

        node.configure(timeout=1)
        node.run(["systemctl", "start", UNIT])
        assert node.show("ActiveState")["ActiveState"] == "active"


def test_disks(node: Node) -> None:
    """9. The disks reported are those df shows, under the unit's sandbox."""
    with node.step("disks", needs=["configured"]):
        reg = node.wait_registration(time.monotonic())[0]
        disks = reg.json["system"]["disks"]
        expected = lifecycle.df_real(node)
        node.notes["disks"] = {"reported": disks, "df -a, one per device": expected,
                               "df": lifecycle.df_default(node)}
        # The overlay root is left out (docs/design.md §1: no overlay), so are the bound files; the
        # one real filesystem mounted on a directory is the host's, at /srv/data.
        assert set(disks) == set(expected) == {"/srv/data"}, (disks, expected)
        for path, disk in disks.items():
            target, size, used = lifecycle.df_of(node, path)
            assert target == path
            assert disk["total"] == size, path
            # the host's disk is busy (other builds): used may move between the two reads
            assert abs(disk["used"] - used) <= size // 100, (path, disk, used)


@pytest.mark.parametrize("node", DEB_NODES, indirect=True)
def test_upgrade(node: Node, pkgs: lifecycle.Packages) -> None:
    """7. N → N+1 from the same signed repository: the edit kept, a new process, no
    registration gap longer than two intervals (the master keeps a node 2 × timeout)."""
    with node.step("upgrade", needs=["configured"]):
        interval = 2
        note = "# the operator's own note, to be kept across upgrades\n"
        since = time.monotonic()
        node.configure(timeout=interval, extra=note)
        node.run(["systemctl", "reload", UNIT])
        node.wait_registration(since, ttl=2 * interval)
        pid = node.main_pid()
        edited = node.run(["cat", INI]).stdout
        mark = node.cursor()
        next_version = f"{pkgs.version}+next1"
        with lifecycle.publish_next_version(pkgs, next_version) as apt_dir:
            node.run(["rm", "-rf", f"{REPO_IN_ROOT}/apt"])
            node.box.copy_in(apt_dir, f"{REPO_IN_ROOT}/apt")
        node.apt("update")
        t0 = time.monotonic()
        upgrade = node.apt("upgrade")
        t1 = time.monotonic()
        out = upgrade.stdout + upgrade.stderr
        assert f"Setting up dm-agent ({next_version})" in out, out
        assert node.run(["dpkg-query", "-W", "-f", "${Version}", "dm-agent"]).stdout == \
            next_version
        state = node.show("ActiveState", "MainPID")
        assert state["ActiveState"] == "active" and state["MainPID"] != str(pid), state
        new_pid = state["MainPID"]
        # ...running the new files (a process of the old ones would show "(deleted)")
        exe = node.run(["readlink", f"/proc/{new_pid}/exe"]).stdout.strip()
        assert exe == "/usr/lib/dm-agent/dm-agent", exe
        assert node.run(["cat", INI]).stdout == edited
        assert node.stat(INI) == "640 root:dm-agent"
        assert node.run("ls /etc/dm-agent.ini.* 2>/dev/null; true").stdout == ""
        node.wait_registration(t1, count=2, ttl=2 * interval, timeout=15)
        times = [r.time for r in node.master.requests if r.status == 200]
        window = [t for t in times if t <= t0][-1:] + [t for t in times if t > t0]
        gaps = [b - a for a, b in itertools.pairwise(window)]
        node.notes["upgrade"] = {"apt_upgrade_seconds": round(t1 - t0, 2),
                                 "max_gap_seconds": round(max(gaps), 2), "interval": interval}
        assert max(gaps) <= 2 * interval, f"registration gaps {gaps}"
        assert node.messages(mark, priority="err") == []


@pytest.mark.parametrize("node", DEB_NODES, indirect=True)
def test_remove_and_purge(node: Node) -> None:
    """8. remove: stopped, configuration and state kept; purge: configuration and the
    agent's state (/var/lib/dm-agent) gone, user kept."""
    with node.step("purge", needs=["install"]):
        # running and registering, whatever the earlier steps left: remove must stop it
        node.configure(timeout=1)
        node.run(["systemctl", "restart", UNIT])
        node.wait_registration(time.monotonic())
        configured = node.run(["cat", INI]).stdout
        pid = node.main_pid()
        assert pid > 0
        mark = node.cursor()
        node.apt("remove", "dm-agent")
        assert not node.exists(f"/proc/{pid}")
        assert re.search(r"Stopped (dm-agent\.service - )?DockMaster node agent",
                         "\n".join(node.messages(mark)))
        assert node.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "dm-agent"]
                        ).stdout.strip() == "rc"
        assert node.run(["cat", INI]).stdout == configured  # a conffile: kept on remove
        assert node.exists("/var/lib/dm-agent")  # the unit's StateDirectory=: kept too
        for gone in ("/usr/bin/dm-agent", "/usr/lib/dm-agent", UNIT_PATH):
            assert not node.exists(gone), gone
        since = time.monotonic()
        time.sleep(3.0)  # three intervals of timeout = 1: a live agent would register
        assert node.registrations_since(since) == []

        node.apt("purge", "dm-agent")
        query = node.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "dm-agent"],
                         check=False)
        assert query.returncode != 0 or query.stdout.strip() in ("", "un"), query.stdout
        # /var/lib/dm-agent: the agent's own state (the gateway's self-issued key)
        for gone in (INI, "/var/lib/dm-agent",
                     f"/etc/systemd/system/multi-user.target.wants/{UNIT}",
                     f"/var/lib/systemd/deb-systemd-helper-enabled/{UNIT}.dsh-also"):
            assert not node.exists(gone), gone
        # Debian policy keeps system users on purge (files they owned may remain): so
        # does dh_installsysusers, and so does this package.
        kept = {f"{db} {who}": node.run(["getent", db, who], check=False).returncode == 0
                for db, who in (("passwd", "dm-agent"), ("group", "dm-agent"),
                                ("group", "docker"))}
        node.notes["after_purge_kept"] = kept
        assert kept == {"passwd dm-agent": True, "group dm-agent": True, "group docker": True}
        assert node.has_python() == []

