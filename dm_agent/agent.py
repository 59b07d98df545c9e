"""The agent: one registration round, and the loop that schedules rounds.

The loop keeps a fixed grid (ticks at origin + k × interval, so a slow round does not
make the schedule drift), retries failures with capped exponential backoff and
jitter, acts on the signals the handlers recorded, and registers at once when asked
(SIGUSR1, a Docker event, a reload).
"""

from __future__ import annotations

import json
import logging
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import psutil

from . import logs, nodename, payload
from .collectors.docker import DockerCollector, DockerTLS, NodeInfo, connect, tcp_address
from .collectors.events import EventWatcher
from .collectors.host import HostCollector
from .config import Settings, is_excluded
from .errors import ConfigError, DockerError, ReportError
from .reporter import Reporter
from .signals import Signals, Waker
from .state import StateWriter

log = logging.getLogger("dm_agent")

# A container change is registered after EVENT_DEBOUNCE s (so a burst coalesces), and
# event-driven registrations are at least EVENT_SPACING s apart: 100 containers started
# together make a handful of registrations, a lone change is at the master within 1 s.
EVENT_DEBOUNCE = 0.2
EVENT_SPACING = 1.0
# With a live event stream the container list is re-read only after a change, and at
# least this often (seconds) in case the stream missed something.
RELIST_EVERY = 600.0


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def timeouts(interval: int) -> dict[str, Any]:
    """Bounds of every network call and probe of a round, all shorter than the interval."""
    return {
        "docker": _clamp(0.8 * interval, 0.5, 10.0),
        "http": (_clamp(0.4 * interval, 0.5, 5.0), _clamp(0.8 * interval, 0.5, 15.0)),
        "disk": _clamp(0.25 * interval, 0.2, 1.0),
    }


def backoff(failures: int, interval: float, rand: Callable[[], float] = random.random) -> float:
    """Delay before retry number ``failures``: 1, 2, 4 … s capped at the interval,
    scaled by a random factor in [0.5, 1) so a fleet does not retry in step."""
    cap = min(float(interval), 2.0 ** max(0, failures - 1))
    return cap * (0.5 + 0.5 * rand())


def first_tick(start: float, interval: float, jitter: bool,
               rand: Callable[[], float] = random.random) -> float:
    """When the periodic schedule begins, after the immediate first registration:
    at a random offset within the interval (so a fleet started together spreads out),
    or one interval later without jitter. The grid then runs fixed from there."""
    return start + (rand() * interval if jitter else interval)


def fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Outage:
    """Log flood control for one source: the first failure at ERROR, repeats at DEBUG
    (one WARNING if the failure changes kind, one summary an hour), recovery at INFO."""

    SUMMARY_EVERY = 3600.0

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.clock = clock
        self.kind: str | None = None
        self.message = ""
        self.count = 0
        self.since = 0.0
        self._summary_at = 0.0
        self._changed = False

    @property
    def active(self) -> bool:
        return self.kind is not None

    def failed(self, kind: str, message: str) -> None:
        now = self.clock()
        self.message = message
        if self.kind is None:
            log.error("%s", message)
            self.kind, self.count, self.since, self._summary_at = kind, 1, now, now
            self._changed = False
            return
        self.count += 1
        if kind != self.kind and not self._changed:
            self._changed = True
            self.kind = kind
            log.warning("%s still failing, now: %s", self.what, message)
        elif now - self._summary_at >= self.SUMMARY_EVERY:
            self._summary_at = now
            log.warning("%s still failing: %d attempts in %s; last: %s", self.what,
                        self.count, fmt_duration(now - self.since), message)
        else:
            log.debug("%s failed again (%d): %s", self.what, self.count, message)

    def recovered(self) -> None:
        if self.kind is None:
            return
        log.info("%s recovered after %d failed attempt%s over %s", self.what, self.count,
                 "" if self.count == 1 else "s", fmt_duration(self.clock() - self.since))
        self.kind = None
        self.count = 0


def route_address(master: str | None) -> str | None:
    """IP of the interface that routes to the master (a UDP connect sends no packet)."""
    if master:
        from urllib.parse import urlsplit

        url = urlsplit(master)
        try:
            infos = socket.getaddrinfo(url.hostname, url.port or 80, type=socket.SOCK_DGRAM)
            family, _, _, _, sockaddr = infos[0]
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect(sockaddr)
                ip = str(sock.getsockname()[0])
                if ip and not ip.startswith("127.") and ip != "::1":
                    return ip
        except (OSError, IndexError, ValueError):
            pass
    return first_host_ip()


def first_host_ip() -> str | None:
    """First IPv4 address of a real interface (not lo, veth*, docker*, br-*)."""
    try:
        interfaces = psutil.net_if_addrs()
    except OSError:  # e.g. AF_NETLINK refused by a sandbox: the address stays a gap
        return None
    for name, addrs in sorted(interfaces.items()):
        if is_excluded(name, ("lo", "veth*", "docker*", "br-*")):
            continue
        for addr in addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                return str(addr.address)
    return None


class Agent:
    """Collects and registers. ``reload_settings`` re-reads the configuration on SIGHUP."""

    def __init__(self, settings: Settings, dry_run: bool = False,
                 reload_settings: Callable[[], Settings] | None = None,
                 out: IO[str] | None = None) -> None:
        self.settings = settings
        self.dry_run = dry_run
        self.reload_settings = reload_settings
        self.out = out or sys.stdout
        self.docker_outage = Outage("Docker")
        self.master_outage = Outage("registration")
        self._last_node: NodeInfo | None = None
        self._kick_at: float | None = None
        self._kick_lock = threading.Lock()
        self._kick_is_event = False
        self._last_event_round = -EVENT_SPACING
        self.events: EventWatcher | None = None
        self._stopping = False
        self.waker = Waker()
        self.host = HostCollector(settings.net_exclude, timeouts(settings.timeout)["disk"])
        self.docker: DockerCollector
        self.reporter: Reporter | None = None
        self._address: str | None = None
        self._encoder = payload.Encoder()
        self._listed_generation = -1
        self._listed_at = 0.0
        #: what the state file reports: the last round's failure (kind, message), the
        #: node name and the number of containers of the last registration built
        self.last_error: tuple[str, str] | None = None
        self.node_name: str | None = None
        self.containers_reported = 0
        self.state: StateWriter | None = None
        self._info_connects = -1
        self._info_at = 0.0
        self._refused_name: str | None = None
        #: the master generation, for the state file: None, as the default body is read
        #: by both generations, so the agent never needs to find out (README, *Masters*)
        self.master_generation: str | None = None
        self._build(settings)

    @property
    def time_format(self) -> str:
        """The ``time`` format in use (``utc`` or ``local``), for the state file."""
        return self.settings.time_format

    # -- components
    def _build(self, s: Settings) -> None:
        t = timeouts(s.timeout)
        tls = None
        if s.docker_tls_cert and s.docker_tls_key:
            tls = DockerTLS(s.docker_tls_ca, s.docker_tls_cert, s.docker_tls_key)
        self.docker = DockerCollector(s.docker, tls, t["docker"])
        self._tls = tls
        self.host.net_exclude = s.net_exclude
        self.host.disks.deadline = t["disk"]
        self.reporter = None
        if s.master and not self.dry_run:
            self.reporter = Reporter(s.master, s.secret, s.master_ca, t["http"])
        self._address = None

    def start_events(self) -> None:
        """Follow Docker's event stream (``docker_events = yes``) in a daemon thread."""
        s, tls, timeout = self.settings, self._tls, timeouts(self.settings.timeout)["docker"]
        if s.docker_events and self.events is None:
            self.events = EventWatcher(lambda: connect(s.docker, tls, timeout),
                                       self.on_docker_event)
            self.events.start()

    def on_docker_event(self, action: str) -> None:
        """Called from the event thread: ask for a registration, coalescing bursts."""
        now = time.monotonic()
        at = max(now + EVENT_DEBOUNCE, self._last_event_round + EVENT_SPACING)
        log.debug("Docker event %s: registering in %.2fs", action, at - now)
        self.kick(at - now, from_event=True)

    def close(self) -> None:
        if self.events is not None:
            self.events.stop()
            self.events = None
        self.docker.close()
        if self.reporter is not None:
            self.reporter.close()

    def address(self) -> str:
        s = self.settings
        tcp = tcp_address(s.docker)
        if tcp:
            return s.address or tcp
        if s.address:
            return s.address
        if self._address is None:
            self._address = route_address(s.master) or socket.gethostname()
        return self._address

    # -- one round
    def _relist(self) -> tuple[bool, int]:
        """Whether this round must re-read the container list, and the event generation
        to remember: only while the event stream has been connected with no change since
        the last read is the old list kept, and never longer than RELIST_EVERY."""
        events = self.events
        if events is None:
            return True, -1
        generation = events.generation
        stale = time.monotonic() - self._listed_at >= max(RELIST_EVERY, self.settings.timeout)
        return stale or not events.current(self._listed_generation), generation

    def _reinfo(self) -> tuple[bool, int]:
        """Whether this round must re-read ``/info`` (name, labels), and the stream's
        connect count to remember: always, but for a round within half an interval of
        the last read while the event stream stayed connected (so an event-triggered
        round skips it, and every periodic round still reads it)."""
        events = self.events
        if events is None or not events.connected:
            return True, -1
        connects = events.connects
        recent = time.monotonic() - self._info_at < self.settings.timeout / 2
        return not (recent and connects == self._info_connects), connects

    def collect_node(self) -> NodeInfo:
        relist, generation = self._relist()
        reinfo, connects = self._reinfo()
        try:
            node = self.docker.collect(relist=relist, reinfo=reinfo)
            if relist:
                self._listed_generation, self._listed_at = generation, time.monotonic()
            if reinfo:
                self._info_connects, self._info_at = connects, time.monotonic()
        except DockerError as exc:
            last = self._last_node
            name = last.name if last else socket.gethostname()
            if not self.docker_outage.active:
                exc = DockerError(f"{exc}; reporting host figures only, as node {name!r} "
                                  "with no containers")
            self.docker_outage.failed("docker", str(exc))
            return NodeInfo(name=name, labels=dict(last.labels) if last else {}, containers=[])
        self.docker_outage.recovered()
        self._last_node = node
        return node

    def build_body(self) -> dict[str, Any]:
        node = self.collect_node()
        system = self.host.collect()
        return payload.build(node, self.address(), system, self.settings.time_format)

    def register(self) -> bool:
        """One registration; True when the master accepted it (or it was printed)."""
        try:
            body = self.build_body()
        except Exception as exc:  # never crash on what a source answered
            log.error("cannot build the registration: %s", exc,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            self.last_error = ("internal", f"cannot build the registration: {exc}")
            return False
        self.node_name, self.containers_reported = body["name"], len(body["containers"])
        self._check_name(body["name"])
        if log.isEnabledFor(logging.DEBUG):
            log.debug("do registration with %s", json.dumps(body, ensure_ascii=False))
        if self.dry_run or self.reporter is None:
            try:
                self.out.write(json.dumps(body, ensure_ascii=False, indent=2) + "\n")
                self.out.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass
            return True
        try:
            self.reporter.send(body["name"], self.settings.ttl, self._encoder.encode(body))
        except ReportError as exc:
            self.master_outage.failed(exc.kind, str(exc))
            self.last_error = (exc.kind, str(exc))
            return False
        self.master_outage.recovered()
        log.debug("registered %s with ttl=%d", body["name"], self.settings.ttl)
        return True

    def _check_name(self, name: str) -> None:
        """Say once, at ERROR, that the master will refuse this node name, and why."""
        if name == self._refused_name:
            return
        why = nodename.problem(name)
        self._refused_name = name if why else None
        if why:
            log.error("node name %r (Docker's Name, the Engine host's hostname) will be "
                      "refused by the master: %s; give the host a valid DNS name "
                      "(hostnamectl set-hostname) and restart the Engine", name, why)

    # -- the loop
    def kick(self, delay: float = 0.0, from_event: bool = False) -> None:
        """Ask for a registration within ``delay`` seconds (requests coalesce into one)."""
        at = time.monotonic() + delay
        with self._kick_lock:
            if self._kick_at is None or at < self._kick_at:
                self._kick_at = at
                self._kick_is_event = from_event
        self.waker.wake()

    def _take_kick(self, now: float) -> bool:
        with self._kick_lock:
            if self._kick_at is None or now < self._kick_at:
                return False
            if self._kick_is_event:
                self._last_event_round = now
            self._kick_at = None
            return True

    def stop(self) -> None:
        self._stopping = True
        self.waker.wake()

    def _reload(self) -> bool:
        if self.reload_settings is None:
            return False
        try:
            new = self.reload_settings()
            if not self.dry_run:
                new.require_master()
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return False
        self.close()
        self.settings = new
        logs.set_level(new.log_level)
        self._build(new)
        self.start_events()
        log.info("configuration reloaded from %s: interval %ds", new.config_file or "(no file)",
                 new.timeout)
        return True

    def _on_signals(self, signals: Signals) -> bool:
        """Act on recorded signals; True when a reload changed the configuration."""
        reloaded = False
        for signum in signals.take():
            name = signal.Signals(signum).name
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s indicating exit request", name)
                self._stopping = True
            elif signum == signal.SIGHUP:
                log.info("received SIGHUP, reloading the configuration")
                reloaded = self._reload() or reloaded
            elif signum == signal.SIGUSR1:
                log.info("received SIGUSR1, registering now")
                self.kick()
        return reloaded

    def _round(self, signals: Signals) -> bool | None:
        """Run one registration in a worker thread; None when a stop came first."""
        result: list[bool] = []
        done = threading.Event()

        def work() -> None:
            try:
                result.append(self.register())
            finally:
                done.set()  # before the wake-up: the loop below must see it when it wakes
                self.waker.wake()

        threading.Thread(target=work, name="round", daemon=True).start()
        while not done.is_set():
            # Wakes for the round's end or any signal; a kick that arrives meanwhile
            # is in _kick_at and a signal in the pending list, so draining loses nothing.
            self.waker.wait(0.5)
            if signals.stop_requested():  # other signals wait until the round is over
                self._on_signals(signals)
                return None
        return bool(result and result[0])

    def run(self, signals: Signals, on_first: Callable[[], None] | None = None) -> int:
        """The foreground/daemon loop; returns the exit code (0 on a requested stop)."""
        interval = float(self.settings.timeout)
        self.host.prime()
        now = time.monotonic()
        self.kick()  # the node appears at once
        due = first_tick(now, interval, self.settings.jitter)
        failures = 0
        retry_at: float | None = None
        if not self.dry_run:
            self.start_events()
        if on_first is not None:
            on_first()
        while not self._stopping:
            if self._on_signals(signals):
                interval = float(self.settings.timeout)
                now = time.monotonic()
                due = now + interval
                failures, retry_at = 0, None
                self.kick()
            if self._stopping:
                break
            now = time.monotonic()
            kicked = self._take_kick(now)
            if kicked or (retry_at is not None and now >= retry_at) or \
                    (retry_at is None and now >= due):
                began = time.monotonic()
                ok = self._round(signals)
                if ok is None:
                    break
                now = time.monotonic()
                if self.state is not None:
                    self.state.round_done(self, ok, now - began)
                if ok:
                    failures, retry_at = 0, None
                else:
                    failures += 1
                    retry_at = now + backoff(failures, interval)
                if due <= now:  # skip ticks a long round or outage overran; never drift
                    due += interval * (int((now - due) // interval) + 1)
                continue
            wake = retry_at if retry_at is not None else due
            if self._kick_at is not None:
                wake = min(wake, self._kick_at)
            self.waker.wait(wake - now)
        self.close()
        return 0
