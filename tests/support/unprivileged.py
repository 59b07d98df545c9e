"""The fast tier as an unprivileged user, beside the rest of the suite (``--unprivileged``).

``make test`` runs as root, and the fast tier promises to need no root. So that the
promise is proven rather than claimed, a root run with ``--unprivileged`` does not run
the fast tier's tests itself. At the end of collection it makes a new user
(``useradd``), copies the tree into a directory that user owns, makes a venv there with
Debian's ``python3`` (the root's Python may live where no other user can enter, such as
pyenv's under ``/root``), and runs ``pytest`` on exactly those tests as that user
(``setpriv``), in the background, while the root run goes on with its own tests. They
are ordered last; by the time the root run reaches them, their reports have mostly come
back. Each report comes back over a pipe, serialised as pytest serialises reports for
pytest-xdist, and the root run reports it as its own: one closing line counts every
test, each with the outcome it had as the unprivileged user. A test the other run did
not report fails, with the end of that run's output. The user, its processes and its
files are removed at the end.

Why concurrently: most of the fast tier's three minutes are spent waiting on real
agents' 1–2 s intervals, so beside the root run's own tests it adds little wall time,
where running it in sequence would add all of it (docs/developer-guide.md, Test tiers).

The other side, ``--relay-fd N`` (internal), is the plugin of the unprivileged run: it
writes one JSON line per report, per warning, and one at the start and the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

#: the Python the unprivileged user runs: Debian's, which every user may run (.ci/deps
#: installs python3-venv for its venv)
PYTHON = "/usr/bin/python3"
#: the longest the whole unprivileged run may take, set-up included (it takes minutes)
DEADLINE = 40 * 60.0
#: what is not copied into the user's tree: version control, venvs, build outputs, caches
NOT_COPIED = (".git", ".venv*", "build", "dist", "__pycache__", ".*_cache", ".hypothesis",
              "*.egg-info")
#: the environment of the user's run: what a login gives, nothing of root's
PATH = "/usr/local/bin:/usr/bin:/bin"


def addoption(group: pytest.OptionGroup) -> None:
    group.addoption("--unprivileged", action="store_true",
                    help="(root) run the fast tier's tests of this selection as a new "
                    "unprivileged user, beside the other tests (tests/support/unprivileged.py)")
    group.addoption("--relay-fd", type=int, help="(internal) the unprivileged run's reports "
                    "go to this file descriptor")


def configure(config: pytest.Config, in_fast_tier: Callable[[pytest.Item], bool]) -> None:
    """Register the side this run plays, if any."""
    fd = config.getoption("relay_fd")
    if fd is not None:
        config.pluginmanager.register(Relay(config, os.fdopen(fd, "w", encoding="utf-8")),
                                      "dm-relay")
    elif config.getoption("unprivileged") and os.geteuid() == 0:
        config.pluginmanager.register(Delegate(config, in_fast_tier), "dm-unprivileged")


# --- the unprivileged run ------------------------------------------------------------

class Relay:
    """Sends every report and warning of this run up the pipe, one JSON line each."""

    def __init__(self, config: pytest.Config, out: IO[str]) -> None:
        self.config, self.out = config, out
        self.send({"event": "start", "uid": os.geteuid(), "gid": os.getegid(),
                   "groups": os.getgroups(), "python": sys.executable,
                   "version": sys.version.split()[0]})

    def send(self, message: dict[str, Any]) -> None:
        if self.out.closed:  # a warning after the session's end
            return
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config,
                                                              report=report)
        self.send({"event": "report", "nodeid": report.nodeid, "report": data})

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.send({"event": "collect-error", "nodeid": report.nodeid,
                       "text": str(report.longrepr)})

    def pytest_warning_recorded(self, warning_message: warnings.WarningMessage, when: str,
                                nodeid: str) -> None:
        self.send({"event": "warning", "nodeid": nodeid, "when": when,
                   "message": str(warning_message.message),
                   "category": warning_message.category.__name__,
                   "filename": warning_message.filename, "lineno": warning_message.lineno})

    def pytest_sessionfinish(self, exitstatus: int) -> None:
        self.send({"event": "finish", "exitstatus": int(exitstatus)})
        self.out.close()


# --- the root run ----------------------------------------------------------------------

class Delegate:
    """The root side: picks the fast tier's tests, has them run as another user, and
    reports what that run reports for each."""

    def __init__(self, config: pytest.Config, in_fast_tier: Callable[[pytest.Item], bool]
                 ) -> None:
        self.config = config
        self.in_fast_tier = in_fast_tier
        self.delegated: set[str] = set()
        self.run: Run | None = None

    @pytest.hookimpl(trylast=True)  # after -m and -k have deselected
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        if self.config.option.collectonly:
            return
        theirs = [item for item in items if self.in_fast_tier(item)]
        if not theirs:
            return
        self.delegated = {item.nodeid for item in theirs}
        items[:] = [item for item in items if item.nodeid not in self.delegated] + theirs
        self.run = Run(Path(str(self.config.rootpath)), [item.nodeid for item in theirs])
        self.run.start()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> bool | None:
        if item.nodeid not in self.delegated or self.run is None:
            return None
        if self.run.own_done is None:  # the root run's own tests are over
            self.run.own_done = time.monotonic()
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for kind, data in self.run.results(item.nodeid):
            if kind == "warning":
                self._warn(data, item)
            else:
                report = self.config.hook.pytest_report_from_serializable(
                    config=self.config, data=data)
                ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _warn(self, data: dict[str, Any], item: pytest.Item) -> None:
        category = _warning_class(data.get("category", ""))
        message = warnings.WarningMessage(category(data["message"]), category,
                                          data.get("filename", ""), data.get("lineno", 0))
        item.ihook.pytest_warning_recorded.call_historic(kwargs={
            "warning_message": message, "when": data.get("when", "runtest"),
            "nodeid": data.get("nodeid", item.nodeid), "location": None})

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.run is not None:
            self.run.thread.join(timeout=60)  # its reports are in: it is exiting
            terminalreporter.write_sep("-", "unprivileged fast tier")
            terminalreporter.write_line(self.run.summary())

    def pytest_unconfigure(self) -> None:
        if self.run is not None:
            self.run.close()


def _warning_class(name: str) -> type[Warning]:
    """The warning class of that name (pytest's or a builtin), else UserWarning."""
    import builtins

    found = getattr(pytest, name, None) or getattr(builtins, name, None)
    return found if isinstance(found, type) and issubclass(found, Warning) else UserWarning


class Run:
    """A new user, a copy of the tree, a venv, and ``pytest NODEIDS`` as that user."""

    def __init__(self, root: Path, nodeids: list[str]) -> None:
        self.root, self.nodeids = root, nodeids
        self.user = f"dm-fast-{os.getpid()}"
        self.top = Path(tempfile.mkdtemp(prefix="dm-fast-"))
        self.log = self.top / "run.log"
        self.uid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: str | None = None
        self.started = time.monotonic()
        self.ready: float | None = None
        self.ended: float | None = None
        #: when the root run reached the first of these tests, its own being done
        self.own_done: float | None = None
        self.exitstatus: int | None = None
        self.who: dict[str, Any] = {}
        self.reports: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self.done: set[str] = set()
        self.finished = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._main, name="unprivileged", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # the background thread

    def _main(self) -> None:
        try:
            self._prepare()
            self._run()
        except Exception as exc:
            with self.cond:
                self.error = f"{type(exc).__name__}: {exc}"
        finally:
            with self.cond:
                self.ended = time.monotonic()
                self.finished = True
                self.cond.notify_all()

    def _step(self, cmd: list[str], **kw: Any) -> None:
        with open(self.log, "ab") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=DEADLINE, **kw)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])}… exited {proc.returncode} (its output "
                               "below)")

    def _prepare(self) -> None:
        if not os.access(PYTHON, os.X_OK):
            raise RuntimeError(f"{PYTHON} is missing: install Debian's python3 and "
                               "python3-venv (bash .ci/deps)")
        self.top.chmod(0o755)
        home, tree, venv = self.top / "home", self.top / "tree", self.top / "venv"
        home.mkdir()
        self._step(["useradd", "--no-create-home", "--home-dir", str(home), "--user-group",
                    "--shell", "/bin/sh", "--comment", "dm-agent tests, the fast tier",
                    self.user])
        import pwd

        self.uid = pwd.getpwnam(self.user).pw_uid
        shutil.copytree(self.root, tree, symlinks=True,
                        ignore=shutil.ignore_patterns(*NOT_COPIED))
        (self.top / "nodeids").write_text("".join(f"{n}\n" for n in self.nodeids),
                                          encoding="utf-8")
        # root's pip cache makes the venv in seconds; then it is handed to the user
        env = {"PATH": PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
               "PIP_ROOT_USER_ACTION": "ignore", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
               "PIP_NO_INPUT": "1"}
        for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS",
                    "PIP_CONFIG_FILE"):
            if key in os.environ:
                env[key] = os.environ[key]
        self._step([PYTHON, "-m", "venv", str(venv)], env=env)
        self._step([str(venv / "bin" / "pip"), "install", "-q", "-e", f"{tree}[test]"],
                   env=env, cwd=str(tree))
        self._step(["chown", "-R", f"{self.user}:{self.user}", str(self.top)])
        self.ready = time.monotonic()

    def _run(self) -> None:
        read, write = os.pipe()
        env = {"PATH": PATH, "HOME": str(self.top / "home"), "LANG": "C.UTF-8",
               "USER": self.user, "LOGNAME": self.user, "SHELL": "/bin/sh"}
        cmd = ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups",
               "--", str(self.top / "venv" / "bin" / "python"), "-m", "pytest",
               "-p", "no:cacheprovider", "-q", f"--relay-fd={write}",
               f"@{self.top / 'nodeids'}"]
        with open(self.log, "ab") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, cwd=self.top / "tree", env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         pass_fds=(write,), start_new_session=True)
        os.close(write)
        killer = threading.Timer(max(1.0, self.started + DEADLINE - time.monotonic()),
                                 self._kill)
        killer.daemon = True
        killer.start()
        try:
            with os.fdopen(read, encoding="utf-8") as pipe:
                for line in pipe:
                    self._take(line)
            self.exitstatus = self.proc.wait()
        finally:
            killer.cancel()

    def _take(self, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        event = message.get("event")
        with self.cond:
            if event == "start":
                self.who = message
            elif event == "report":
                nodeid = message["nodeid"]
                self.reports.setdefault(nodeid, []).append(("report", message["report"]))
                if message["report"].get("when") == "teardown":
                    self.done.add(nodeid)
            elif event == "warning":
                self.reports.setdefault(message.get("nodeid") or "", []).append(
                    ("warning", message))
            elif event == "collect-error":
                self.error = f"collecting {message['nodeid']} failed: {message['text']}"
            self.cond.notify_all()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.error = f"the run did not end within {DEADLINE:.0f} s"
            os.killpg(self.proc.pid, signal.SIGKILL)

    # the root run's side

    def results(self, nodeid: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """What the unprivileged run reported of ``nodeid``, waiting for it; a failed
        report when it never will."""
        with self.cond:
            self.cond.wait_for(lambda: nodeid in self.done or self.finished)
            got = self.reports.pop(nodeid, [])
            fine = nodeid in self.done and self.who.get("uid") not in (None, 0)
            problem = self.error
        yield from got
        if not fine:
            why = ("it ran as root" if self.who.get("uid") == 0 else
                   problem or f"it did not report this test (exit status {self.exitstatus})")
            yield "report", {
                "$report_type": "TestReport", "nodeid": nodeid,
                "location": (nodeid.split("::")[0], None, nodeid), "keywords": {},
                "outcome": "failed", "when": "call", "duration": 0.0, "sections": [],
                "user_properties": [],
                "longrepr": f"the unprivileged run of the fast tier (user {self.user}): "
                            f"{why}\n{self.tail()}"}

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def summary(self) -> str:
        with self.cond:
            who = self.who
            ended = self.ended if self.ended is not None else time.monotonic()
            setup = (self.ready or ended) - self.started
        user = f"user {self.user} (uid {who.get('uid')}, gid {who.get('gid')})" if who \
            else f"user {self.user} (it did not start)"
        python = f", {who.get('python')} {who.get('version')}" if who else ""
        own = self.own_done if self.own_done is not None else ended
        waited = max(0.0, ended - own)
        return (f"{len(self.nodeids)} tests run as {user}{python}, beside the root run: "
                f"{ended - self.started:.0f} s from collection to its end "
                f"(copy and venv {setup:.0f} s), exit status {self.exitstatus}; the root "
                f"run's own tests took {own - self.started:.0f} s, then it waited "
                f"{waited:.0f} s for these"
                + (f"; {self.error}" if self.error else ""))

    def close(self) -> None:
        """Kill what is left of the user's processes, remove the user and its files."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.thread.join(timeout=60)
        if self.uid is not None:
            _kill_processes_of(self.uid)
            subprocess.run(["userdel", self.user], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
            shutil.rmtree(f"/tmp/pytest-of-{self.user}", ignore_errors=True)
        shutil.rmtree(self.top, ignore_errors=True)


def _kill_processes_of(uid: int) -> None:
    """SIGKILL each process of ``uid``, by PID: a daemon a test left behind (the user
    is this run's own, so every process it has is one of ours)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as fh:
                uids = next((line.split()[1:] for line in fh if line.startswith("Uid:")), [])
        except OSError:
            continue
        if str(uid) in uids:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass
