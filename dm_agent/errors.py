"""The package's one exception tree; each error knows the exit code it ends in."""

from __future__ import annotations

from typing import Literal, NewType

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 64
EX_TEMPFAIL = 75  # another instance holds the pidfile
EX_CONFIG = 78  # the unit must not restart on it

# The kinds of a failed round, as the state file's ``last_failure.kind`` gives them
# (docs/operator-guide.md, Status; tests/test_docs.py holds the table to these).
#: the master did not take the registration (``ReportError.kind``)
MasterKind = Literal["unauthorized", "http", "connection", "timeout", "tls"]
#: the round itself: ``stuck`` (earlier rounds still blocked, none started), ``timeout``
#: (abandoned at its deadline), ``stopped`` (the agent stopped before it sent),
#: ``unknown`` (its thread ended without an outcome, which ``register`` never does)
RoundKind = Literal["stuck", "timeout", "stopped", "unknown"]
#: a round that raised: ``internal:`` and the exception's class name
#: (``internal:KeyError``), made by ``internal_kind`` only
InternalKind = NewType("InternalKind", str)
INTERNAL_KIND = "internal:"
FailureKind = MasterKind | RoundKind | InternalKind


def internal_kind(exc: BaseException) -> InternalKind:
    return InternalKind(INTERNAL_KIND + type(exc).__name__)


class AgentError(Exception):
    """Root of every error dm-agent raises on purpose."""

    exit_code = EX_FAILURE


class UsageError(AgentError):
    """The command line is wrong."""

    exit_code = EX_USAGE


class ConfigError(AgentError, ValueError):
    """A setting is missing or invalid; the message names where and what is expected."""

    exit_code = EX_CONFIG


class PidfileLockedError(AgentError):
    """Another agent holds the pidfile lock."""

    exit_code = EX_TEMPFAIL


class DockerError(AgentError):
    """Docker did not answer, or answered something unusable.

    ``kind`` groups failures for log flood control, as ReportError's does:
    ``connection`` (refused, no socket, no permission, unknown host), ``timeout``,
    ``tls``, ``api`` (an HTTP error status), ``answer`` (unusable data), ``endpoint``.
    """

    def __init__(self, message: str, kind: str = "answer") -> None:
        super().__init__(message)
        self.kind = kind


class ReportError(AgentError):
    """A registration was not accepted by the master. Built like DockerError:
    ``ReportError(message, kind)``.

    ``kind`` groups failures for log flood control: ``unauthorized``, ``http``,
    ``connection``, ``timeout``, ``tls``.
    """

    def __init__(self, message: str, kind: MasterKind = "http") -> None:
        super().__init__(message)
        self.kind: MasterKind = kind
