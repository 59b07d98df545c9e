"""A pidfile that is an ``fcntl`` lock held for the process's life.

A killed agent leaves at most a file with no lock behind, which the next start takes
over; a running agent's lock makes a second start fail with the PID in the message.
The PID is written to a temporary file that is locked and then renamed over the
pidfile, so a reader (systemd's ``PIDFile=``) never sees a half-written file.

A non-root agent's pidfile may live under ``/tmp``: nothing here follows a symbolic
link, the temporary file has an unpredictable name and is created exclusively, and a
directory that other users could write to (without the sticky bit) is refused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from types import TracebackType
from typing import TYPE_CHECKING

from ..errors import AgentError, PidfileLockedError

if TYPE_CHECKING:
    from ..config.settings import Settings


def _default() -> str:
    if os.geteuid() == 0:
        return "/run/dm-agent/dm-agent.pid"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/dm-agent-{os.geteuid()}"
    return os.path.join(runtime, "dm-agent.pid")


def pidfile_path(settings: Settings) -> str:
    """The pidfile: the setting, else /run/dm-agent for root, $XDG_RUNTIME_DIR otherwise."""
    return settings.pidfile or _default()


def read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            text = fh.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class LockedPidfile:
    """Context manager: ``__enter__`` locks and writes the PID, ``__exit__`` removes it."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._fd: int | None = None

    def _lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        return True

    def _open_locked(self) -> int:
        """Open and lock the file now at the path (retrying if it was replaced meanwhile)."""
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644)
            try:
                if not self._lock(fd):
                    pid = read_pid(self.path)
                    raise PidfileLockedError(
                        f"another dm-agent is running (PID {pid if pid else 'unknown'}) "
                        f"and holds {self.path}")
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                return fd
            os.close(fd)  # another agent renamed its pidfile in: look again
        raise AgentError(f"cannot lock pidfile {self.path}: it keeps being replaced")

    def _check_directory(self, directory: str) -> None:
        """Refuse a directory where another user could replace or plant our files."""
        st = os.stat(directory)
        others = st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP
                                               and st.st_gid != os.getegid())
        if others and not st.st_mode & stat.S_ISVTX:
            raise AgentError(
                f"refusing pidfile {self.path}: its directory {directory} is writable by "
                f"other users (mode {stat.S_IMODE(st.st_mode):04o}) without the sticky bit; "
                "use a private directory (chmod o-w, or pidfile = / --pidfile elsewhere)")
        if st.st_uid not in (0, os.geteuid()):
            raise AgentError(
                f"refusing pidfile {self.path}: its directory {directory} belongs to another "
                f"user (UID {st.st_uid})")

    def _create_temporary(self) -> tuple[str, int]:
        """A new file beside the pidfile, under a name nobody could have guessed."""
        for _ in range(10):
            tmp = f"{self.path}.{os.urandom(6).hex()}.tmp"
            try:
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                return tmp, os.open(tmp, flags, 0o644)
            except FileExistsError:
                continue
        raise AgentError(f"cannot create a temporary file beside pidfile {self.path}")

    def acquire(self) -> None:
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            self._check_directory(directory)
            fd = self._open_locked()
        except OSError as exc:
            reason = ("it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror)
            raise AgentError(f"cannot open pidfile {self.path}: {reason}") from None
        try:
            tmp, tfd = self._create_temporary()
            try:
                if not self._lock(tfd):
                    raise AgentError(f"cannot lock the temporary pidfile {tmp}: another "
                                     "process holds it")
                os.write(tfd, f"{os.getpid()}\n".encode())
                os.rename(tmp, self.path)
            except BaseException:
                os.close(tfd)
                _unlink(tmp)
                raise
        except OSError as exc:
            raise AgentError(f"cannot write pidfile {self.path}: {exc.strerror}") from None
        finally:
            os.close(fd)  # the old inode; ours is the renamed one, locked through tfd
        self._fd = tfd

    def release(self) -> None:
        if self._fd is None:
            return
        if read_pid(self.path) == os.getpid():
            _unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> LockedPidfile:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
