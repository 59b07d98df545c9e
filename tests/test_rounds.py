"""Every round is bounded and ends as a logged outcome: a master that dribbles its answer,
a value the reporter cannot send, Docker failing in different ways, a reload (real
master, real sockets, the real agent in the foreground or in-process)."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agentproc import BIN, clean_env, popen, stop, stopped
from support.dockerd import Dockerd, create_containers
from support.master import BodyGate, Master

from dm_agent.config.settings import Settings
from dm_agent.net import master_endpoint
from dm_agent.process.rounds import RoundThread
from dm_agent.process.signals import Signals, Waker
from dm_agent.process.state import StateWriter
from dm_agent.round import address as address_mod
from dm_agent.round.address import Announcer
from dm_agent.round.agent import Agent
from dm_agent.round.bounds import Progress, timeouts
from dm_agent.round.outage import Outage
from dm_agent.round.source import NodeSource

pytestmark = pytest.mark.paced  # waits on a real agent's intervals: not in the unit tier

NO_DOCKER = "unix:///nonexistent/docker.sock"


def test_a_dribbling_master_does_not_hold_the_round(tmp_path: Path) -> None:
    """Status line and headers at once, then a body byte every 0.5 s: every socket read
    succeeds, so only the round's wall-clock deadline (0.8 × interval) ends it."""
    interval = 2
    with Master(mode="dribble") as master:
        proc = popen(["-d", NO_DOCKER, "-m", master.url, "-t", str(interval), "-v"],
                     tmp_path, {"DM_AGENT_JITTER": "no"})
        try:
            # Held for ever before: one request in 14 s, and the node dropped out.
            master.wait_for(4, timeout=20)
            master.set_mode("ok")
            n = len(master.requests)
            # two accepted: the agent has read the first answer when the second comes
            accepted = master.wait_for(n + 2, timeout=10)[-2:]
            assert [r.status for r in accepted] == [200, 200]
        finally:
            err = stop(proc)
    dribbled = [r for r in master.requests if r.mode == "dribble"]
    rounds = [r.ended - r.time for r in dribbled if r.ended is not None]
    assert len(rounds) >= 4, err
    longest = max(rounds)
    print(f"longest exchange with the dribbling master at -t {interval}: {longest:.2f} s "
          f"over {len(rounds)} rounds")
    # The loop abandons a round 0.95 × interval after it began and cuts the connection
    # then; twice that bound for a loaded machine (the dribble itself would go on).
    assert longest < 2 * 0.95 * interval, rounds
    errors = [ln for ln in err.splitlines() if " - ERROR - " in ln and "Docker" not in ln]
    assert len(errors) == 1, err  # then flood control: repeats at DEBUG
    assert "too slowly" in errors[0] or "registration abandoned" in errors[0], errors
    assert "registration recovered after" in err


def test_a_stop_never_cuts_a_registration_in_half(
        tmp_path: Path, dockerd_factory: Callable[..., Dockerd]) -> None:
    """SIGTERM while the registration is on the wire: the exit waits for the exchange
    (``rounds.STOP_GRACE``), so the master reads the whole body and answers it. Before,
    the round's thread was left mid-send and the master read a truncated request (seen
    in CI as ``body: not strict UTF-8 JSON`` from a node its Ansible role restarted).
    Labels of 6.4 MB in all make the body larger than the sockets' buffers, so the send
    is still going when the signal comes; the master holds its read meanwhile."""
    engine = dockerd_factory()
    create_containers(engine, 8, labels={"bulk": "x" * 800_000})
    gate = BodyGate()
    with Master() as master:
        master.body_gate = gate
        proc = popen(["-d", engine.unix_url, "-m", master.url, "-t", "10"], tmp_path,
                     {"DM_AGENT_JITTER": "no"})
        try:
            assert gate.reached.wait(60), "no registration came"
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)  # an agent that did not wait has exited by now
            gate.release.set()
            master.wait_for(1, timeout=10)
            err = stopped(proc, "after SIGTERM")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    [rec] = master.requests
    assert (rec.errors, rec.status) == ([], 200), rec.errors
    assert len(rec.json["containers"]) == 8
    assert proc.returncode == 0, err


def test_a_round_that_has_not_sent_when_the_stop_comes_sends_nothing() -> None:
    """The other half of the stop: a round still reading Docker when the agent stops does
    not start its exchange with the master (the exit may come at any moment, and cut
    it)."""
    with Master() as master:
        agent = Agent(Settings(docker=NO_DOCKER, master=master.url, interval=1,
                               jitter=False, docker_events=False))
        try:
            agent.progress.stopping.set()
            outcome = agent.register()
        finally:
            agent.close()
        assert master.requests == []
    assert outcome.failure == ("stopped", "not sent: the agent is stopping")
    assert outcome.body is not None and not outcome.ok  # built, not sent


def test_a_round_comes_back_as_one_outcome_that_only_its_application_logs_and_records(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A round is one immutable ``Outcome``: the body it built and its failure. Nothing of
    it stays on the agent for the state file to read later: what the loop does with it
    (``settle`` logs it, ``StateWriter.round_done`` records it) is all there is. A master
    that refuses the secret, then takes it: the refusal logged once when applied, then
    the recovery; the state file's node, address and containers come from the body."""
    caplog.set_level(logging.INFO, logger="dm_agent")
    state_file = tmp_path / "agent.state.json"
    with Master(mode="unauthorized") as master:
        agent = Agent(Settings(docker=NO_DOCKER, master=master.url, interval=1, jitter=False,
                               docker_events=False))
        writer = StateWriter(str(state_file))

        def about_master() -> list[tuple[int, str]]:
            return [(r.levelno, r.getMessage()) for r in caplog.records
                    if r.name == "dm_agent" and master.url in r.getMessage()]

        try:
            refused = agent.register()
            assert refused.failure is not None and refused.failure[0] == "unauthorized"
            assert refused.body is not None and refused.body["containers"] == []
            with pytest.raises(AttributeError):
                refused.failure = None  # type: ignore[misc]
            assert about_master() == []  # a round logs nothing of its outcome itself
            agent.settle(refused)
            writer.round_done(agent, refused, 0.25)
            assert [lvl for lvl, _ in about_master()] == [logging.ERROR]
            master.set_mode("ok")
            taken = agent.register()
            assert taken.ok and taken.body is not None
            agent.settle(taken)
            writer.round_done(agent, taken, 0.25)
        finally:
            agent.close()
    state = json.loads(state_file.read_text())
    assert (state["node"], state["address"], state["containers"]) == (
        taken.body["name"], taken.body["address"], 0)
    assert state["last_failure"]["kind"] == "unauthorized"
    assert state["consecutive_failures"] == 0 and state["last_success"]["duration"] == 0.25
    lines = [m for _, m in about_master()]
    assert "refused the node secret" in lines[0]
    assert lines[1:] == [f"registered as {taken.body['name']} with {master.url} (ttl 2s)"]
    assert any(r.getMessage().startswith("registration recovered after 1 failed attempt")
               for r in caplog.records)


def test_a_value_the_reporter_cannot_send_is_a_logged_failed_round(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Defence in depth: should a secret that cannot travel in a header reach the
    reporter (configuration refuses it), requests raises UnicodeEncodeError inside the
    round. It is a failed round, logged once at ERROR with what was attempted, repeats
    at DEBUG; nothing reaches the thread's excepthook. Each outcome is applied as the
    loop applies it (``settle``)."""
    secret = "sëcret✓"
    escaped: list[threading.ExceptHookArgs] = []
    old_hook = threading.excepthook
    threading.excepthook = escaped.append
    caplog.set_level(logging.DEBUG, logger="dm_agent")
    with Master() as master:
        settings = Settings(docker=NO_DOCKER, master=master.url, interval=1, secret=secret,
                            jitter=False, docker_events=False)
        agent = Agent(settings)
        try:
            outcomes = [agent.register(), agent.register()]
            # and through the loop's round thread
            signals = Signals(Waker())
            outcomes.append(RoundThread(agent.progress).run(
                agent.register, agent.parts.limits, signals, agent.parts.renew))
            for outcome in outcomes:
                assert outcome is not None and outcome.failure is not None
                assert outcome.failure[0] == "internal:UnicodeEncodeError", outcome.failure
                agent.settle(outcome)
        finally:
            agent.close()
            threading.excepthook = old_hook
    assert not escaped
    mine = [r for r in caplog.records if r.name == "dm_agent"
            and "registration" in r.getMessage()]
    errors = [r for r in mine if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in mine]
    assert "registration failed while sending the registration to" in errors[0].getMessage()
    assert "UnicodeEncodeError" in errors[0].getMessage()
    assert [r.levelno for r in mine[1:] if "failed again" in r.getMessage()] \
        == [logging.DEBUG, logging.DEBUG]
    assert all(secret not in r.getMessage() for r in caplog.records)


@pytest.fixture
def silent_docker(tmp_path: Path) -> Iterator[str]:
    """A unix socket that accepts and never answers: what a hung dockerd looks like."""
    path = tmp_path / "hung-docker.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)
    held: list[socket.socket] = []
    stopping = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stopping.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"unix://{path}"
    stopping.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_docker_failure_kinds_make_still_failing_fire(
        tmp_path: Path, silent_docker: str, caplog: pytest.LogCaptureFixture) -> None:
    """Refused first (no socket), then timing out (a socket that never answers): one
    ERROR, then the flood control's WARNING that the failure changed kind."""
    caplog.set_level(logging.DEBUG, logger="dm_agent")
    outage, progress = Outage("Docker"), Progress()  # one Docker, failing two ways in turn
    missing = NodeSource(Settings(docker=NO_DOCKER, interval=1, docker_events=False),
                         progress, outage, timeouts(1).docker)
    hung = NodeSource(Settings(docker=silent_docker, interval=1, docker_events=False),
                      progress, outage, timeouts(1).docker)
    try:
        missing.collect()
        hung.collect()
    finally:
        missing.close()
        hung.close()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "Docker" in r.getMessage()]
    assert [lvl for lvl, _ in lines] == [logging.ERROR, logging.WARNING], lines
    assert "No such file or directory" in lines[0][1]
    assert lines[1][1].startswith("Docker still failing, now: ") and "timed out" in lines[1][1]


def test_https_master_without_a_port_is_port_443() -> None:
    assert master_endpoint("https://master.example") == ("master.example", 443)
    assert master_endpoint("http://master.example") == ("master.example", 80)
    assert master_endpoint("https://master.example:8443/api") == ("master.example", 8443)


def test_the_host_name_fallback_is_looked_for_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Started before the network was up: no route, no interface address. The host name
    is announced meanwhile, and the real address as soon as there is one. (The missing
    network is simulated: it cannot be taken away from the test machine.)"""
    found: list[str | None] = [None]
    monkeypatch.setattr(address_mod, "route_address", lambda master: found[0])
    a = Announcer(Settings(docker=NO_DOCKER, master="http://127.0.0.1:9"))
    assert a.address() == socket.gethostname()
    found[0] = "192.0.2.7"
    assert a.address() == "192.0.2.7"
    found[0] = "198.51.100.1"
    assert a.address() == "192.0.2.7"  # a real address is kept for the run


def test_a_reload_keeps_a_random_offset(tmp_path: Path) -> None:
    """A fleet-wide configuration push must not make every node report in the same
    second: after SIGHUP the periodic schedule starts at a random offset again. Six
    agents reloaded together: without the offset each next round comes one interval
    (5 s) after the reload's immediate one."""
    interval, agents = 5, 6
    masters = [Master().start() for _ in range(agents)]
    procs = []
    try:
        for i, master in enumerate(masters):
            conf = tmp_path / f"{i}.ini"
            conf.write_text(f"[main]\nmaster = {master.url}\ndocker = {NO_DOCKER}\n"
                            f"timeout = {interval}\njitter = yes\ndocker_events = no\n")
            procs.append(popen(["-f", str(conf)], tmp_path))
        for master in masters:
            master.wait_for(1, timeout=15)
        sent = time.monotonic()
        for proc in procs:
            proc.send_signal(signal.SIGHUP)
        offsets = []
        for master in masters:
            deadline = time.monotonic() + 3 * interval
            while len(after := [r for r in master.requests if r.time > sent]) < 2:
                assert time.monotonic() < deadline, "no periodic round after the reload"
                time.sleep(0.05)
            offsets.append(after[1].time - after[0].time)
    finally:
        for proc in procs:
            stop(proc)
        for master in masters:
            master.stop()
    assert all(0 <= o < interval + 1 for o in offsets), offsets
    # Uniform in [0, 5): six of them within 0.5 s of 5 s has a chance of 1e-6.
    assert not all(abs(o - interval) < 0.5 for o in offsets), offsets


@pytest.fixture
def silent_resolver(tmp_path: Path) -> Iterator[Path]:
    """A name server on 127.0.0.53:53 that receives queries and never answers, and a
    resolv.conf naming it (to bind over /etc/resolv.conf in a private mount namespace:
    the machine's own resolver stays as it is)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.53", 53))
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\noptions timeout:30 attempts:1\n")
    yield conf
    server.close()


@pytest.mark.root  # unshare -m and a bind mount over /etc/resolv.conf
def test_a_master_name_that_does_not_resolve_in_time_abandons_the_round(
        tmp_path: Path, silent_resolver: Path) -> None:
    """No socket timeout covers getaddrinfo: the loop's deadline (0.95 × interval) does.
    The round is abandoned, the loop stays responsive, and stuck lookups do not pile up."""
    script = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
         str(silent_resolver), BIN, "-d", NO_DOCKER, "-m", "http://master.invalid-tld:8080",
         "-t", "2", "-v"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path, env=clean_env(tmp_path, {"DM_AGENT_JITTER": "no"}))
    time.sleep(10)
    t0 = time.monotonic()
    err = stop(proc)
    assert time.monotonic() - t0 < 2.5, "a stop must not wait for a stuck lookup"
    errors = [ln for ln in err.splitlines() if " - ERROR - " in ln and "Docker" not in ln]
    assert len(errors) == 1, err
    assert "registration abandoned: not done within 1.9s, while" in errors[0], errors
    assert "registration not attempted: 2 earlier rounds are still blocked" in err, err
