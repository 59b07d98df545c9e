"""The foreground/daemon loop: signals in, rounds out, on the schedule's word.

The handlers only record signals (``signals``); the loop acts on them between rounds,
asks the ``Schedule`` when the next round is, runs it in a ``RoundThread``, applies what
it came to (its ``Outcome``: logged by the agent, recorded in the state file, and the
schedule moves on), and sleeps on the self-pipe until the next (or until a signal, a
finished round or a Docker event).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

from ..config.settings import Settings
from ..round.agent import Agent
from . import reload as reloading
from .notify import Watchdog
from .rounds import STOP_GRACE, RoundThread
from .schedule import Schedule
from .services import Services
from .signals import Signals, Waker
from .state import StateWriter

log = logging.getLogger("dm_agent")


class Nudges:
    """Docker events, recorded by the event thread (``EventsService``) and acted on by the
    loop: each asks for a round soon (after the schedule's debounce)."""

    def __init__(self, waker: Waker) -> None:
        self.waker = waker
        self._pending: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, action: str) -> None:
        with self._lock:
            self._pending.append(action)
        self.waker.wake()

    def take(self) -> list[str]:
        with self._lock:
            taken, self._pending = self._pending, []
        return taken


class Dispatch:
    """Acts on the signals the handlers recorded: stop, reload, register now."""

    def __init__(self, agent: Agent, schedule: Schedule, load: Callable[[], Settings] | None,
                 services: Services) -> None:
        self.agent, self.schedule, self.load, self.services = agent, schedule, load, services

    def __call__(self, signals: Signals) -> bool:
        """Act on what arrived since last time; True when asked to stop."""
        stop = False
        for signum in signals.take():
            name = signal.Signals(signum).name
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s indicating exit request", name)
                stop = True
            elif signum == signal.SIGHUP:
                log.info("received SIGHUP, reloading the configuration")
                if self.load is not None and reloading.apply(self.agent, self.load,
                                                             self.services):
                    self.schedule.restart(self.agent.settings.interval)
            elif signum == signal.SIGUSR1:
                log.info("received SIGUSR1, registering now")
                self.schedule.kick()
        return stop


def run(agent: Agent, signals: Signals, reload: Callable[[], Settings] | None = None,
        on_first: Callable[[], None] | None = None, watchdog: Watchdog | None = None,
        state: StateWriter | None = None, services: Services | None = None,
        nudges: Nudges | None = None) -> int:
    """Register on the schedule until asked to stop; returns the exit code (0).

    ``reload`` re-reads the configuration on SIGHUP; ``state`` records every round for
    ``dm-agent status``; ``services`` run beside the rounds (started before the first,
    reloaded with the configuration, stopped last); ``nudges`` are Docker's events. With
    systemd's ``watchdog``, each iteration pings it, and no wait is longer than its
    period: a loop that stops iterating is restarted by systemd."""
    services = services if services is not None else Services()
    agent.host.prime()
    schedule = Schedule(agent.settings.interval, agent.settings.jitter)  # first round now
    act, rounds = Dispatch(agent, schedule, reload, services), RoundThread(agent.progress)
    services.start()
    if on_first is not None:
        on_first()
    try:
        return _iterate(agent, signals, schedule, act, rounds, watchdog, state, nudges)
    finally:
        by = time.monotonic() + STOP_GRACE  # one grace for the services and the round
        agent.progress.stopping.set()  # a round not sending yet (or abandoned) never will
        services.stop()
        late = rounds.finish(by)  # the round the stop came in, if it ended meanwhile
        if late is not None:
            agent.settle(late)
        agent.close()


def _iterate(agent: Agent, signals: Signals, schedule: Schedule, act: Dispatch,
             rounds: RoundThread, watchdog: Watchdog | None, state: StateWriter | None,
             nudges: Nudges | None) -> int:
    waker = signals.waker
    while True:
        if watchdog is not None:
            watchdog.ping()
        if act(signals):
            break
        for action in nudges.take() if nudges is not None else ():
            log.debug("Docker event %s: registering in %.2fs", action, schedule.event())
        if schedule.due() is not None:
            began = time.monotonic()
            outcome = rounds.run(agent.register, agent.parts.limits, signals, agent.parts.renew)
            if outcome is None:  # a stop came during the round
                act(signals)
                break
            # what the round came to, applied here only: logged, recorded, scheduled
            agent.settle(outcome)
            if state is not None:
                state.round_done(agent, outcome, time.monotonic() - began)
            schedule.finished(outcome.ok)
            continue
        wake, now = schedule.next()[0], time.monotonic()
        if watchdog is not None:
            wake = min(wake, now + watchdog.period)
        waker.wait(wake - now)
    return 0
