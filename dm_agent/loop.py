"""The foreground/daemon loop: signals in, rounds out, on the schedule's word.

The handlers only record signals (``signals``); the loop acts on them between rounds,
asks the ``Schedule`` when the next round is, runs it in a ``RoundThread`` and sleeps
on the self-pipe until then (or until a signal, a finished round or a Docker event).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable

from . import reload as reloading
from .agent import Agent
from .config import Settings
from .notify import Watchdog
from .rounds import RoundThread
from .schedule import Schedule
from .signals import Signals
from .state import StateWriter

log = logging.getLogger("dm_agent")


class Dispatch:
    """Acts on the signals the handlers recorded: stop, reload, register now."""

    def __init__(self, agent: Agent, schedule: Schedule, load: Callable[[], Settings] | None,
                 on_change: Callable[[str], None]) -> None:
        self.agent, self.schedule, self.load, self.on_change = agent, schedule, load, on_change

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
                                                             self.on_change):
                    self.schedule.restart(self.agent.settings.interval)
            elif signum == signal.SIGUSR1:
                log.info("received SIGUSR1, registering now")
                self.schedule.kick()
        return stop


def run(agent: Agent, signals: Signals, reload: Callable[[], Settings] | None = None,
        on_first: Callable[[], None] | None = None, watchdog: Watchdog | None = None,
        state: StateWriter | None = None) -> int:
    """Register on the schedule until asked to stop; returns the exit code (0).

    ``reload`` re-reads the configuration on SIGHUP; ``state`` records every round for
    ``dm-agent status``. With systemd's ``watchdog``, each iteration pings it, and no
    wait is longer than its period: a loop that stops iterating is restarted by systemd."""
    waker = signals.waker

    def on_change(action: str) -> None:  # from the event thread: a container changed
        log.debug("Docker event %s: registering in %.2fs", action, schedule.event())
        waker.wake()

    agent.host.prime()
    schedule = Schedule(agent.settings.interval, agent.settings.jitter)  # first round now
    act, rounds = Dispatch(agent, schedule, reload, on_change), RoundThread(agent.progress)
    if not agent.dry_run:
        agent.parts.source.start_events(on_change)
    if on_first is not None:
        on_first()
    while True:
        if watchdog is not None:
            watchdog.ping()
        if act(signals):
            break
        if schedule.due() is not None:
            began = time.monotonic()
            ok = rounds.run(agent.register, agent.settings.interval, signals,
                            agent.round_failed, agent.parts.renew)
            if ok is None:  # a stop came during the round
                act(signals)
                break
            if state is not None:
                state.round_done(agent, ok, time.monotonic() - began)
            schedule.finished(ok)
            continue
        wake, now = schedule.next()[0], time.monotonic()
        if watchdog is not None:
            wake = min(wake, now + watchdog.period)
        waker.wait(wake - now)
    agent.close()
    return 0
