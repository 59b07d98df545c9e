"""``--daemon``: a SysV daemon (daemon(7)) that tells its starter when it is ready.

The invoking process forks a child and waits on a pipe. The child detaches with
python-daemon's ``DaemonContext`` (fork, ``setsid``, fork; ``detach_process=True``
because under systemd the parent is PID 1, where python-daemon would otherwise not
fork), which also chdirs to ``/``, sets the umask, closes inherited descriptors and
enters the locked pidfile. Once the daemon has its pidfile, logging and signal
handlers, it writes ``OK`` to the pipe and the invoking process exits 0 — so a
``Type=forking`` unit finds the PID file when the start returns. A daemon that cannot
start writes its exit code and reason instead, which the invoking process prints on
its terminal and exits with.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

from .. import logs
from ..config.settings import Settings
from ..errors import EX_FAILURE, EX_OK, AgentError
from ..net import redact
from .pidfile import LockedPidfile, pidfile_path
from .state import state_path

READY_TIMEOUT = 30.0


def preload(gateway: bool = False) -> None:
    """Import now what the daemon imports lazily later: a package upgrade may replace
    the program's files (and the frozen archive) under a running agent. The gateway's
    modules only when it is configured (a reload that turns it on later imports them
    then)."""
    import encodings.idna  # noqa: F401  (hostnames)
    import http.client  # noqa: F401
    import ssl  # noqa: F401
    import urllib.parse  # noqa: F401

    import docker
    import docker.api.client
    import docker.tls
    import docker.transport.unixconn
    import docker.types.daemon  # noqa: F401  (the event stream)
    import psutil  # noqa: F401
    import requests
    import requests.adapters  # noqa: F401
    import urllib3  # noqa: F401

    from ..collectors import events  # noqa: F401
    from . import runner  # noqa: F401  (the agent, the loop, the services)

    if not logs.under_journal(sys.stderr):
        import logging.handlers  # noqa: F401  (syslog or the watched log_file, outside systemd)

    try:
        import charset_normalizer  # noqa: F401  (requests' text decoding)
    except ImportError:  # pragma: no cover - optional in requests
        pass
    "probe".encode("idna")
    if gateway:
        from ..gateway import auth, edge, relay, server, tls, upstream  # noqa: F401


class _Starter:
    """The pipe to the invoking process: told exactly once, then closed.

    After that its descriptor number is free and may be reused (by a socket, the log
    file): nothing may be written to it again."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @property
    def waiting(self) -> bool:
        return self.fd >= 0

    def tell(self, message: str) -> None:
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        try:
            os.write(fd, message.encode("utf-8", "replace"))
        except OSError:
            pass  # the starter went away; nothing to tell
        try:
            os.close(fd)
        except OSError:
            pass


def _fatal(starter: _Starter, exc: BaseException, settings: Settings) -> None:
    """Say why the daemon stops: on the starter's terminal while it is still starting,
    else in the daemon's own log (journal, syslog or log_file), with the traceback."""
    reason = redact(f"{type(exc).__name__}: {exc}", settings.secret)
    if starter.waiting:
        starter.tell(f"ERR {EX_FAILURE} {reason}")
    else:
        logs.logger.critical("the daemon stops on an unexpected error: %s", reason,
                             exc_info=True)


def _wait_ready(rfd: int) -> tuple[int, str]:
    """In the invoking process: read the daemon's verdict (code, message)."""
    import select

    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([rfd], [], [], READY_TIMEOUT)
        if not ready:
            return EX_FAILURE, f"the daemon did not report readiness within {READY_TIMEOUT:g}s"
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    text = b"".join(chunks).decode("utf-8", "replace")
    if text.startswith("OK"):
        return EX_OK, text[2:].strip()
    if text.startswith("ERR "):
        code, _, message = text[4:].partition(" ")
        return (int(code) if code.isdigit() else EX_FAILURE), message.strip()
    return EX_FAILURE, "the daemon exited during start-up without saying why"


def run(settings: Settings, warnings: list[str], reload: Callable[[], Settings],
        dry_run: bool = False) -> int:
    """Start the daemon; in the invoking process returns the exit code."""
    preload(bool(settings.gateway))
    pidpath = pidfile_path(settings)
    starter_pid = os.getpid()  # systemd's WATCHDOG_PID names it
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        code, message = _wait_ready(rfd)
        os.close(rfd)
        os.waitpid(pid, 0)
        if code != EX_OK:
            print(f"dm-agent: {message}", file=sys.stderr)
        return code
    os.close(rfd)
    code = EX_FAILURE
    starter = _Starter(wfd)
    try:
        code = _daemon(settings, warnings, reload, dry_run, pidpath, starter, starter_pid)
    except BaseException as exc:  # nothing may escape a fork
        _fatal(starter, exc, settings)
    finally:
        logging.shutdown()
        os._exit(code)


def _daemon(settings: Settings, warnings: list[str], reload: Callable[[], Settings],
            dry_run: bool, pidpath: str, starter: _Starter, starter_pid: int) -> int:
    import daemon as pydaemon  # python-daemon

    keep_streams = logs.under_journal(sys.stderr)  # the journal's streams stay ours
    pidfile = LockedPidfile(pidpath)
    context = pydaemon.DaemonContext(
        detach_process=True,
        working_directory="/",
        umask=0o022,
        pidfile=pidfile,
        files_preserve=[starter.fd],
        stdout=sys.stdout if keep_streams else None,
        stderr=sys.stderr if keep_streams else None,
        signal_map={signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None,
                    signal.SIGPIPE: signal.SIG_IGN},
    )
    try:
        context.open()  # the first child exits in here; the daemon goes on
    except AgentError as exc:  # the pidfile is entered last, in the daemon itself
        starter.tell(f"ERR {exc.exit_code} {exc}")
        return exc.exit_code
    try:
        handler = logs.daemon_handler(settings.log_file)
    except OSError as exc:
        context.close()
        starter.tell(f"ERR {EX_FAILURE} cannot open log_file {settings.log_file}: "
                     f"{exc.strerror}")
        return EX_FAILURE
    logs.setup(settings.log_level, handler)
    for warning in warnings:
        logs.logger.warning("%s", warning)

    from . import runner
    from .notify import Watchdog

    watchdog = Watchdog.from_env({starter_pid, os.getpid()})
    try:
        return runner.serve(settings, reload, dry_run=dry_run, state_file=state_path(pidpath),
                            watchdog=watchdog, on_ready=lambda: starter.tell("OK"),
                            started=f"started as daemon (PID {os.getpid()}, pidfile {pidpath})")
    except Exception as exc:  # a bug: say it where the operator looks, then exit 1
        _fatal(starter, exc, settings)
        return EX_FAILURE
    finally:
        logs.logger.info("stopped")
        context.close()  # leaves the pidfile context: unlocks and removes it
