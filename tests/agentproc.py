"""Run the real ``dm-agent`` program in a clean environment (helpers for the tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

BIN = os.environ.get("DM_AGENT_BIN") or os.path.join(os.path.dirname(sys.executable), "dm-agent")
#: a Docker endpoint that is not there: the agent reports host figures only
NO_DOCKER = "unix:///nonexistent/docker.sock"
#: another user's uid and gid (nobody's, as Debian numbers them): conftest's
#: ``other_user`` fixture, which marks a test ``root``
NOBODY = 65534


def as_user(user: Sequence[int], cmd: Sequence[str]) -> list[str]:
    """``cmd`` run as ``user`` = (uid, gid, supplementary gids…) through setpriv (root)."""
    uid, gid, *groups = user
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
            "--", *cmd]


#: what the agent warns about when set (dm_agent.net.IGNORED_ENVIRONMENT), and NO_PROXY:
#: a node's environment in a test has none of it, whatever the machine running it has
IGNORED = {spelling for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
                                 "DOCKER_HOST") for spelling in (name, name.lower())}


def clean_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a node with no dm-agent settings, HOME in a temp dir."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DM_AGENT_") and k not in ("JOURNAL_STREAM", "XDG_CONFIG_HOME")
           and k not in IGNORED}
    env["HOME"] = str(home)
    env["XDG_RUNTIME_DIR"] = str(home)
    env.update(extra or {})
    return env


def run(args: Sequence[str], home: Path, extra_env: Mapping[str, str] | None = None,
        timeout: float = 30, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN, *args], capture_output=True, text=True, cwd=home,
                          env=clean_env(home, extra_env), timeout=timeout, stdin=subprocess.DEVNULL,
                          **kw)  # type: ignore[call-overload]


def popen(args: Sequence[str], home: Path, extra_env: Mapping[str, str] | None = None,
          **kw: object) -> subprocess.Popen[str]:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([BIN, *args], text=True, cwd=home, env=clean_env(home, extra_env),
                            stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> str:
    """Signal the agent (SIGTERM) and return its stderr; a test fails when it does not
    stop within 5 s."""
    proc.send_signal(sig)
    return stopped(proc, f"on {sig}")


def stopped(proc: subprocess.Popen[str], after: str = "") -> str:
    """The stderr of an agent already told to stop (its exit code in ``proc.returncode``);
    a test fails when it does not stop within 5 s."""
    try:
        _, err = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"agent did not stop {after}: {err[-2000:]}".replace(" :", ":"))
    return err


def wait_listening(port: int, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port`` (the agent's
    gateway); a test fails when ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nothing listens on 127.0.0.1:{port} (exit {proc.poll()})")
            time.sleep(0.05)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: a daemon is nobody's child to reap here)."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout: float) -> float:
    """Seconds until ``pid`` is gone; a test fails when it is still there after ``timeout``."""
    t0 = time.monotonic()
    while alive(pid):
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"PID {pid} still alive after {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - t0
