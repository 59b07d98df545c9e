"""The gateway against dockerd's own TLS listener, side by side on the same engine.

One private dockerd listens on its unix socket and with ``--tlsverify`` on TCP; the real
agent program runs with the gateway on (``gateway_cert``/``gateway_key`` are dockerd's
server pair, ``gateway_client_ca`` its CA) in front of the unix socket, so one client
certificate reaches both. Prints one table: figure, value, target, pass/fail; exits 1
when a figure misses its target. CPU and memory come from the agent process's own
accounting (/proc/PID), the rest from wall time around real requests.

    python bench/bench_gateway.py                  # .venv/bin/dm-agent, 1 GiB, 3,000
    python bench/bench_gateway.py --quick          # 256 MiB, 1,000 containers
    python bench/bench_gateway.py --bin build/frozen/dm-agent/dm-agent
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import resource
import signal
import socket
import ssl
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

from bench_agent import Row, cpu_seconds, ensure_containers, status_kb  # noqa: E402
from support.dockerd import Dockerd, DockerdError, TlsFiles  # noqa: E402
from support.gateway import write_image_tar  # noqa: E402
from support.image import ensure_image  # noqa: E402
from support.master import Master  # noqa: E402

API = "/v1.41"
BLOCK = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def gateway_agent(binary: str, dockerd: Dockerd, master: Master, home: Path,
                  port: int) -> Iterator[subprocess.Popen[bytes]]:
    tls = dockerd.tls_files
    assert tls is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("DM_AGENT_")}
    env.update({"HOME": str(home), "DM_AGENT_JITTER": "no",
                "DM_AGENT_GATEWAY": f"127.0.0.1:{port}",
                "DM_AGENT_GATEWAY_CERT": str(tls.server_cert),
                "DM_AGENT_GATEWAY_KEY": str(tls.server_key),
                "DM_AGENT_GATEWAY_CLIENT_CA": str(tls.ca)})

    def more_files() -> None:  # 500 streams hold 1,000 descriptors
        resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))

    proc = subprocess.Popen([binary, "-d", dockerd.unix_url, "-m", master.url, "-t", "3600"],
                            cwd=home, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=more_files)
    try:
        master.wait_for(1, timeout=30)
        deadline = time.monotonic() + 30
        while not ping(port, tls):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the agent's gateway did not answer /_ping")
            time.sleep(0.1)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def connect(port: int, tls: TlsFiles, timeout: float = 600) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection("127.0.0.1", port, context=tls.client_context(),
                                       timeout=timeout, blocksize=BLOCK)


def ping(port: int, tls: TlsFiles) -> bool:
    conn = connect(port, tls, timeout=2)
    try:
        conn.request("GET", "/_ping")
        return conn.getresponse().read() == b"OK"
    except OSError:
        return False
    finally:
        conn.close()


def save(port: int, tls: TlsFiles, ref: str) -> tuple[float, int]:
    """Seconds and bytes of ``docker save`` of ``ref`` (the stream read and dropped)."""
    conn = connect(port, tls)
    t0 = time.monotonic()
    conn.request("GET", f"{API}/images/{ref}/get")
    resp = conn.getresponse()
    assert resp.status == 200, resp.status
    total = 0
    while chunk := resp.read1(BLOCK):
        total += len(chunk)
    conn.close()
    return time.monotonic() - t0, total


def load(port: int, tls: TlsFiles, tar: Path) -> float:
    conn = connect(port, tls)
    t0 = time.monotonic()
    with open(tar, "rb") as body:
        conn.request("POST", f"{API}/images/load?quiet=1", body=body,
                     headers={"Content-Type": "application/x-tar",
                              "Content-Length": str(tar.stat().st_size)})
        resp = conn.getresponse()
        answer = resp.read()
    conn.close()
    assert resp.status == 200, answer[:200]
    return time.monotonic() - t0


def latencies(port: int, tls: TlsFiles, n: int) -> list[float]:
    conn = connect(port, tls)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", f"{API}/containers/json?all=1")
        resp = conn.getresponse()
        resp.read()
        out.append((time.perf_counter() - t0) * 1000)
    conn.close()
    return out


def open_streams(port: int, tls: TlsFiles, n: int) -> list[ssl.SSLSocket]:
    ctx = tls.client_context()
    streams = []
    for _ in range(n):
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                            server_hostname="127.0.0.1")
        s.sendall(b"GET " + API.encode() + b"/events HTTP/1.1\r\nHost: x\r\n\r\n")
        head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head[:100]
        streams.append(s)
    return streams


def lateness(proc: subprocess.Popen[bytes], master: Master, n: int) -> float:
    """Median seconds from SIGUSR1 to the master having the registration."""
    out = []
    for _ in range(n):
        seen = len(master.requests)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGUSR1)
        out.append(master.wait_for(seen + 1, timeout=30)[seen].time - t0)
    return statistics.median(out)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def best(n: int, fn: Callable[[], float]) -> float:
    return min(fn() for _ in range(n))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=str(ROOT / ".venv/bin/dm-agent"))
    ap.add_argument("--quick", action="store_true", help="256 MiB, 1,000 containers")
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    size = (256 if args.quick else 1024) << 20
    containers = 1000 if args.quick else 3000
    reps = 1 if args.quick else 2
    rows: list[Row] = []
    home = Path(tempfile.mkdtemp(prefix="dm-bench-gw-"))
    port = free_port()
    with Dockerd(tls=True) as dockerd, Master() as master:
        tls = dockerd.tls_files
        assert tls is not None and dockerd.tcp_port is not None
        direct = dockerd.tcp_port
        ensure_image(dockerd)
        tar = home / "big.tar"
        write_image_tar(tar, "dmtest/big:1", size)
        print(f"bench: {binary}; dockerd {dockerd.base_dir}; {tar.stat().st_size >> 20} MiB "
              f"image, {containers:,} containers", file=sys.stderr)
        with gateway_agent(binary, dockerd, master, home, port) as proc:
            pid = proc.pid
            # load, then save, each through dockerd's TLS and through the gateway
            loads = {}
            for name, p in (("dockerd", direct), ("gateway", port)):
                def one(p: int = p) -> float:
                    with contextlib.suppress(DockerdError):  # absent the first time
                        dockerd.api("/images/dmtest/big:1", "DELETE", params={"force": 1})
                    return load(p, tls, tar)
                loads[name] = best(reps, one)
            cpu0 = cpu_seconds(pid)
            saves, saved, cpu_per_gib = {}, 0, 0.0
            for name, p in (("gateway", port), ("dockerd", direct)):
                results = [save(p, tls, "dmtest/big:1") for _ in range(reps)]
                saves[name] = min(r[0] for r in results)
                saved = results[0][1]
                if name == "gateway":
                    cpu_per_gib = (cpu_seconds(pid) - cpu0) / (reps * saved / (1 << 30))
            gib = saved / (1 << 30)
            for what, times, nbytes in (("save", saves, saved), ("load", loads,
                                                                  tar.stat().st_size)):
                for name in ("dockerd", "gateway"):
                    rows.append(Row(f"{what} throughput via {name}",
                                    nbytes / (1 << 20) / times[name], "MiB/s", "-", None))
                ratio = times["dockerd"] / times["gateway"]
                rows.append(Row(f"  {what}: gateway / dockerd", ratio, "x", ">= 0.9",
                                ratio >= 0.9))
            rows.append(Row(f"CPU per GiB relayed (save, {gib:.2f} GiB x {reps})", cpu_per_gib,
                            "s", "-", None))

            # GET /containers/json with many containers
            ensure_containers(dockerd, containers)
            latencies(port, tls, 5)
            n = 100 if args.quick else 300
            lat = {name: latencies(p, tls, n) for name, p in (("dockerd", direct),
                                                               ("gateway", port))}
            for name in ("dockerd", "gateway"):
                rows.append(Row(f"GET /containers/json ({containers:,}) p50 via {name}",
                                pct(lat[name], 50), "ms", "-", None))
                rows.append(Row(f"GET /containers/json ({containers:,}) p99 via {name}",
                                pct(lat[name], 99), "ms", "-", None))
            added = pct(lat["gateway"], 50) - pct(lat["dockerd"], 50)
            rows.append(Row("  added at p50", added, "ms", "<= 1", added <= 1))

            # 500 events streams held open
            idle_late = lateness(proc, master, 10)
            before = status_kb(pid, "VmRSS")
            streams = open_streams(port, tls, 500)
            time.sleep(1)  # let the threads settle before reading RSS (not a sync)
            after = status_kb(pid, "VmRSS")
            loaded_late = lateness(proc, master, 10)
            for s in streams:
                s.close()
            per = (after - before) / 500
            rows.append(Row("memory per open events stream (500)", per, "KiB", "<= 128",
                            per <= 128))
            rows.append(Row("registration lateness, idle", idle_late * 1000, "ms", "-", None))
            rows.append(Row("registration lateness, 500 streams open", loaded_late * 1000,
                            "ms", "<= idle + 50", loaded_late <= idle_late + 0.05))
    width = max(len(r.figure) for r in rows)
    failed = 0
    for r in rows:
        verdict = "" if r.ok is None else ("pass" if r.ok else "FAIL")
        failed += r.ok is False
        print(f"{r.figure:<{width}}  {r.value:10.2f} {r.unit:<6} {r.target:<14} {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
