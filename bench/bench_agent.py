"""Benchmarks of the real agent program against a private dockerd and a local master.

Prints one table: figure, value, target, pass/fail; exits 1 when a figure misses its
target. CPU comes from the agent process's own accounting (/proc/PID/stat), never from
wall time; each figure is run several times and the median printed.

    make bench                       # the frozen program (built first)
    python bench/bench_agent.py --bin .venv/bin/dm-agent --quick
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test harness, as the suite imports it

from support.dockerd import Dockerd, create_containers  # noqa: E402
from support.master import Master  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Row:
    def __init__(self, figure: str, value: float, unit: str, target: str,
                 ok: bool | None) -> None:
        self.figure, self.value, self.unit, self.target, self.ok = figure, value, unit, target, ok


@contextmanager
def agent(binary: str, dockerd: Dockerd, master: Master, home: Path,
          extra_env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DM_AGENT_")}
    env.update({"HOME": str(home), "DM_AGENT_JITTER": "no"}, **(extra_env or {}))
    proc = subprocess.Popen([binary, "-d", dockerd.unix_url, "-m", master.url, "-t", "3600"],
                            cwd=home, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        master.wait_for(1, timeout=30)
        time.sleep(0.5)  # event stream connected
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the agent is not gone within 5 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def drive(proc: subprocess.Popen[bytes], master: Master, rounds: int) -> None:
    """``rounds`` registrations, one after another, each asked for with SIGUSR1."""
    have = len(master.requests)
    for i in range(rounds):
        proc.send_signal(signal.SIGUSR1)
        master.wait_for(have + i + 1, timeout=30)


def cpu_per_round(binary: str, dockerd: Dockerd, master: Master, home: Path, rounds: int,
                  env: dict[str, str] | None = None) -> tuple[float, int]:
    with agent(binary, dockerd, master, home, env) as proc:
        drive(proc, master, 3)  # warm
        before = cpu_seconds(proc.pid)
        drive(proc, master, rounds)
        per = (cpu_seconds(proc.pid) - before) / rounds * 1000
        return per, status_kb(proc.pid, "VmHWM")


def ensure_containers(dockerd: Dockerd, n: int) -> None:
    have = len(dockerd.api("/containers/json", params={"all": 1}))
    if have < n:
        create_containers(dockerd, n - have, prefix=f"bench{n}",
                          labels={"app": "bench", "tier": "back", "owner": "dm-agent"})


def median_of(n: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(n))


def parse_with_program(ap: argparse.ArgumentParser) -> argparse.Namespace | None:
    """The benchmarks' command line with ``--bin`` (the frozen program by default), made
    absolute; None, said on stderr, when that program is not built."""
    ap.add_argument("--bin", default=str(ROOT / "build/frozen/dm-agent/dm-agent"))
    args = ap.parse_args()
    args.bin = os.path.abspath(args.bin)
    if not os.access(args.bin, os.X_OK):
        print(f"bench: {args.bin} is not built (make frozen)", file=sys.stderr)
        return None
    return args


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and rounds")
    args = parse_with_program(ap)
    if args is None:
        return 2
    reps = 1 if args.quick else 3
    rounds = 20 if args.quick else 60
    long_rounds = 2000 if args.quick else 10000
    rows: list[Row] = []
    home = Path(tempfile.mkdtemp(prefix="dm-bench-"))
    with Dockerd() as dockerd, Master() as master:
        print(f"bench: {args.bin}; dockerd {dockerd.base_dir}", file=sys.stderr)
        cpu: dict[int, float] = {}
        rss3000 = 0
        for n in (300, 3000):
            ensure_containers(dockerd, n)
            samples = [cpu_per_round(args.bin, dockerd, master, home, rounds) for _ in range(reps)]
            cpu[n] = statistics.median(s[0] for s in samples)
            rss = max(s[1] for s in samples)
            if n == 3000:
                rss3000 = rss
                full = statistics.median(
                    cpu_per_round(args.bin, dockerd, master, home, rounds // 2,
                                  {"DM_AGENT_DOCKER_EVENTS": "no"})[0] for _ in range(reps))
        rows.append(Row("CPU per registration, 300 containers", cpu[300], "ms", "-", None))
        rows.append(Row("CPU per registration, 3,000 containers", cpu[3000], "ms", "<= 10",
                        cpu[3000] <= 10))
        rows.append(Row("  same, container list re-read every round (docker_events = no)",
                        full, "ms", "-", None))
        growth = cpu[3000] / cpu[300] if cpu[300] else float("inf")
        rows.append(Row("CPU growth 3,000 vs 300 containers", growth, "x", "<= 11",
                        growth <= 11))
        rows.append(Row("peak RSS at 3,000 containers (VmHWM)", rss3000 / 1024, "MB", "<= 40",
                        rss3000 / 1024 <= 40))

        # memory over many registrations, with the fixture-sized container set
        small = Dockerd()
        small.start()
        try:
            ensure_containers(small, 10)
            with agent(args.bin, small, master, home) as proc:
                drive(proc, master, 1000)
                before = status_kb(proc.pid, "VmRSS")
                drive(proc, master, long_rounds)
                after = status_kb(proc.pid, "VmRSS")
            rows.append(Row(f"RSS growth over {long_rounds:,} registrations",
                            (after - before) / 1024, "MB", "< 1", (after - before) < 1024))

            # container started -> master has it
            def latency() -> float:
                # A lone change, not the tail of the previous one's burst: the previous
                # container's `start` event can make a round of its own, EVENT_SPACING (1 s)
                # after the create's, when `docker start` takes longer than the 0.2 s
                # debounce; a pause of 1.2 s then put the next create inside that spacing.
                time.sleep(2.5)
                name = f"lat-{time.monotonic_ns()}"
                seen = len(master.requests)
                t0 = time.monotonic()
                cid = small.api("/containers/create", "POST",
                                {"Image": "dmtest/busybox:1", "Cmd": ["sleep", "60"],
                                 "HostConfig": {"NetworkMode": "none"},
                                 "StopSignal": "SIGKILL"}, params={"name": name})["Id"]
                small.api(f"/containers/{cid}/start", "POST")
                while True:
                    reqs = master.wait_for(seen + 1, timeout=10)
                    for req in reqs[seen:]:
                        if any(c["id"] == cid for c in req.json["containers"]):
                            return req.time - t0
                    seen = len(reqs)

            with agent(args.bin, small, master, home):
                lat = [latency() for _ in range(20 if not args.quick else 5)]
            med = statistics.median(lat)
            rows.append(Row("container started -> master has it (median of 20)", med, "s",
                            "<= 1", med <= 1))

            def first_registration() -> float:
                seen = len(master.requests)
                t0 = time.monotonic()
                proc = subprocess.Popen([args.bin, "-d", small.unix_url, "-m", master.url],
                                        cwd=home, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env={"HOME": str(home), "PATH": "/usr/bin:/bin"})
                try:
                    return master.wait_for(seen + 1, timeout=20)[seen].time - t0
                finally:
                    proc.terminate()
                    proc.wait()

            start = median_of(5, first_registration)
            rows.append(Row("program start -> first registration", start, "s", "<= 1",
                            start <= 1))
        finally:
            small.close()

    def version() -> float:
        t0 = time.monotonic()
        subprocess.run([args.bin, "--version"], check=True, capture_output=True)
        return time.monotonic() - t0

    ver = median_of(10, version)
    rows.append(Row("dm-agent --version", ver, "s", "<= 0.2", ver <= 0.2))

    return report(rows)


def report(rows: list[Row]) -> int:
    """Print the table (figure, value and unit, target, result); 1 when a target is missed."""
    width = max(len(r.figure) for r in rows)
    unit = max(len(r.unit) for r in rows)
    target = max(len(r.target) for r in rows)
    print(f"{'figure':<{width}}  {'value':>10} {'':<{unit}}  {'target':<{target}}  result")
    for r in rows:
        verdict = "-" if r.ok is None else ("pass" if r.ok else "FAIL")
        print(f"{r.figure:<{width}}  {r.value:>10.2f} {r.unit:<{unit}}  "
              f"{r.target:<{target}}  {verdict}")
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
