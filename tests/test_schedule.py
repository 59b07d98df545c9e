"""The loop's schedule against a fake clock and seeded random sources: every behaviour
of dm_agent.process.schedule, deterministic, without waiting for a real second."""

from __future__ import annotations

import itertools
import random

import pytest
from support.clock import Clock

from dm_agent.process.schedule import EVENT_DEBOUNCE, EVENT_SPACING, Schedule


def schedule(interval: float = 60.0, jitter: bool = True, seed: int = 1,
             start: float = 1000.0) -> tuple[Schedule, Clock]:
    clock = Clock(start)
    return Schedule(interval, jitter, clock, random.Random(seed).random), clock


def on_grid(at: float, origin: float, interval: float) -> bool:
    k = (at - origin) / interval
    return abs(k - round(k)) < 1e-9


def first_round(s: Schedule) -> None:
    """The round the start asks for at once; it succeeds."""
    assert s.due() == "requested"
    s.finished(True)


def test_the_first_round_is_at_once_and_the_grid_begins_one_interval_later_without_jitter(
        ) -> None:
    s, clock = schedule(interval=30, jitter=False)
    assert s.next() == (clock.now, "requested")
    first_round(s)
    assert s.due() is None
    assert s.next() == (1030.0, "tick")


def test_the_grid_does_not_drift_over_10000_ticks() -> None:
    """Rounds of random length (up to 90 % of the interval) start exactly on
    origin + k × interval, for 10,000 ticks."""
    interval = 7.0
    s, clock = schedule(interval=interval, seed=3, start=1000.25)
    first_round(s)
    origin, why = s.next()
    assert why == "tick" and 1000.25 <= origin < 1000.25 + interval
    durations = random.Random(4)
    for k in range(10_000):
        at, why = s.next()
        assert why == "tick"
        assert at == pytest.approx(origin + k * interval, abs=1e-6)
        clock.now = at - 0.001
        assert s.due() is None  # not a moment early
        clock.now = at
        assert s.due() == "tick"
        clock.now += durations.uniform(0, 0.9 * interval)
        s.finished(True)
        assert s.due() is None  # one round a tick


@pytest.mark.parametrize("overrun", [1.0, 3.5, 10.01])
def test_ticks_a_long_round_overran_are_skipped_not_made_up(overrun: float) -> None:
    interval = 10.0
    s, clock = schedule(interval=interval, jitter=False)
    first_round(s)
    tick = s.next()[0]
    clock.now = tick
    assert s.due() == "tick"
    clock.now = tick + overrun * interval  # a round that took `overrun` intervals
    s.finished(True)
    at, why = s.next()
    assert why == "tick" and at > clock.now
    # the next grid point after the round's end: on the grid, less than an interval away
    assert on_grid(at, tick, interval)
    assert at - clock.now <= interval
    assert s.due() is None  # no burst of catch-up rounds


def test_backoff_doubles_from_half_a_second_and_is_capped_at_the_interval() -> None:
    """Retry n waits cap × [0.5, 1) with cap = min(interval, 2^(n-1)) s, measured from
    the end of the failed round; the grid's ticks wait while retrying."""
    interval = 20.0
    for seed in range(200):
        s, clock = schedule(interval=interval, seed=seed)
        first_round(s)
        tick = s.next()[0]
        clock.now = tick
        assert s.due() == "tick"
        for n in range(1, 12):
            s.finished(False)
            at, why = s.next()
            assert why == "retry"
            cap = min(interval, 2.0 ** (n - 1))
            assert 0.5 * cap <= at - clock.now < cap, (seed, n, at - clock.now)
            clock.now = at
            assert s.due() == "retry"
        s.finished(True)  # recovered: back on the grid, which kept its phase
        at, why = s.next()
        assert why == "tick" and on_grid(at, tick, interval)


def test_backoff_jitter_spans_its_range() -> None:
    """Over many seeds the delay of retry 5 (cap 16 s) covers [8, 16): a fleet whose
    master came back does not retry in step."""
    delays = []
    for seed in range(2000):
        s, clock = schedule(interval=60, seed=seed)
        first_round(s)
        for _ in range(4):
            s.finished(False)
            clock.now = s.next()[0]
            assert s.due() == "retry"
        s.finished(False)  # retry 5: cap 16 s
        delays.append(s.next()[0] - clock.now)
    assert min(delays) >= 8.0 and max(delays) < 16.0
    buckets = [0] * 8
    for d in delays:
        buckets[int(d - 8.0)] += 1
    assert min(buckets) > 150, buckets  # 250 expected in each


def test_kicks_coalesce_into_one_round_at_the_earliest() -> None:
    s, clock = schedule(jitter=False)
    first_round(s)
    s.kick(5.0)
    s.kick(1.0)
    s.kick(3.0)
    assert s.next() == (clock.now + 1.0, "requested")
    clock.now += 1.0
    assert s.due() == "requested"
    s.finished(True)
    assert s.due() is None  # the later kicks were the same request
    assert s.next()[1] == "tick"


def test_a_lone_event_is_registered_after_the_debounce() -> None:
    s, clock = schedule(interval=600, jitter=False)
    first_round(s)
    clock.now += 100.0
    assert s.event() == pytest.approx(EVENT_DEBOUNCE)
    assert s.next() == (pytest.approx(clock.now + EVENT_DEBOUNCE), "event")
    clock.now += EVENT_DEBOUNCE
    assert s.due() == "event"


def test_a_stream_of_events_makes_rounds_one_second_apart() -> None:
    """A change every 50 ms for 20 s (100 containers started one after another): event
    rounds are EVENT_SPACING apart, about one a second, each reporting every change up
    to it; the first comes after the debounce."""
    s, clock = schedule(interval=600, jitter=False)
    first_round(s)
    start = clock.now = clock.now + 10.0
    rounds = []
    step = 0.05
    while clock.now < start + 20:
        s.event()
        clock.now = round(clock.now + step, 6)
        while (why := s.due()) is not None:
            assert why == "event"
            rounds.append(clock.now)
            s.finished(True)
    assert rounds[0] - start == pytest.approx(EVENT_DEBOUNCE, abs=step)
    gaps = [b - a for a, b in itertools.pairwise(rounds)]
    assert min(gaps) >= EVENT_SPACING - 1e-6, gaps
    assert max(gaps) <= EVENT_SPACING + step + 1e-6, gaps
    assert 19 <= len(rounds) <= 21


def test_the_first_tick_after_a_reload_keeps_a_random_offset() -> None:
    """A reload asks for a round at once and restarts the grid at a random offset
    within the new interval: over 1,000 agents reloaded in the same second, the next
    ticks spread over the interval (chi-square over 10 buckets), never one interval
    later for all of them."""
    interval = 30.0
    offsets = []
    for seed in range(1000):
        s, clock = schedule(interval=60, seed=seed)
        first_round(s)
        clock.now += 45.5  # the reload, mid-interval
        s.failures, s.retry_at = 3, clock.now + 1  # a pending retry is forgotten
        s.restart(interval)
        assert s.next() == (clock.now, "requested")
        first_round(s)
        at, why = s.next()
        assert why == "tick"
        offsets.append(at - clock.now)
    assert all(0 <= o < interval for o in offsets)
    buckets = [0] * 10
    for o in offsets:
        buckets[int(o / interval * 10)] += 1
    chi2 = sum((b - 100) ** 2 / 100 for b in buckets)
    assert chi2 < 27.9, buckets  # p = 0.001 for 9 degrees of freedom
    assert min(offsets) < 0.05 * interval and max(offsets) > 0.95 * interval


def test_a_reload_without_jitter_restarts_the_grid_one_interval_later() -> None:
    s, clock = schedule(interval=60, jitter=False)
    first_round(s)
    clock.now += 12.0
    s.restart(5)
    first_round(s)
    assert s.next() == (clock.now + 5, "tick")
