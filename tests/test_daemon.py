"""--daemon with real forks: readiness, pidfile lock, signals, logs, descriptors."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentproc import BIN, NO_DOCKER, alive, clean_env, run, wait_gone
from support.master import Master
from support.scripted_docker import ScriptedDocker

from dm_agent.process.pidfile import read_pid

# paced: waits on a real agent's intervals, so not in the unit tier
pytestmark = [pytest.mark.daemon, pytest.mark.paced]
SECRET = "daemon-secret-77Q"


class Daemon:
    """Starts ``dm-agent --daemon`` and always kills what it started."""

    def __init__(self, home: Path, master: Master) -> None:
        self.home, self.master = home, master
        self.pidfile = home / "run" / "dm-agent.pid"
        self.conf = home / "dm-agent.ini"
        self.conf.write_text(
            f"[main]\nmaster = {master.url}\ndocker = {NO_DOCKER}\ntimeout = 60\n"
            f"secret = {SECRET}\nlog_level = 1\n")
        self.pids: set[int] = set()

    def start(self, *extra: str, env: dict[str, str] | None = None,
              **kw: object) -> subprocess.CompletedProcess[str]:
        proc = run(["--daemon", "-f", str(self.conf), "--pidfile", str(self.pidfile), *extra],
                   self.home, env, **kw)
        pid = read_pid(str(self.pidfile))
        if pid:
            self.pids.add(pid)
        return proc

    @property
    def pid(self) -> int:
        pid = read_pid(str(self.pidfile))
        assert pid, "no pidfile"
        return pid

    def cleanup(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def master_secret() -> str:
    return SECRET


@pytest.fixture
def daemon(tmp_path: Path, master: Master) -> Iterator[Daemon]:
    d = Daemon(tmp_path, master)
    yield d
    d.cleanup()


def test_start_returns_when_ready_and_daemon_is_detached(daemon: Daemon, master: Master) -> None:
    with open(daemon.home / "inherited.txt", "w") as leak:
        proc = daemon.start(pass_fds=(leak.fileno(),))
        leaked_fd = leak.fileno()
    assert proc.returncode == 0, proc.stderr
    assert daemon.pidfile.exists()  # readiness: written before the starter returned
    pid = daemon.pid
    assert alive(pid)
    assert os.getsid(pid) != pid  # double fork: not a session leader
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    assert stat[4] == "0"  # tty_nr: no controlling terminal
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    status = Path(f"/proc/{pid}/status").read_text()
    umask = next(ln for ln in status.splitlines() if ln.startswith("Umask:")).split()[1]
    assert umask == "0022"
    fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert not any("inherited.txt" in target for target in fds.values()), fds
    assert leaked_fd not in fds or "inherited" not in fds[leaked_fd]
    for fd in (0, 1, 2):
        assert fds.get(fd) == "/dev/null", fds
    reqs = master.wait_for(1)
    assert reqs[0].header("X-Auth-Node") == SECRET
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert SECRET.encode() not in cmdline


def test_second_instance_exits_75_naming_pid_and_kill9_leaves_no_lock(daemon: Daemon) -> None:
    assert daemon.start().returncode == 0
    first = daemon.pid
    second = daemon.start()
    assert second.returncode == 75, second.stderr
    assert f"PID {first}" in second.stderr and str(daemon.pidfile) in second.stderr
    assert daemon.pid == first and alive(first)
    os.kill(first, signal.SIGKILL)
    wait_gone(first, 5)
    assert daemon.pidfile.exists()  # a stale file, but no lock
    again = daemon.start()
    assert again.returncode == 0, again.stderr
    assert daemon.pid != first and alive(daemon.pid)


def test_bad_config_exits_78_and_leaves_nothing(daemon: Daemon) -> None:
    daemon.conf.write_text(daemon.conf.read_text().replace("timeout = 60", "timeout = 0"))
    proc = daemon.start()
    assert proc.returncode == 78
    assert "invalid timeout = '0'" in proc.stderr and str(daemon.conf) in proc.stderr
    assert not daemon.pidfile.exists()
    found = subprocess.run(["pgrep", "-f", str(daemon.pidfile)], capture_output=True, text=True)
    assert found.stdout.strip() == ""


def test_unwritable_pidfile_reported_on_terminal(daemon: Daemon, tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    proc = run(["--daemon", "-f", str(daemon.conf), "--pidfile", str(blocker / "x.pid")],
               daemon.home)
    assert proc.returncode == 1
    assert "pidfile" in proc.stderr and str(blocker) in proc.stderr


def test_sigusr1_registers_and_sigterm_stops_the_daemon(daemon: Daemon, master: Master) -> None:
    """The daemon's signal handlers (after the forks). SIGHUP in a daemon is
    test_relative_paths_keep_their_meaning_after_chdir_and_sighup's; what a reload
    applies or refuses is test_loop_master.py's (foreground) and test_lifecycle.py's."""
    daemon.conf.write_text(daemon.conf.read_text() + "jitter = no\n")  # next round in 60 s
    assert daemon.start().returncode == 0
    pid = daemon.pid
    master.wait_for(1)
    os.kill(pid, signal.SIGUSR1)
    master.wait_for(2, timeout=15)  # long before the 60 s interval's next round
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, 3) < 2.0
    assert not daemon.pidfile.exists()


def journal_pipe_env(fd: int) -> dict[str, str]:
    st = os.fstat(fd)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_journal_stream_prefixes_and_broken_pipe_survival(daemon: Daemon, master: Master) -> None:
    rfd, wfd = os.pipe()
    daemon.conf.write_text(daemon.conf.read_text().replace("timeout = 60", "timeout = 1"))
    proc = subprocess.Popen(
        [BIN, "--daemon", "-f", str(daemon.conf),
         "--pidfile", str(daemon.pidfile), "-vv"],
        stdin=subprocess.DEVNULL, stdout=wfd, stderr=wfd, cwd=daemon.home,
        env=clean_env(daemon.home, journal_pipe_env(wfd)))
    os.close(wfd)
    assert proc.wait(timeout=20) == 0
    daemon.pids.add(daemon.pid)
    master.wait_for(2, timeout=10)
    with os.fdopen(rfd, "rb", buffering=0) as reader:  # logged before the first send
        data = os.read(reader.fileno(), 65536).decode()
    lines = [ln for ln in data.splitlines() if ln]
    assert lines and all(ln[:3] in ("<3>", "<4>", "<6>", "<7>") for ln in lines), lines[:5]
    assert any(ln.startswith("<6>started as daemon") for ln in lines)
    assert any(ln.startswith("<3>") and "Docker" in ln for ln in lines)  # unreachable Docker
    assert not any(" - INFO - " in ln for ln in lines)  # no timestamps under the journal
    assert SECRET not in data
    # the read end is closed now: writes get EPIPE, registrations must go on
    n = len(master.requests)
    master.wait_for(n + 3, timeout=6)
    assert alive(daemon.pid)


#: sh -c script: a private /dev (a tmpfs in a private mount namespace, inside a user
#: namespace so that no root is needed; the host's null, zero, random and urandom bound
#: in) whose /dev/log is the socket $2, or absent when $2 is empty; then exec the rest.
#: The host's /dev/log is not touched, whether or not it has one: the daemon sees the
#: case the test asks for.
PRIVATE_DEV = """set -e
mkdir -p "$1"
mount --rbind /dev "$1"
mount -t tmpfs -o mode=0755 dm-test-dev /dev
for name in null zero random urandom; do
  touch "/dev/$name"
  mount --bind "$1/$name" "/dev/$name"
done
if [ -n "$2" ]; then touch /dev/log; mount --bind "$2" /dev/log; fi
shift 2
exec "$@"
"""


@pytest.mark.parametrize("syslog", [True, False], ids=["dev-log", "no-dev-log"])
def test_daemon_without_journal_logs_to_syslog_else_log_file(
        daemon: Daemon, master: Master, tmp_path: Path, syslog: bool) -> None:
    """Outside systemd: syslog when /dev/log is there (log_file unused), else log_file."""
    log_file = daemon.home / "agent.log"
    daemon.conf.write_text(daemon.conf.read_text() + f"log_file = {log_file}\n")
    dev_log = tmp_path / "dev-log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(dev_log))
        receiver.settimeout(15)
        proc = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private",
             "sh", "-c", PRIVATE_DEV, "sh",
             str(tmp_path / "host-dev"), str(dev_log) if syslog else "",
             BIN, "--daemon", "-f", str(daemon.conf), "--pidfile", str(daemon.pidfile)],
            capture_output=True, text=True, cwd=daemon.home, env=clean_env(daemon.home),
            stdin=subprocess.DEVNULL, timeout=30)
        assert proc.returncode == 0, proc.stderr
        pid = daemon.pid  # read once: the pidfile goes as soon as the daemon stops
        daemon.pids.add(pid)
        master.wait_for(1)
        messages = []
        if syslog:  # what arrived on /dev/log, up to the start line
            while not any("started as daemon" in m for m in messages):
                try:
                    messages.append(receiver.recv(65536).decode())
                except TimeoutError:
                    pytest.fail(f"no start line on /dev/log in 15 s: {messages}")
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid, 5)
    if syslog:
        assert any(re.match(r"<30>dm-agent\[\d+\]: started as daemon", m)  # daemon.info
                   for m in messages), messages
        assert SECRET not in "".join(messages)
        assert not log_file.exists()
    else:
        text = log_file.read_text()
        assert " - INFO - started as daemon" in text and SECRET not in text


def test_log_file_moved_away_by_a_rotation_is_reopened(
        daemon: Daemon, master: Master, tmp_path: Path) -> None:
    """logrotate's default (rename the file; the next line goes to a new one at the old
    path), with no signal and no copytruncate: the daemon notices the move at its next
    line. Before, it wrote on into the renamed file for ever."""
    log_file = daemon.home / "agent.log"
    daemon.conf.write_text(daemon.conf.read_text() + f"log_file = {log_file}\n")
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private",
         "sh", "-c", PRIVATE_DEV, "sh", str(tmp_path / "host-dev"), "",  # no /dev/log
         BIN, "--daemon", "-f", str(daemon.conf), "--pidfile", str(daemon.pidfile)],
        capture_output=True, text=True, cwd=daemon.home, env=clean_env(daemon.home),
        stdin=subprocess.DEVNULL, timeout=30)
    assert proc.returncode == 0, proc.stderr
    pid = daemon.pid
    daemon.pids.add(pid)
    master.wait_for(1)
    rotated = log_file.with_name("agent.log.1")
    log_file.rename(rotated)
    os.kill(pid, signal.SIGHUP)  # anything that logs a line: a reload says so at INFO
    deadline = time.monotonic() + 15
    while not (log_file.exists() and "received SIGHUP" in log_file.read_text()):
        assert time.monotonic() < deadline, f"nothing in a new {log_file} within 15 s"
        time.sleep(0.1)
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid, 5)
    old, new = rotated.read_text(), log_file.read_text()
    assert " - INFO - started as daemon" in old and "received SIGHUP" not in old
    assert "received SIGHUP" in new and "started as daemon" not in new
    assert "indicating exit request" in new or "stopping" in new, new


# A bug that ends the loop cannot be produced on purpose, so one is injected: the real
# daemon (real forks, real pipe, real journal stream) runs with loop.run replaced by a
# function that reports readiness, lets the readiness pipe's descriptor number be
# reused by a file, and raises.
DIES_AFTER_READINESS = """
import os, sys
from dm_agent.process import loop
REUSED = sys.argv.pop()

def pipes(signals):
    own = {0, 1, 2, signals.waker.rfd, signals.waker.wfd}
    found = set()
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if fd not in own and os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:"):
                found.add(fd)
        except OSError:  # the directory listing's own descriptor
            pass
    return found

def run(agent, signals, reload=None, on_first=None, **kw):
    before = pipes(signals)
    on_first()
    (fd,) = before - pipes(signals)  # the readiness pipe, closed now
    os.dup2(os.open(REUSED, os.O_WRONLY | os.O_CREAT, 0o600), fd)
    raise RuntimeError("injected bug after readiness")

loop.run = run
from dm_agent.cli import main
sys.exit(main())
"""


def test_a_daemon_dying_after_readiness_logs_critical_and_spares_the_reused_fd(
        daemon: Daemon, master: Master) -> None:
    import sys

    reused = daemon.home / "reused-descriptor"
    rfd, wfd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", DIES_AFTER_READINESS, "--daemon", "-f", str(daemon.conf),
         "--pidfile", str(daemon.pidfile), str(reused)],
        stdin=subprocess.DEVNULL, stdout=wfd, stderr=wfd, cwd=daemon.home,
        env=clean_env(daemon.home, journal_pipe_env(wfd)))
    os.close(wfd)
    assert proc.wait(timeout=20) == 0  # it was ready
    with os.fdopen(rfd, "rb") as reader:
        data = reader.read().decode()  # EOF: every writer (the daemon too) has exited
    lines = data.splitlines()
    critical = [ln for ln in lines if ln.startswith("<2>")]
    assert critical and "the daemon stops on an unexpected error: RuntimeError: injected " \
        "bug after readiness" in critical[0], data
    assert any("Traceback" in ln for ln in critical) and \
        any('File "<string>"' in ln for ln in critical), data
    assert reused.read_bytes() == b""  # nothing written to what the pipe's number now is
    assert not daemon.pidfile.exists()


# The old watcher must not stay on the old endpoint after a reload, even when the
# reload comes while it is reconnecting (its /version answer takes 3 s).
def test_sighup_leaves_no_event_stream_on_the_old_endpoint(daemon: Daemon, master: Master,
                                                           tmp_path: Path) -> None:
    with ScriptedDocker(tmp_path / "old.sock", drop_events=True, version_delay=3.0) as old, \
            ScriptedDocker(tmp_path / "new.sock") as new:
        conf = daemon.conf.read_text().replace(NO_DOCKER, old.url)
        daemon.conf.write_text(conf + "docker_events = yes\n")
        assert daemon.start().returncode == 0
        deadline = time.monotonic() + 10
        while old.count("/version") < 3:  # the round's, the stream's, its reconnect's
            assert time.monotonic() < deadline, old.paths
            time.sleep(0.05)
        old.drop_events = False  # were it to reconnect, the old endpoint would hold it
        daemon.conf.write_text(conf.replace(old.url, new.url) + "docker_events = yes\n")
        os.kill(daemon.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while new.open_streams < 1:
            assert time.monotonic() < deadline, new.paths
            time.sleep(0.05)
        deadline = time.monotonic() + 15
        while old.count("/version", answered=True) < old.count("/version"):
            assert time.monotonic() < deadline, old.paths  # the 3 s answers
            time.sleep(0.05)
        time.sleep(2)  # a watcher left on it would reconnect at once after that answer
        assert old.count("/events") == 1 and old.open_streams == 0, old.paths
        pid = daemon.pid
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid, 5)


def start_journaled(daemon: Daemon, *args: str) -> Path:
    """Start the daemon from its home with *args* (relative paths allowed), its log on a
    file that JOURNAL_STREAM names (so it is readable whether or not /dev/log exists)."""
    log = daemon.home / "stderr.log"
    with open(log, "ab") as err:
        proc = subprocess.run([BIN, "--daemon", *args], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=err, cwd=daemon.home,
                              env=clean_env(daemon.home, journal_pipe_env(err.fileno())),
                              timeout=30)
    assert proc.returncode == 0, log.read_text()
    daemon.pids.add(daemon.pid)
    return log


def test_relative_paths_keep_their_meaning_after_chdir_and_sighup(
        daemon: Daemon, master: Master) -> None:
    """Issue: `--daemon -f a.ini` started, then SIGHUP failed with "cannot read config
    file a.ini", since the daemon runs in /. Every relative path is resolved at start."""
    (daemon.home / "etc").mkdir()
    conf = daemon.home / "etc" / "a.ini"
    conf.write_text(daemon.conf.read_text())
    log = start_journaled(daemon, "-f", "etc/a.ini", "--pidfile", "run/dm-agent.pid")
    assert os.readlink(f"/proc/{daemon.pid}/cwd") == "/"
    master.wait_for(1)
    conf.write_text(conf.read_text().replace("timeout = 60", "timeout = 1"))
    os.kill(daemon.pid, signal.SIGHUP)
    reqs = master.wait_for(3, timeout=10)
    assert reqs[-1].query == {"ttl": ["2"]}, [r.query for r in reqs]
    text = log.read_text()
    assert f"configuration reloaded from {conf}: interval 1s" in text, text
    assert "reload failed" not in text
    pid = daemon.pid
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid, 3)
    assert not daemon.pidfile.exists()  # the relative --pidfile, removed from /


def test_reload_says_pidfile_and_log_file_changes_need_a_restart(
        daemon: Daemon, master: Master) -> None:
    daemon.conf.write_text(daemon.conf.read_text() + "pidfile = run/a.pid\n")
    daemon.pidfile = daemon.home / "run" / "a.pid"  # relative to the file's directory
    log = start_journaled(daemon, "-f", str(daemon.conf))
    pidfile = daemon.pidfile
    assert read_pid(str(pidfile)) == daemon.pid
    master.wait_for(1)
    daemon.conf.write_text(daemon.conf.read_text().replace("run/a.pid", "run/b.pid")
                           + "log_file = b.log\n")
    os.kill(daemon.pid, signal.SIGHUP)
    master.wait_for(2, timeout=10)
    deadline = time.monotonic() + 10
    while "configuration reloaded" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = log.read_text()
    assert (f"<4>pidfile changed to {daemon.home}/run/b.pid: not applied by a reload, "
            f"restart the agent to use it (still {pidfile})") in text, text
    assert (f"<4>log_file changed to {daemon.home}/b.log: not applied by a reload, "
            "restart the agent to use it (still (none))") in text, text
    assert read_pid(str(pidfile)) == daemon.pid and not (daemon.home / "run/b.pid").exists()
