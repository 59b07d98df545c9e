"""``dm-agent status`` against real forked daemons: the four answers and the state file.

Each case is a real ``dm-agent --daemon`` with its own pidfile in a temp directory and a
strict master; the answer must come from the pidfile's lock and the state file alone, so
a SIGSTOPped agent is judged as it would be on a node.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agentproc import BIN, NO_DOCKER, as_user, clean_env, run, wait_gone
from support.dockerd import Dockerd
from support.gateway import free_port
from support.master import Master

from dm_agent.config.settings import Settings
from dm_agent.process.pidfile import read_pid
from dm_agent.process.state import state_path

# paced: waits on a real agent's intervals, so not in the unit tier
pytestmark = [pytest.mark.daemon, pytest.mark.paced]
SECRET = "status-secret-3xK"


class Node:
    """A directory others can traverse (pytest's tmp_path is 0700), the agent's config,
    and the daemons started from it, all killed at the end."""

    def __init__(self, master: Master) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="dm-status-"))
        self.home.chmod(0o755)
        self.master = master
        self.pidfile = self.home / "run" / "dm-agent.pid"
        self.state = Path(state_path(str(self.pidfile)))
        self.conf = self.home / "dm-agent.ini"
        self.pids: set[int] = set()
        self.configure()

    def configure(self, timeout: int = 60, docker: str = NO_DOCKER, secret: str = SECRET,
                  extra: str = "") -> None:
        self.conf.write_text(f"[main]\nmaster = {self.master.url}\ndocker = {docker}\n"
                             f"timeout = {timeout}\nsecret = {secret}\n{extra}")

    def start(self) -> int:
        # the gateway's self-issued certificate in the node's directory, not the host's
        # /var/lib/dm-agent
        proc = run(["--daemon", "-f", str(self.conf), "--pidfile", str(self.pidfile)], self.home,
                   {"STATE_DIRECTORY": str(self.home / "state")})
        assert proc.returncode == 0, proc.stderr
        pid = read_pid(str(self.pidfile))
        assert pid
        self.pids.add(pid)
        return pid

    def status(self, *args: str, user: tuple[int, ...] | None = None
               ) -> subprocess.CompletedProcess[str]:
        """``dm-agent status``, as root or as ``user`` = (uid, gid, supplementary gids…)."""
        cmd = [BIN, "status", "--pidfile", str(self.pidfile), *args]
        if user is not None:
            cmd = as_user(user, cmd)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                              cwd=self.home, env=clean_env(self.home),
                              stdin=subprocess.DEVNULL)

    def wait_status(self, code: int, timeout: float = 20.0, *args: str
                    ) -> subprocess.CompletedProcess[str]:
        deadline = time.monotonic() + timeout
        while True:
            proc = self.status(*args)
            if proc.returncode == code or time.monotonic() > deadline:
                return proc
            time.sleep(0.2)

    def cleanup(self) -> None:
        for pid in self.pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        subprocess.run(["rm", "-rf", str(self.home)], check=False)


@pytest.fixture
def master_secret() -> str:
    return SECRET


@pytest.fixture
def node(master: Master) -> Iterator[Node]:
    n = Node(master)
    yield n
    n.cleanup()


def test_registered_exit_0_with_summary_and_a_state_file_without_secrets(
        node: Node, master: Master) -> None:
    pid = node.start()
    master.wait_for(1)
    proc = node.wait_status(0)
    assert proc.returncode == 0, proc.stdout
    first = proc.stdout.splitlines()[0]
    assert first.startswith("registered ") and " s ago with " in first, first
    assert f"with {node.master.url} (ttl 120 s), 0 containers, events down since " in first, first
    assert "Docker unreachable" in first
    mode = stat.S_IMODE(node.state.stat().st_mode)
    assert mode == 0o640, oct(mode)  # group readable, never others
    text = node.state.read_text()
    assert SECRET not in text
    assert SECRET not in proc.stdout
    state = json.loads(text)
    assert state["pid"] == pid and state["ttl"] == 120 and state["interval"] == 60
    assert state["master"] == node.master.url and state["consecutive_failures"] == 0
    assert state["last_success"]["ttl"] == 120 and state["last_success"]["duration"] > 0
    assert state["config_file"] == str(node.conf)
    assert state["time_format"] == Settings().time_format  # the default, none configured
    assert state["events"]["state"] == "down" and state["master_generation"] is None
    assert state["docker"]["reachable"] is False and state["stuck_mounts"] == []
    assert not list(node.state.parent.glob("*.tmp"))  # written by rename, nothing left over
    js = json.loads(node.status("--json").stdout)
    assert js["status"] == "registered" and js["exit_code"] == 0 and js["pid"] == pid
    assert js["state"]["pid"] == pid and 0 <= js["last_success_age"] < 120
    # a clean stop removes the state with the pidfile: not running
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid, 5)
    assert not node.state.exists()
    stopped = node.status()
    assert stopped.returncode == 3, stopped.stdout
    assert stopped.stdout.startswith("not running: no pidfile")


def test_containers_and_event_stream_from_a_real_dockerd(node: Node, master: Master,
                                                         dockerd: Dockerd) -> None:
    node.configure(docker=dockerd.unix_url)
    node.start()
    reqs = master.wait_for(1)
    count = len(reqs[-1].json["containers"])
    deadline = time.monotonic() + 20
    while True:  # the stream connects in its own thread; the next round says so
        proc = node.status()
        if "events connected since" in proc.stdout or time.monotonic() > deadline:
            break
        os.kill(node.pids.copy().pop(), signal.SIGUSR1)
        time.sleep(0.5)
    assert proc.returncode == 0, proc.stdout
    assert f", {count} containers, events connected since " in proc.stdout, proc.stdout
    assert count > 0


def test_failing_exit_1_with_the_last_error(node: Node, master: Master) -> None:
    master.allow_invalid = True
    node.configure(timeout=2, secret="wrong-secret-Q")
    node.start()
    master.wait_for(2)
    proc = node.wait_status(1)
    assert proc.returncode == 1, proc.stdout
    first, error = proc.stdout.splitlines()[:2]
    assert first.startswith("failing: ") and "never registered with" in first, proc.stdout
    assert error.startswith("last error (") and "unauthorized" in error, proc.stdout
    assert "wrong-secret-Q" not in proc.stdout and "wrong-secret-Q" not in node.state.read_text()
    js = json.loads(node.status("--json").stdout)
    assert js["status"] == "failing" and js["state"]["consecutive_failures"] >= 1
    assert js["state"]["last_failure"]["kind"] == "unauthorized"
    # the right secret again: a reload, and the next round is registered
    node.configure(timeout=2)
    os.kill(node.pids.copy().pop(), signal.SIGHUP)
    proc = node.wait_status(0)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.splitlines()[1].startswith("last error (")  # still said, as history


def test_hung_agent_exit_1_once_its_state_is_older_than_the_ttl(node: Node,
                                                                master: Master) -> None:
    node.configure(timeout=1)  # ttl 2 s
    pid = node.start()
    master.wait_for(2)
    assert node.wait_status(0).returncode == 0
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        proc = node.wait_status(1)
        waited = time.monotonic() - t0
        assert proc.returncode == 1, proc.stdout
        assert proc.stdout.startswith(f"not answering: PID {pid} last wrote its state "), \
            proc.stdout
        assert "longer than the ttl (2 s)" in proc.stdout
        assert waited < 10  # the ttl plus an interval, with a wide margin
        js = json.loads(node.status("--json").stdout)
        assert js["status"] == "hung" and js["state_age"] > 2 and js["pid"] == pid
    finally:
        os.kill(pid, signal.SIGCONT)
    assert node.wait_status(0).returncode == 0


def test_not_running_exit_3_after_sigkill_leaves_an_unlocked_pidfile(node: Node,
                                                                     master: Master) -> None:
    pid = node.start()
    master.wait_for(1)
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid, 5)
    assert node.pidfile.exists() and node.state.exists()  # both left behind
    proc = node.wait_status(3)
    assert proc.returncode == 3, proc.stdout
    assert proc.stdout.startswith(f"not running: no process holds the lock on {node.pidfile}")
    assert json.loads(node.status("--json").stdout)["status"] == "not_running"


def test_unknown_exit_4_without_state_but_with_the_lock_held(node: Node) -> None:
    node.pidfile.parent.mkdir()
    with open(node.pidfile, "w") as fh:
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = node.status()
    assert proc.returncode == 4, proc.stdout
    assert f"PID {os.getpid()} holds {node.pidfile} but there is no state file" in proc.stdout


def test_group_members_read_it_others_get_exit_4_saying_what_they_lack(
        node: Node, master: Master, other_user: tuple[int, int]) -> None:
    node.start()
    master.wait_for(1)
    assert node.wait_status(0).returncode == 0
    gid = node.state.stat().st_gid  # root's agent outside the unit: root's group
    member = node.status(user=(*other_user, gid))
    assert member.returncode == 0, member.stdout + member.stderr
    assert member.stdout.startswith("registered ")
    other = node.status(user=other_user)
    assert other.returncode == 4, other.stdout + other.stderr
    assert other.stdout.startswith(f"permission denied: cannot read {node.state}: "), other.stdout
    assert "is readable by root and the dm-agent group only; you are nobody (uid 65534)" \
        in other.stdout
    assert "run it as root" in other.stdout.lower() and "usermod -aG dm-agent" in other.stdout
    js = json.loads(node.status("--json", user=other_user).stdout)
    assert js["status"] == "unknown" and js["exit_code"] == 4 and js["state"] is None


def test_help_documents_the_subcommand_and_its_exit_codes(tmp_path: Path) -> None:
    main = run(["--help"], tmp_path)
    assert main.returncode == 0 and "dm-agent status [--json]" in main.stdout
    sub = run(["status", "--help"], tmp_path)
    assert sub.returncode == 0, sub.stderr
    for line in ("0  running and registered within its ttl", "3  not running (no lock held",
                 "4  unknown: no state readable", "2  with --manageable: registered, but"):
        assert line in sub.stdout, sub.stdout
    bad = run(["status", "--bogus"], tmp_path)
    assert bad.returncode == 64 and "usage: dm-agent status" in bad.stderr, bad.stderr


def test_the_pidfile_is_found_through_the_config_file(node: Node, master: Master) -> None:
    node.configure(extra=f"pidfile = {node.pidfile}\n")
    pid = node.start()
    master.wait_for(1)
    deadline = time.monotonic() + 20
    while True:
        proc = run(["status", "--json", "-f", str(node.conf)], node.home)
        if proc.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert proc.returncode == 0, proc.stdout
    js = json.loads(proc.stdout)
    assert js["pidfile"] == str(node.pidfile) and js["pid"] == pid


# --- registered, and manageable? (--manageable) ------------------------------------------

def test_registered_but_not_manageable_exits_2_only_when_asked(node: Node,
                                                               master: Master) -> None:
    """Docker on a unix socket and no gateway: the master lists the node but cannot manage
    it. Exit 0 still means registered; --manageable makes it 2, with the reasons."""
    node.start()
    master.wait_for(1)
    assert node.wait_status(0).returncode == 0
    proc = node.status("--manageable")
    assert proc.returncode == 2, proc.stdout
    assert proc.stdout.startswith("registered "), proc.stdout
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("not manageable: the master cannot manage this node's Docker: "
                           "Docker is on a unix socket (/nonexistent/docker.sock)"), last
    assert "; Docker is unreachable: " in last, last
    js = json.loads(node.status("--json").stdout)
    assert (js["status"], js["exit_code"], js["manageable"]) == ("registered", 0, False)
    asked = json.loads(node.status("--json", "--manageable").stdout)
    assert (asked["status"], asked["exit_code"]) == ("unmanageable", 2)
    assert asked["unmanageable"] == js["unmanageable"] and len(js["unmanageable"]) == 2
    # a failing node is still 1: --manageable only splits "registered"
    node.configure(secret="wrong-secret-Q")
    os.kill(node.pids.copy().pop(), signal.SIGHUP)
    master.allow_invalid = True
    assert node.wait_status(1, 20, "--manageable").returncode == 1


def gateway_node(node: Node, docker: str, port: int) -> None:
    import bcrypt

    hashed = bcrypt.hashpw(b"status-password", bcrypt.gensalt(4)).decode()
    node.configure(timeout=1, docker=docker,
                   extra=f"gateway = 127.0.0.1:{port}\ngateway_password_hash = {hashed}\n")


def test_manageable_with_the_gateway_until_its_docker_dies(
        node: Node, master: Master, dockerd_factory: Callable[..., Dockerd]) -> None:
    """The gateway listening in front of a real Docker: exit 0 with --manageable. Docker
    dies under the running agent: 2, "Docker is unreachable", though still registered."""
    engine = dockerd_factory()
    gateway_node(node, engine.unix_url, free_port())
    node.start()
    master.wait_for(1)
    proc = node.wait_status(0, 20, "--manageable")
    assert proc.returncode == 0, proc.stdout
    js = json.loads(node.status("--json", "--manageable").stdout)
    assert js["manageable"] is True and js["unmanageable"] == []
    assert js["state"]["gateway"]["listening"] is True
    engine.stop()
    proc = node.wait_status(2, 20, "--manageable")
    assert proc.returncode == 2, proc.stdout
    assert "not manageable: Docker is unreachable: " in proc.stdout, proc.stdout
    assert node.status().returncode == 0  # registered all along


def test_a_gateway_that_cannot_listen_is_not_manageable(node: Node, master: Master,
                                                       dockerd: Dockerd) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        gateway_node(node, dockerd.unix_url, port)
        node.start()
        master.wait_for(1)
        proc = node.wait_status(2, 20, "--manageable")
    assert proc.returncode == 2, proc.stdout
    assert "gateway: NOT listening" in proc.stdout
    assert f"not manageable: the gateway does not listen on 127.0.0.1:{port}: " \
        "cannot listen" in proc.stdout, proc.stdout
