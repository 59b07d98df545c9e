"""Where log lines go and what they look like.

- foreground: stderr, the original agent's format ``2016-08-10 15:03:04,583 - INFO - msg``;
- under systemd (``JOURNAL_STREAM`` set): stderr with sd-daemon ``<N>`` priority prefixes
  and no timestamp, so ``journalctl -p err`` filters them;
- daemonized outside systemd: syslog (``/dev/log``) when present, else ``log_file``,
  reopened when a rotation moves it away.

A broken stream (journald restarted, EPIPE) never raises into the agent.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO

SEED_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"
LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
# sd-daemon(3) priorities
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}

logger = logging.getLogger("dm_agent")


class JournalFormatter(logging.Formatter):
    """``<N>message``: journald reads the priority from the prefix of each line."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def under_journal(stream: IO[str] | None = None) -> bool:
    """True when stderr is the journal's stream (systemd sets JOURNAL_STREAM=dev:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    stream = stream or sys.stderr
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    dev, _, ino = value.partition(":")
    try:
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except ValueError:
        return False


def _stream_handler(stream: IO[str]) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    if under_journal(stream):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter(SEED_FORMAT))
    return handler


def syslog_handler(address: str = "/dev/log") -> logging.Handler | None:
    if not os.path.exists(address):
        return None
    import logging.handlers  # only here: it imports pickle, ~0.3 MB the journal never needs

    try:
        handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError:
        return None
    handler.ident = f"dm-agent[{os.getpid()}]: "
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def setup(level: int, handler: logging.Handler | None = None) -> logging.Handler:
    """Send the package's log to ``handler`` (stderr by default) at ``log_level`` 0/1/2."""
    # A failing handler must never kill the agent or stop its registrations.
    logging.raiseExceptions = False
    handler = handler or _stream_handler(sys.stderr)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    logger.setLevel(LEVELS.get(level, logging.DEBUG))
    logger.propagate = False
    return handler


def set_level(level: int) -> None:
    logger.setLevel(LEVELS.get(level, logging.DEBUG))


def daemon_handler(log_file: str | None) -> logging.Handler:
    """The handler of a daemon: the journal stream kept under systemd, else syslog,
    else the log file, else nothing but the exit status."""
    if under_journal(sys.stderr):
        return _stream_handler(sys.stderr)
    handler = syslog_handler()
    if handler is not None:
        return handler
    if log_file:
        from logging.handlers import WatchedFileHandler

        # Reopened when it is moved or removed (a stat per line): logrotate's default
        # rename-and-create works without a signal, and no line is lost between the
        # rename and a signal (docs/configuration.md, log_file).
        fh = WatchedFileHandler(log_file, encoding="utf-8", delay=False)
        fh.setFormatter(logging.Formatter(SEED_FORMAT))
        return fh
    return logging.NullHandler()
