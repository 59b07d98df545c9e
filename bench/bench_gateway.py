"""Benchmarks of the gateway, side by side with dockerd's own TLS listener on one engine.

One private dockerd listens on its unix socket and, with ``--tlsverify``, on TCP; the real
agent program (frozen by default) serves the same engine through its gateway, with the
same certificates. The same client, mutual TLS, measures both. Prints one table: figure,
value, target, pass/fail; exits 1 when a figure misses its target. CPU is the agent's own
(/proc/PID/stat), memory its RSS; the client is one Python process doing little more than
reading sockets, on the same 2 cores (so throughput figures are conservative for both).

    make bench-gateway                                   # the frozen program
    python bench/bench_gateway.py --bin .venv/bin/dm-agent --quick
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bench_agent import (  # noqa: E402
    Row,
    cpu_seconds,
    ensure_containers,
    parse_with_program,
    report,
    status_kb,
    stop,
)
from support.dockerd import DOCKER_CLI, Dockerd, TlsFiles  # noqa: E402
from support.gateway import free_port  # noqa: E402
from support.image import ensure_image  # noqa: E402
from support.master import Master  # noqa: E402

BIG = "dmbench/big:1"
CHUNK = 256 * 1024


class Endpoint:
    """One HTTPS endpoint of the engine, with the client certificate."""

    def __init__(self, name: str, port: int, files: TlsFiles, host: str = "127.0.0.1") -> None:
        self.name, self.port, self.host = name, port, host
        self.ctx = ssl.create_default_context(cafile=str(files.ca))
        self.ctx.load_cert_chain(str(files.client_cert), str(files.client_key))

    def conn(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=600)

    def save(self, sink: Path) -> float:
        """Seconds to stream the big image's ``save`` into ``sink``."""
        c = self.conn()
        began = time.monotonic()
        c.request("GET", f"/v1.41/images/{BIG}/get")
        resp = c.getresponse()
        assert resp.status == 200, resp.status
        with sink.open("wb") as fh:
            while chunk := resp.read(CHUNK):
                fh.write(chunk)
        took = time.monotonic() - began
        c.close()
        return took

    def load(self, source: Path) -> float:
        """Seconds to ``load`` ``source``, a chunked upload as the docker CLI sends it."""
        c = self.conn()
        began = time.monotonic()
        c.putrequest("POST", "/v1.41/images/load?quiet=1")
        c.putheader("Content-Type", "application/x-tar")
        c.putheader("Transfer-Encoding", "chunked")
        c.endheaders()
        with source.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                c.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        c.send(b"0\r\n\r\n")
        resp = c.getresponse()
        body = resp.read()
        assert resp.status == 200, (resp.status, body[:200])
        took = time.monotonic() - began
        c.close()
        return took

    def latencies(self, n: int) -> list[float]:
        """Milliseconds of ``n`` ``GET /containers/json?all=1``, one keep-alive connection."""
        c = self.conn()
        out = []
        for _ in range(n):
            began = time.monotonic()
            c.request("GET", "/v1.41/containers/json?all=1")
            resp = c.getresponse()
            resp.read()
            assert resp.status == 200
            out.append((time.monotonic() - began) * 1000)
        c.close()
        return out


@contextmanager
def gateway_agent(binary: str, dockerd: Dockerd, files: TlsFiles, master: Master,
                  home: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    ini = home / "dm-agent.ini"
    ini.write_text(f"[main]\ndocker = {dockerd.unix_url}\nmaster = {master.url}\ntimeout = 1\n"
                   f"jitter = no\ngateway = 127.0.0.1:{port}\n"
                   f"gateway_cert = {files.server_cert}\ngateway_key = {files.server_key}\n"
                   f"gateway_client_ca = {files.ca}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DM_AGENT_")}
    env.update(HOME=str(home), STATE_DIRECTORY=str(home / "state"))
    proc = subprocess.Popen([binary, "-f", str(ini)], cwd=home, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the gateway did not come up") from None
                time.sleep(0.1)
        yield proc, port
    finally:
        stop(proc)


def make_big_image(dockerd: Dockerd, work: Path, mib: int) -> Path:
    """A ``mib`` MiB image (random data: nothing compresses), saved once to a file."""
    rootfs = work / "rootfs"
    rootfs.mkdir(exist_ok=True)
    with (rootfs / "blob").open("wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(1 << 20))
    layer = work / "layer.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(layer), "."], check=True)
    (rootfs / "blob").unlink()
    direct = [DOCKER_CLI, "-H", dockerd.unix_url]
    subprocess.run([*direct, "import", str(layer), BIG], check=True, capture_output=True)
    layer.unlink()
    saved = work / "big.tar"
    subprocess.run([*direct, "save", "-o", str(saved), BIG], check=True)
    return saved


def rmi(dockerd: Dockerd) -> None:
    subprocess.run([DOCKER_CLI, "-H", dockerd.unix_url, "rmi", "-f", BIG], capture_output=True)


def open_streams(port: int, ctx: ssl.SSLContext, n: int) -> list[ssl.SSLSocket]:
    streams = []
    for _ in range(n):
        sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                               server_hostname="127.0.0.1")
        sock.sendall(b"GET /v1.41/events HTTP/1.1\r\nHost: d\r\n\r\n")
        streams.append(sock)
    for sock in streams:  # each has its answer's head: the stream is open through Docker
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200 "), head[:100]
    return streams


def gaps(master: Master, since: float) -> list[float]:
    times = [r.time for r in master.requests if r.time >= since]
    return [b - a for a, b in itertools.pairwise(times)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB, fewer repetitions")
    args = parse_with_program(ap)
    if args is None:
        return 2
    binary = args.bin
    reps = 1 if args.quick else 3
    mib = 256 if args.quick else 1024
    streams_n = 100 if args.quick else 500
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="dm-bench-gw-", dir="/var/tmp"))
    with Dockerd(tls=True) as dockerd, Master() as master:
        files = dockerd.tls_files
        assert files is not None and dockerd.tcp_port
        ensure_image(dockerd)
        saved = make_big_image(dockerd, work, mib)
        gib = saved.stat().st_size / (1 << 30)
        print(f"bench: {binary}; dockerd {dockerd.base_dir}; image {saved.stat().st_size >> 20}"
              " MiB", file=sys.stderr)
        with gateway_agent(binary, dockerd, files, master, work) as (agent, port):
            docker_tls = Endpoint("dockerd --tlsverify", dockerd.tcp_port, files)
            gateway = Endpoint("gateway", port, files)
            sink = work / "out.tar"
            rate: dict[str, dict[str, float]] = {}
            cpu_before = cpu_seconds(agent.pid)
            relayed = 0.0
            for ep in (docker_tls, gateway):
                save = statistics.median(ep.save(sink) for _ in range(reps))

                def load_once(ep: Endpoint = ep) -> float:
                    rmi(dockerd)
                    return ep.load(saved)

                load = statistics.median(load_once() for _ in range(reps))
                rate[ep.name] = {"save": gib / save, "load": gib / load}
                if ep is gateway:
                    relayed = 2 * reps * gib
            cpu_per_gib = (cpu_seconds(agent.pid) - cpu_before) / relayed
            for what in ("save", "load"):
                mine, theirs = rate["gateway"][what], rate["dockerd --tlsverify"][what]
                rows.append(Row(f"{what} throughput, gateway / dockerd TLS", mine / theirs,
                                f"× ({mine * 1024:.0f} / {theirs * 1024:.0f} MiB/s)", ">= 0.9",
                                mine / theirs >= 0.9))
            rows.append(Row("agent CPU per GiB relayed (save + load)", cpu_per_gib, "s",
                            "report", None))

            ensure_containers(dockerd, 3000)
            n = 50 if args.quick else 200
            lat = {ep.name: sorted(ep.latencies(n)) for ep in (docker_tls, gateway)}

            def pct(xs: list[float], p: float) -> float:
                return xs[min(len(xs) - 1, int(p * len(xs)))]

            added50 = pct(lat["gateway"], 0.5) - pct(lat["dockerd --tlsverify"], 0.5)
            rows.append(Row("GET /containers/json, 3,000 containers: p50 added", added50, "ms",
                            "<= 1", added50 <= 1.0))
            for name, xs in lat.items():
                rows.append(Row(f"  {name}: p50 / p99", pct(xs, 0.5), f"ms / "
                                f"{pct(xs, 0.99):.1f} ms", "report", None))

            idle_since = time.monotonic()
            time.sleep(8)
            idle = gaps(master, idle_since)
            rss_before = status_kb(agent.pid, "VmRSS")
            streams = open_streams(port, gateway.ctx, streams_n)
            try:
                time.sleep(1)
                per_stream = (status_kb(agent.pid, "VmRSS") - rss_before) / streams_n
                busy_since = time.monotonic()
                time.sleep(8)
                busy = gaps(master, busy_since)
            finally:
                for sock in streams:
                    sock.close()
            rows.append(Row(f"memory per open events stream ({streams_n} streams)", per_stream,
                            "KiB", "<= 128", per_stream <= 128))
            late_idle, late_busy = max(idle) - 1.0, max(busy) - 1.0
            rows.append(Row(f"registration lateness, {streams_n} streams open (max gap - 1 s)",
                            late_busy * 1000, f"ms (idle {late_idle * 1000:.0f} ms)",
                            "<= idle + 50 ms", late_busy <= late_idle + 0.05))
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return report(rows)


if __name__ == "__main__":
    sys.exit(main())
