"""``dm-agent status``: is this node registered, and if not, why — without asking the agent.

The answer comes from two things a hung agent cannot falsify: whether a process holds
the lock on the pidfile (read from ``/proc/locks``, so the check needs no permission on
the pidfile and never takes the lock itself, which would make a starting agent exit
75), and the state file the daemon rewrites after every round (``dm_agent.process.state``),
judged by its age. Exit codes:

- 0 running and registered within its ttl;
- 1 running, but the last registration is older than the ttl, or failing, or the agent
  has not written its state for longer than the ttl (hung);
- 2 with ``--manageable`` only: registered, but the master cannot manage the node's
  Docker now (no gateway on a unix socket, the gateway not listening, Docker unreachable);
- 3 not running: no lock held on the pidfile;
- 4 unknown: no state readable (permissions, no state file, not JSON).

Everything is printed on stdout, the exit code says which case it is.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from ..config import settings as config
from ..errors import ConfigError
from ..process.pidfile import pidfile_path
from ..process.state import GROUP, state_path
from .parser import Parser, parse_command

REGISTERED, FAILING, UNMANAGEABLE, NOT_RUNNING, UNKNOWN = 0, 1, 2, 3, 4
SYSTEM_PIDFILE = "/run/dm-agent/dm-agent.pid"

DESCRIPTION = """\
Say whether the dm-agent daemon of this node is registered with its master, from its
pidfile's lock and the state file it writes after every round (it does not ask the
agent, so a hung agent gets a truthful answer too)."""

EPILOG = """\
Exit codes:
  0  running and registered within its ttl
  1  running, but the last registration is older than the ttl or failing, or the
     agent has not written its state for longer than the ttl (hung)
  2  with --manageable: registered, but the master cannot manage this node's Docker
     now (no gateway while Docker is on a unix socket, the gateway not listening,
     Docker unreachable)
  3  not running (no lock held on the pidfile)
  4  unknown: no state readable (e.g. permissions: run as root or as a member of
     the dm-agent group)
"""


class Result(NamedTuple):
    code: int
    #: registered, failing, stale, hung, starting, unmanageable (--manageable only),
    #: not_running, unknown
    status: str
    message: str
    pidfile: str
    state_file: str
    pid: int | None = None
    state: dict[str, Any] | None = None


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="dm-agent status", description=DESCRIPTION, epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true",
                   help="print the state as JSON for monitoring systems "
                   "(schema in docs/operator-guide.md)")
    p.add_argument("--manageable", action="store_true",
                   help="exit 2 when the node is registered but the master cannot manage "
                   "its Docker now (for monitoring: 0 then means registered and manageable)")
    p.add_argument("--pidfile", help="pidfile of the daemon (default: the config's pidfile, "
                   f"else {SYSTEM_PIDFILE} when that directory exists or for root)")
    p.add_argument("-f", "--config", help="config file whose pidfile setting to use")
    return p


def pidfile_of(explicit: str | None, config_path: str | None) -> str:
    """The daemon's pidfile as the agent would choose it; an unreadable or invalid config
    is passed over (a non-member of dm-agent cannot read /etc/dm-agent.ini)."""
    if explicit:
        return explicit
    path = config.find_config(config_path)
    try:
        values = config.read_file(path)[0] if path is not None else {}
    except ConfigError:
        values = {}
    raw = config.raw_value(config.BY_NAME["pidfile"], {}, os.environ, values, path, os.getcwd())
    if raw.text.strip():
        return raw.text.strip()
    if os.geteuid() == 0 or os.path.isdir(os.path.dirname(SYSTEM_PIDFILE)):
        return SYSTEM_PIDFILE
    return pidfile_path(config.DEFAULTS)


def lock_holder(path: str, st: os.stat_result) -> tuple[bool | None, int | None]:
    """(locked, PID) of the flock/POSIX lock on the file ``st`` describes; (None, None)
    when that cannot be told. The PID is None where /proc/locks shows 0 (another PID
    namespace)."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return _probe_lock(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:19:5678 0 EOF"; waiters have "->" in front
        if len(fields) >= 6 and fields[1] != "->" and fields[5] == dev:
            pid = int(fields[4]) if fields[4].isdigit() and fields[4] != "0" else None
            return True, pid
    return False, None


def _probe_lock(path: str) -> tuple[bool | None, int | None]:
    """Without /proc/locks: try a shared lock and let it go at once."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None, None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return (True, None) if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) else (None, None)
    finally:
        os.close(fd)  # also drops the probe's lock
    return False, None


def _who() -> str:
    import grp
    import pwd

    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    names = []
    for gid in sorted({os.getegid(), *os.getgroups()}):
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            names.append(str(gid))
    return f"you are {user} (uid {uid}), in the groups {', '.join(names)}"


def _describe(path: str) -> str:
    """``path`` with its mode and owner, e.g. ``/run/dm-agent (drwxr-x--- dm-agent:dm-agent)``."""
    import grp
    import pwd

    try:
        st = os.stat(path)
    except OSError:
        return path
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{path} ({stat.filemode(st.st_mode)} {owner}:{group})"


def permission_message(path: str) -> str:
    """What permission is lacking to read ``path``, and how to get it."""
    blocker = path
    parent = os.path.dirname(path)
    while parent and parent != "/":
        if not os.access(parent, os.X_OK):
            blocker = parent
        parent = os.path.dirname(parent)
    return (f"permission denied: cannot read {path}: {_describe(blocker)} is readable by "
            f"root and the {GROUP} group only; {_who()}. Run it as root (sudo dm-agent "
            f"status) or as a member of {GROUP} (usermod -aG {GROUP} USER, then log in again)")


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def clock(when: float, now: float) -> str:
    """Local HH:MM, with the date when it is not today."""
    t, today = time.localtime(when), time.localtime(now)
    if t[:3] == today[:3]:
        return time.strftime("%H:%M", t)
    return time.strftime("%Y-%m-%d %H:%M", t)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _events(state: dict[str, Any], now: float) -> str:
    ev = state.get("events")
    if not isinstance(ev, dict) or ev.get("state") == "disabled":
        return "events off"
    since = _num(ev.get("since"))
    what = "connected" if ev.get("state") == "connected" else "down"
    return f"events {what} since {clock(since, now)}" if since else f"events {what}"


def _details(state: dict[str, Any], now: float) -> str:
    parts = [f"{state.get('containers', 0)} containers", _events(state, now)]
    docker = state.get("docker")
    if isinstance(docker, dict) and docker.get("reachable") is False:
        parts.append("Docker unreachable")
    stuck = state.get("stuck_mounts")
    if isinstance(stuck, list) and stuck:
        parts.append("stuck mounts: " + ", ".join(str(m) for m in stuck))
    return ", ".join(parts)


def _last_error(state: dict[str, Any], now: float) -> str | None:
    failure = state.get("last_failure")
    if not isinstance(failure, dict):
        return None
    when = _num(failure.get("time"))
    at = f" ({ago(now - when)} ago)" if when else ""
    return f"last error{at}: {failure.get('kind')}: {failure.get('message')}"


def _gateway(state: dict[str, Any], now: float) -> list[str]:
    """The gateway's lines (docs/design.md §6), or why the master cannot manage the node."""
    gw = state.get("gateway")
    lines: list[str] = []
    if isinstance(gw, dict) and gw.get("listen"):
        if gw.get("error"):
            lines.append(f"gateway: NOT listening: {gw.get('error')}")
        else:
            lines.append(f"gateway: listening on {gw.get('listen')} ({gw.get('access')} "
                         f"access), {gw.get('connections', 0)} open connections")
        cert = gw.get("certificate")
        if isinstance(cert, dict):
            expires = _num(cert.get("not_after"))
            left = f", expires {clock(expires, now)} ({ago(expires - now)})" if expires else ""
            own = " (self-issued)" if cert.get("self_issued") else ""
            lines.append(f"gateway certificate{own}: {cert.get('fingerprint')}{left}")
        fails = gw.get("auth_failures")
        if isinstance(fails, dict) and fails.get("failures_total"):
            recent = fails.get("recent") or []
            last = recent[0] if recent and isinstance(recent[0], dict) else {}
            when = _num(last.get("last"))
            lines.append(f"gateway authentication failures: {fails.get('failures_total')}"
                         + (f", last from {last.get('client')} {ago(now - when)} ago"
                            if when else ""))
    elif isinstance(gw, dict) and gw.get("off_reason"):
        lines.append(f"gateway off: {gw.get('off_reason')}")
    if state.get("unmanaged"):
        lines.append(str(state["unmanaged"]))
    return lines


def _tunnel(state: dict[str, Any], now: float) -> list[str]:
    """The tunnel's line (docs/design.md §8): up since when and through which relay, or
    down since when and why."""
    tun = state.get("tunnel")
    if not isinstance(tun, dict) or tun.get("state") in (None, "off"):
        return []
    since = _num(tun.get("since"))
    when = f" since {clock(since, now)}" if since else ""
    relay, listen = tun.get("relay"), tun.get("listen")
    if tun.get("state") == "up":
        return [f"tunnel: up{when} through {relay}, the master dials https://{listen}"]
    if tun.get("state") == "connecting":
        return [f"tunnel: connecting to {relay}{when}"]
    attempts = tun.get("attempts")
    tries = f", {attempts} attempt{'s' if attempts != 1 else ''}" if attempts else ""
    return [f"tunnel: down{when}{tries}: {tun.get('error')}"]


def unmanageable(state: dict[str, Any]) -> list[str]:
    """Why the master cannot manage this node's Docker now, from a running agent's
    state; empty when it can. The master manages a node through the address it
    registered: the gateway when it is on (through the tunnel when there is one), else
    Docker's own TCP port."""
    reasons: list[str] = []
    if state.get("unmanaged"):
        reasons.append(str(state["unmanaged"]))
    gw = state.get("gateway")
    if isinstance(gw, dict) and gw.get("listen") and (gw.get("error")
                                                      or gw.get("listening") is False):
        reasons.append(f"the gateway does not listen on {gw.get('listen')}: "
                       f"{gw.get('error') or 'not started yet'}")
    tun = state.get("tunnel")
    if isinstance(tun, dict) and tun.get("state") in ("down", "connecting"):
        reasons.append(f"the tunnel to {tun.get('relay')} is not up: "
                       f"{tun.get('error') or 'connecting'}")
    docker = state.get("docker")
    if isinstance(docker, dict) and docker.get("reachable") is False:
        reasons.append(f"Docker is unreachable: {docker.get('error') or 'no answer'}")
    return reasons


def judge(state: dict[str, Any], now: float) -> tuple[int, str, str]:
    """(exit code, status word, summary) of a running agent's state."""
    master = state.get("master") or "(no master)"
    ttl = _num(state.get("ttl")) or 0.0
    written = _num(state.get("written")) or 0.0
    success = state.get("last_success") if isinstance(state.get("last_success"), dict) else None
    success_at = _num(success.get("time")) if success else None
    failures = state.get("consecutive_failures")
    failures = failures if isinstance(failures, int) else 0
    registered = (f"last registration {ago(now - success_at)} ago" if success_at
                  else "never registered")
    if now - written > ttl:
        return FAILING, "hung", (
            f"not answering: PID {state.get('pid')} last wrote its state {ago(now - written)} "
            f"ago, longer than the ttl ({ttl:.0f} s); {registered} with {master}")
    if failures:
        return FAILING, "failing", (
            f"failing: {failures} consecutive failure{'s' if failures != 1 else ''}, "
            f"{registered} with {master} (ttl {ttl:.0f} s), {_details(state, now)}")
    if success_at is None:
        started = _num(state.get("started")) or now
        return FAILING, "starting", (
            f"running (PID {state.get('pid')}, started {ago(now - started)} ago), "
            f"not registered yet with {master}")
    if now - success_at > ttl:
        return FAILING, "stale", (
            f"stale: {registered} with {master}, older than its ttl ({ttl:.0f} s), "
            f"{_details(state, now)}")
    return REGISTERED, "registered", (
        f"registered {ago(now - success_at)} ago with {master} (ttl {ttl:.0f} s), "
        f"{_details(state, now)}")


def check(pidfile: str, now: float | None = None, manageable: bool = False) -> Result:
    """The node's status from ``pidfile`` and the state file next to it; with
    ``manageable``, a registered node the master cannot manage is ``unmanageable``."""
    now = time.time() if now is None else now
    spath = state_path(pidfile)

    def result(code: int, status: str, message: str, pid: int | None = None,
               state: dict[str, Any] | None = None) -> Result:
        return Result(code, status, message, pidfile, spath, pid, state)

    try:
        st = os.stat(pidfile)
    except FileNotFoundError:
        return result(NOT_RUNNING, "not_running", f"not running: no pidfile {pidfile}")
    except PermissionError:
        return result(UNKNOWN, "unknown", permission_message(pidfile))
    except OSError as exc:
        return result(UNKNOWN, "unknown", f"unknown: cannot look at {pidfile}: {exc.strerror}")
    locked, pid = lock_holder(pidfile, st)
    if locked is False:
        return result(NOT_RUNNING, "not_running",
                      f"not running: no process holds the lock on {pidfile} (a stale file "
                      "left by an agent that was killed)")
    try:
        with open(spath, encoding="utf-8") as fh:
            state = json.load(fh)
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except PermissionError:
        return result(UNKNOWN, "unknown", permission_message(spath), pid)
    except FileNotFoundError:
        if locked is None:
            return result(UNKNOWN, "unknown", permission_message(pidfile))
        return result(UNKNOWN, "unknown",
                      f"unknown: PID {pid or '?'} holds {pidfile} but there is no state file "
                      f"{spath} (an agent older than dm-agent status, or not started with "
                      "--daemon)", pid)
    except (OSError, ValueError) as exc:
        return result(UNKNOWN, "unknown", f"unknown: cannot read the state file {spath}: {exc}",
                      pid)
    if locked is None:  # the state says who it was; the lock cannot be told
        return result(UNKNOWN, "unknown", permission_message(pidfile), pid, state)
    if pid is not None and state.get("pid") != pid:
        return result(UNKNOWN, "unknown",
                      f"unknown: PID {pid} holds {pidfile}, but the state file {spath} is "
                      f"PID {state.get('pid')}'s (the agent is starting; ask again)", pid, state)
    code, status, message = judge(state, now)
    error = _last_error(state, now)
    for line in (error, *_gateway(state, now), *_tunnel(state, now)):
        if line:
            message += "\n" + line
    reasons = unmanageable(state)
    if manageable and code == REGISTERED and reasons:
        code, status = UNMANAGEABLE, "unmanageable"
        message += "\nnot manageable: " + "; ".join(reasons)
    return result(code, status, message, pid or state.get("pid"), state)


def to_json(res: Result, now: float) -> dict[str, Any]:
    state = res.state
    written = _num(state.get("written")) if state else None
    success = state.get("last_success") if state else None
    success_at = _num(success.get("time")) if isinstance(success, dict) else None
    return {
        "status": res.status,
        "exit_code": res.code,
        "message": res.message,
        "pid": res.pid,
        "pidfile": res.pidfile,
        "state_file": res.state_file,
        "checked": now,
        "state_age": round(now - written, 3) if written else None,
        "last_success_age": round(now - success_at, 3) if success_at else None,
        "manageable": None if state is None else not unmanageable(state),
        "unmanageable": [] if state is None else unmanageable(state),
        "state": state,
    }


def main(argv: Sequence[str]) -> int:
    args = parse_command(parser(), argv)
    if isinstance(args, int):
        return args
    now = time.time()
    res = check(pidfile_of(args.pidfile, args.config), now, manageable=args.manageable)
    if args.json:
        print(json.dumps(to_json(res, now), ensure_ascii=False, indent=2))
    else:
        print(res.message)
    return res.code
