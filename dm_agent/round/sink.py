"""Where a round's registration goes: printed for ``--dry-run``, else sent to the master."""

from __future__ import annotations

import json
from typing import IO, Any

from ..config.settings import Settings
from ..errors import FailureKind, ReportError
from . import payload
from .bounds import Progress
from .reporter import Reporter

#: A failed delivery, or round: (kind, message), as the state file reports it (the kinds:
#: errors.FailureKind, so that mypy holds every one to the operator's guide's list).
Failure = tuple[FailureKind, str]


class Printer:
    """``--dry-run``: the registration JSON on stdout; a closed stdout is not a failure."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def send(self, body: dict[str, Any], deadline: float | None = None) -> Failure | None:
        try:
            self.out.write(json.dumps(body, ensure_ascii=False, indent=2) + "\n")
            self.out.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass
        return None

    def renew(self) -> None:
        pass

    def close(self) -> None:
        pass


class MasterSink:
    """The master: the encoder and the reporter, with the (connect, read) timeout of each
    request. What a delivery came to is the round's outcome, which the agent logs."""

    def __init__(self, settings: Settings, progress: Progress,
                 timeout: tuple[float, float]) -> None:
        self.settings = settings
        self.progress = progress
        self.timeout = timeout
        self.encoder = payload.Encoder()
        self.reporter = self._reporter()

    def _reporter(self) -> Reporter:
        s = self.settings
        assert s.master is not None  # a MasterSink is built only with a master
        return Reporter(s.master, s.secret, s.master_ca, self.timeout)

    def send(self, body: dict[str, Any], deadline: float | None = None) -> Failure | None:
        """Deliver ``body`` by ``deadline`` (monotonic); the failure, or None."""
        reporter, doing = self.reporter, self.progress.doing
        doing("encoding the registration")
        data = self.encoder.encode(body)
        if self.progress.stopping.is_set():  # the exit may come at any moment now
            return "stopped", "not sent: the agent is stopping"
        doing(f"sending the registration to {reporter.master}")
        try:
            reporter.send(body["name"], self.settings.ttl, data, deadline=deadline)
        except ReportError as exc:
            return exc.kind, str(exc)
        return None

    def renew(self) -> None:
        """A fresh client after a round was abandoned: the old one is cut and closed."""
        self.reporter.abort()
        self.reporter.close()
        self.reporter = self._reporter()

    def close(self) -> None:
        self.reporter.close()
