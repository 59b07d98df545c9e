"""dm_agent.process.pidfile in this process: links are never followed, the temporary file is
created exclusively under a fresh name and its lock checked, unsafe directories refused."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentproc import run

from dm_agent.errors import AgentError
from dm_agent.process import pidfile as pidfile_module
from dm_agent.process.pidfile import LockedPidfile, read_pid

VICTIM = "a file the agent's user can write, which must stay as it is\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text(VICTIM)
    return path


@pytest.fixture
def rundir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o755)
    return path


def test_acquire_writes_locks_and_release_removes(rundir: Path) -> None:
    path = rundir / "dm-agent.pid"
    with LockedPidfile(str(path)):
        assert read_pid(str(path)) == os.getpid()
        assert sorted(os.listdir(rundir)) == ["dm-agent.pid"]  # no temporary left
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert not path.exists()


def test_symlink_at_the_old_predictable_temporary_name_is_not_followed(
        rundir: Path, victim: Path) -> None:
    """The issue: `<pidfile>.<pid>.tmp` was opened O_CREAT|O_TRUNC, following a link."""
    path = rundir / "dm-agent.pid"
    (rundir / f"dm-agent.pid.{os.getpid()}.tmp").symlink_to(victim)
    with LockedPidfile(str(path)):
        assert read_pid(str(path)) == os.getpid()
    assert victim.read_text() == VICTIM


def test_temporary_file_is_created_exclusively_without_following_links(
        rundir: Path, victim: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The one stand-in: the random name is made predictable, so that a link can be
    # planted at exactly the name the agent tries first (an attacker's lucky guess).
    names = iter([b"\x01" * 6, b"\x02" * 6])
    monkeypatch.setattr(pidfile_module.os, "urandom", lambda n: next(names))
    planted = rundir / f"dm-agent.pid.{'01' * 6}.tmp"
    planted.symlink_to(victim)
    path = rundir / "dm-agent.pid"
    with LockedPidfile(str(path)):
        assert read_pid(str(path)) == os.getpid()
        assert os.path.islink(planted)  # left alone, neither followed nor replaced
    assert victim.read_text() == VICTIM


def test_pidfile_that_is_a_symlink_is_refused(rundir: Path, victim: Path) -> None:
    path = rundir / "dm-agent.pid"
    path.symlink_to(victim)
    with pytest.raises(AgentError, match=r"cannot open pidfile .*: it is a symbolic link"):
        LockedPidfile(str(path)).acquire()
    assert victim.read_text() == VICTIM and path.is_symlink()


@pytest.fixture
def locker() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def test_lock_on_the_temporary_file_is_checked(
        rundir: Path, monkeypatch: pytest.MonkeyPatch,
        locker: list[subprocess.Popen[str]]) -> None:
    """Another process that opened and locked the fresh temporary file before us (in a
    shared directory, between our create and our lock): the agent must not go on and
    rename a file it does not hold over the pidfile."""
    path = rundir / "dm-agent.pid"
    tmp = rundir / "dm-agent.pid.race.tmp"
    tmp.write_text("")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1]); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
         str(tmp)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    locker.append(holder)
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    # The one stand-in: the race is made certain by handing out the file the other
    # process has locked as the "freshly created" temporary file.
    monkeypatch.setattr(LockedPidfile, "_create_temporary",
                        lambda self: (str(tmp), os.open(tmp, os.O_RDWR)))
    with pytest.raises(AgentError, match="cannot lock the temporary pidfile"):
        LockedPidfile(str(path)).acquire()
    assert read_pid(str(path)) is None


@pytest.mark.parametrize(("mode", "refused"), [
    (0o777, True), (0o1777, False), (0o775, False), (0o755, False), (0o757, True),
])
def test_directory_writable_by_others_without_sticky_bit_is_refused(
        tmp_path: Path, mode: int, refused: bool) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    os.chmod(directory, mode)
    path = directory / "dm-agent.pid"
    if refused:
        with pytest.raises(AgentError, match=f"its directory {directory} is writable by "
                                             "other users .* without the sticky bit"):
            LockedPidfile(str(path)).acquire()
        assert not path.exists()
    else:
        with LockedPidfile(str(path)):
            assert read_pid(str(path)) == os.getpid()


def test_group_writable_directory_of_another_group_is_refused(
        tmp_path: Path, other_user: tuple[int, int]) -> None:
    directory = tmp_path / "grp"
    directory.mkdir()
    os.chown(directory, -1, other_user[1])  # a group the agent is not in
    os.chmod(directory, 0o775)
    with pytest.raises(AgentError, match="writable by other users"):
        LockedPidfile(str(directory / "dm-agent.pid")).acquire()


def test_directory_of_another_user_is_refused(tmp_path: Path,
                                             other_user: tuple[int, int]) -> None:
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o755)
    os.chown(directory, *other_user)
    with pytest.raises(AgentError, match="belongs to another user"):
        LockedPidfile(str(directory / "dm-agent.pid")).acquire()


def test_daemon_refuses_an_unsafe_pidfile_directory_on_its_terminal(tmp_path: Path) -> None:
    (tmp_path / "dm-agent.ini").write_text("[main]\nmaster = 127.0.0.1:9\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    proc = run(["--daemon", "--pidfile", str(shared / "dm-agent.pid")], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "without the sticky bit" in proc.stderr and str(shared) in proc.stderr
    assert os.listdir(shared) == []
