"""Unit tests of the loop's pure parts: backoff, round limits, fleet spread, log flood
control, the node source's re-read policy. (The schedule itself: test_schedule.py.)"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
from support.clock import Clock

from dm_agent.process import schedule
from dm_agent.round import bounds
from dm_agent.round.outage import Outage, fmt_duration


def test_backoff_grows_exponentially_and_is_capped_at_the_interval() -> None:
    lo = [schedule.backoff(n, 60, rand=lambda: 0.0) for n in range(1, 10)]
    hi = [schedule.backoff(n, 60, rand=lambda: 0.999999) for n in range(1, 10)]
    assert lo == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert all(h <= 60 for h in hi) and hi[-1] > 59.9
    assert max(schedule.backoff(20, 5) for _ in range(200)) <= 5


def test_backoff_is_jittered() -> None:
    rng = random.Random(7)
    delays = {round(schedule.backoff(4, 60, rng.random), 3) for _ in range(50)}
    assert len(delays) > 40


def test_timeouts_are_shorter_than_the_interval() -> None:
    for interval in (1, 2, 5, 60, 3600):
        t = bounds.timeouts(interval)
        assert t.docker < interval or t.docker <= 0.8 * interval + 1e-9
        assert t.http[0] < interval and t.http[1] < interval
        assert t.disk < interval
        assert t.round < t.abandon < interval  # the whole round, DNS included
        assert t.abandon <= bounds.ROUND_MAX
    # the unit's WatchdogSec is twice the longest round
    unit = (Path(__file__).parents[1] / "systemd/dm-agent.service").read_text()
    assert f"\nWatchdogSec={2 * bounds.ROUND_MAX:g}\n" in unit


def test_thousand_agents_started_together_spread_evenly() -> None:
    """1,000 agents (their real Schedule, each with its own random source) started in
    the same second: their periodic rounds cover the interval evenly (chi-square over
    10 buckets); without jitter they all tick one interval after their start."""
    interval = 60.0
    rng = random.Random(2026)
    phases, lockstep = [], []
    for seed in range(1000):
        start = 1000.0 + rng.random()  # all within the same second
        for jitter, out in ((True, phases), (False, lockstep)):
            s = schedule.Schedule(interval, jitter, clock=Clock(start),
                                  rand=random.Random(seed).random)
            assert s.due() == "requested"  # the node appears at once
            s.finished(True)
            at, why = s.next()
            assert why == "tick"
            out.append(at - start)
    assert all(0 <= p < interval for p in phases)
    buckets = [0] * 10
    for phase in phases:
        buckets[int(phase / interval * 10)] += 1
    chi2 = sum((b - 100) ** 2 / 100 for b in buckets)
    assert chi2 < 27.9, buckets  # p = 0.001 for 9 degrees of freedom
    # the busiest second of the interval holds a handful, not the fleet
    per_second = [0] * int(interval)
    for phase in phases:
        per_second[int(phase)] += 1
    assert max(per_second) < 35, max(per_second)
    assert lockstep == pytest.approx([interval] * 1000)  # what jitter = no does


def test_outage_logs_first_error_summarises_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "dm_agent")
    clock = Clock()
    outage = Outage("registration", clock)
    for _ in range(50):
        outage.failed("connection", "cannot reach http://m:1: Connection refused")
        clock.now += 5
    outage.recovered()
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    errors = [m for lvl, m in records if lvl >= logging.ERROR]
    warnings = [m for lvl, m in records if lvl == logging.WARNING]
    infos = [m for lvl, m in records if lvl == logging.INFO]
    assert errors == ["cannot reach http://m:1: Connection refused"]
    assert warnings == []
    assert infos == ["registration recovered after 50 failed attempts over 4m10s"]
    assert sum(1 for lvl, _ in records if lvl == logging.DEBUG) == 49


def test_outage_kind_change_warns_once_and_hourly_summary(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "dm_agent")
    clock = Clock()
    outage = Outage("registration", clock)
    kinds = ["connection", "http", "connection", "http"] * 500
    for kind in kinds:
        outage.failed(kind, f"failure of kind {kind}")
        clock.now += 4
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines[0] == (logging.ERROR, "failure of kind connection")
    assert lines[1] == (logging.WARNING, "registration still failing, now: failure of kind http")
    # 2,000 attempts over 8,000 s: two hourly summaries, nothing else
    assert len(lines) == 4 and all("still failing:" in m for _, m in lines[2:])


def test_fmt_duration() -> None:
    assert fmt_duration(5) == "5s"
    assert fmt_duration(125) == "2m05s"
    assert fmt_duration(7322) == "2h02m"


def test_info_is_reused_only_between_periodic_rounds_of_a_connected_stream() -> None:
    """An event-triggered round within half an interval of the last /info read keeps its
    name and labels; a periodic round (an interval later), a reconnect of the event
    stream, or a stream that is down read /info again."""
    from dm_agent.collectors.events import EventWatcher
    from dm_agent.config.settings import Settings
    from dm_agent.round.bounds import Progress
    from dm_agent.round.source import NodeSource

    clock = Clock()
    source = NodeSource(Settings(interval=60), Progress(), Outage("Docker"), 10.0, clock=clock)
    assert source.reinfo() == (True, -1)  # no stream
    events = EventWatcher(lambda: None, lambda action: None)  # never started
    source.events = events
    events.connected, events.connects = True, 1
    assert source.reinfo() == (True, 1)  # never read with this connection
    source._info_connects, source._info_at = 1, clock.now
    clock.now += 29
    assert source.reinfo()[0] is False  # an event round, 29 s after the read
    clock.now += 31
    assert source.reinfo()[0] is True  # the next periodic round
    clock.now -= 31
    events.connects = 2
    assert source.reinfo() == (True, 2)  # reconnected: the Engine may have restarted
    events.connected = False
    assert source.reinfo() == (True, -1)
