"""Benchmarks of the tunnel (docs/tunnel.md), against targets, in one run.

The world of tests/test_tunnel.py: a real OpenSSH sshd as the relay (the block
docs/tunnel.md writes out, with its production ClientAlive* and MaxStartups), the master's
side in this namespace, the node behind a NAT that drops every inbound connection.

1. One real agent (frozen by default) in the node's namespace, its gateway in front of a
   private dockerd: ``save`` and ``load`` of a big image through the tunnel (a client in
   this namespace dials the relay's port) against the same gateway dialed directly (the
   same client, run inside the node's namespace, dials the node's own address): the
   ratio of the throughputs, target >= 0.5.
2. The memory the tunnel adds to that agent: its RSS with the tunnel up, against the same
   agent and settings without ``tunnel``, each after the same rounds; target <= 8 MiB.
3. 500 tunnels on the one relay. The 500 nodes are one process in the node's namespace
   running 500 instances of the agent's own tunnel service (``dm_agent.tunnel.service``:
   the same connection, keepalive and jittered backoff code, each in its thread with its
   event loop), each with its own ed25519 key and port; the relay is the real sshd.
   Reported: the relay's memory per tunnel (the PSS of all its processes with the 500
   up, less its own before), and the time for all 500 to listen again after the relay
   is killed whole and started again, target <= 60 s, with the documented MaxStartups
   and with sshd's default (10:30:100).

    make bench-tunnel                                    # the frozen program
    python bench/bench_tunnel.py --bin .venv/bin/dm-agent --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from bench_agent import Row, parse_with_program, report, status_kb, stop  # noqa: E402
from bench_gateway import Endpoint, make_big_image, rmi  # noqa: E402
from support.dockerd import Dockerd, TlsFiles, make_tls_files  # noqa: E402
from support.image import ensure_image  # noqa: E402
from support.master import Master  # noqa: E402
from support.netns import NatSite  # noqa: E402
from support.relay import USER, Relay  # noqa: E402

GATEWAY_PORT = 8771
PORT = 20011
FLEET_BASE = 21000


# --- the client, run in one namespace or the other ---------------------------------------


def client(what: str, host: str, port: int, certs: str, path: str) -> None:
    """``save`` (into ``path``) or ``load`` (from ``path``) through one HTTPS endpoint with
    the client certificate (bench_gateway's client); prints the seconds it took."""
    tls = TlsFiles(client_dir=Path(certs), server_dir=Path(certs) / "server")
    endpoint = Endpoint(what, port, tls, host)
    print(f"{(endpoint.save if what == 'save' else endpoint.load)(Path(path)):.3f}")


def timed(site: NatSite, ns: str | None, what: str, host: str, port: int, certs: Path,
          path: Path) -> float:
    prefix = site.exec(ns) if ns else []
    out = subprocess.run([*prefix, sys.executable, __file__, "--client", what, host, str(port),
                          str(certs), str(path)], capture_output=True, text=True, check=True,
                         timeout=900)
    return float(out.stdout.strip())


# --- one agent ---------------------------------------------------------------------------


class Agent:
    def __init__(self, binary: str, site: NatSite, relay: Relay, home: Path, dockerd: Dockerd,
                 master: Master, tls: TlsFiles, tunnel: bool) -> None:
        self.binary, self.site, self.home = binary, site, home
        home.mkdir(parents=True, exist_ok=True)
        self.ini = home / "dm-agent.ini"
        lines = [f"docker = {dockerd.unix_url}", f"master = {master.url}", "timeout = 1",
                 "jitter = no", f"gateway = 0.0.0.0:{GATEWAY_PORT}",
                 f"gateway_cert = {tls.server_cert}", f"gateway_key = {tls.server_key}",
                 f"gateway_client_ca = {tls.ca}"]
        if tunnel:
            lines += [f"tunnel = {USER}@{site.relay_ip}", f"tunnel_listen = {site.relay_ip}:{PORT}",
                      f"tunnel_host_key = {relay.host_key_file}"]
        self.ini.write_text("[main]\n" + "\n".join(lines) + "\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DM_AGENT_")}
        self.env.update(HOME=str(home), STATE_DIRECTORY=str(home / "state"))
        if tunnel:
            out = self.run("tunnel-key", "--json", "-f", str(self.ini))
            relay.authorize([json.loads(out)["authorized_keys"]])
        self.proc = subprocess.Popen([*site.exec(site.node), binary, "-f", str(self.ini)],
                                     cwd=home, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def run(self, *args: str) -> str:
        return subprocess.run([*self.site.exec(self.site.node), self.binary, *args],
                              capture_output=True, text=True, check=True, env=self.env,
                              cwd=self.home, timeout=60).stdout

    def rss_after(self, master: Master, rounds: int) -> tuple[int, int]:
        """VmRSS and RssAnon (KiB) once ``rounds`` more registrations have come from it."""
        have = len(master.requests)
        master.wait_for(have + rounds, timeout=120)
        return status_kb(self.proc.pid, "VmRSS"), status_kb(self.proc.pid, "RssAnon")

    def close(self) -> None:
        stop(self.proc)  # type: ignore[arg-type]


def wait(what: str, check: object, timeout: float) -> float:
    began = time.monotonic()
    while True:
        try:
            if check():  # type: ignore[operator]
                return time.monotonic() - began
        except OSError:
            pass
        if time.monotonic() - began > timeout:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


# --- 500 tunnels -------------------------------------------------------------------------


def fleet_child(n: int, relay_ip: str, host_key: str, keys: str) -> None:
    """``n`` tunnel services of the agent's own code, in this process; prints a line when
    all were started, then runs until its stdin closes."""
    import logging

    from dm_agent.config import DEFAULTS
    from dm_agent.tunnel.service import Tunnel

    logging.getLogger("dm_agent").addHandler(logging.NullHandler())
    logging.getLogger("dm_agent").propagate = False
    tunnels = []
    for i in range(n):
        settings = DEFAULTS._replace(
            tunnel=f"{USER}@{relay_ip}:22", tunnel_listen=f"{relay_ip}:{FLEET_BASE + i}",
            tunnel_host_key=host_key, tunnel_key=f"{keys}/node{i}", gateway="127.0.0.1:9")
        tunnel = Tunnel(settings, lambda: keys)
        tunnel.start()
        tunnels.append(tunnel)
    print("started", flush=True)
    sys.stdin.read()
    for tunnel in tunnels:
        tunnel.stop()


def fleet_keys(relay: Relay, n: int, keys: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    keys.mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        key = ed25519.Ed25519PrivateKey.generate()
        path = keys / f"node{i}"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH).decode()
        lines.append(f'restrict,port-forwarding,permitlisten="{relay.listen}:{FLEET_BASE + i}" '
                     f"{public} node{i}")
    relay.authorize(lines)


def listening(relay: Relay) -> int:
    out = subprocess.run(["ip", "netns", "exec", relay.netns, "ss", "-Hltn",
                          f"sport >= :{FLEET_BASE}"], capture_output=True, text=True,
                         timeout=30).stdout
    return len(out.splitlines())


def relay_pss_kb(relay: Relay) -> int:
    total = 0
    for pid in relay.pids():
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def fleet(site: NatSite, work: Path, n: int, rows: list[Row]) -> None:
    for max_startups in ("100:30:600", "10:30:100"):
        documented = max_startups == "100:30:600"
        with Relay(site.relay, site.relay_ip, max_startups=max_startups) as relay:
            fleet_keys(relay, n, work / "fleet-keys")
            base_pss = relay_pss_kb(relay)
            began = time.monotonic()
            child = subprocess.Popen(
                [*site.exec(site.node), sys.executable, __file__, "--fleet-child", str(n),
                 site.relay_ip, relay.host_key, str(work / "fleet-keys")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert child.stdout is not None
                child.stdout.readline()
                wait(f"{n} tunnels", lambda: listening(relay) >= n, 300)
                up = time.monotonic() - began
                if documented:
                    time.sleep(2)
                    per = (relay_pss_kb(relay) - base_pss) / n
                    rows.append(Row(f"relay memory per tunnel ({n} up, PSS of sshd)", per,
                                    "KiB", "report", None))
                    rows.append(Row(f"  {n} tunnels up from a cold start (their process's "
                                    "start included)", up, "s", "report", None))
                relay.kill()
                relay.start()
                back = wait(f"{n} tunnels back", lambda: listening(relay) >= n, 300)
                rows.append(Row(f"all {n} back after the relay restarted, MaxStartups "
                                f"{max_startups}{' (docs)' if documented else ' (default)'}",
                                back, "s", "<= 60", back <= 60))
            finally:
                if child.stdin is not None:
                    child.stdin.close()
                try:
                    child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()


# --- main --------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB, 100 tunnels")
    ap.add_argument("--tunnels", type=int, default=0,
                    help="how many tunnels (default 500; 0 with --quick: 100; -1: none)")
    args = parse_with_program(ap)
    if args is None:
        return 2
    binary = args.bin
    mib = 256 if args.quick else 1024
    reps = 1 if args.quick else 3
    n = args.tunnels if args.tunnels else (100 if args.quick else 500)
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="dm-bench-tun-", dir="/var/tmp"))
    work.chmod(0o755)
    with NatSite() as site, Dockerd() as dockerd, Master(host=site.master_ip) as master:
        ensure_image(dockerd)
        saved = make_big_image(dockerd, work, mib)
        gib = saved.stat().st_size / (1 << 30)
        tls = make_tls_files(work / "tls", hosts=(site.relay_ip, site.node_ip))
        certs = tls.client_dir
        print(f"bench: {binary}; image {saved.stat().st_size >> 20} MiB; {n} tunnels",
              file=sys.stderr)
        with Relay(site.relay, site.relay_ip) as relay:
            # memory: the same agent without and with the tunnel, after the same rounds
            rss = {}
            for tunnel in (False, True):
                agent = Agent(binary, site, relay, work / f"agent-{tunnel}", dockerd, master,
                              tls, tunnel)
                try:
                    if tunnel:
                        wait("the tunnel", lambda: relay.listens(PORT, site.relay_ip), 60)
                    rss[tunnel] = agent.rss_after(master, 5)
                finally:
                    if not tunnel:
                        agent.close()
            # RssAnon: the memory the tunnel takes from the node. VmRSS adds the pages of
            # shared libraries' code it runs (cryptography's OpenSSL for SSH's ciphers,
            # _asyncio): file-backed, shared and reclaimable, reported beside it
            (rss_off, anon_off), (rss_on, anon_on) = rss[False], rss[True]
            added = (anon_on - anon_off) / 1024
            rows.append(Row("memory added to the agent by the tunnel (RssAnon)", added,
                            f"MiB ({anon_off / 1024:.1f} -> {anon_on / 1024:.1f})",
                            "<= 8", added <= 8))
            rows.append(Row("  the same in VmRSS (with shared libraries' code pages)",
                            (rss_on - rss_off) / 1024,
                            f"MiB ({rss_off / 1024:.1f} -> {rss_on / 1024:.1f})", "report",
                            None))
            try:
                sink = work / "out.tar"
                rate: dict[str, dict[str, float]] = {}
                for name, ns, host, port in (
                        ("direct", site.node, site.node_ip, GATEWAY_PORT),
                        ("tunnel", None, site.relay_ip, PORT)):
                    save = statistics.median(
                        timed(site, ns, "save", host, port, certs, sink) for _ in range(reps))
                    loads = []
                    for _ in range(reps):
                        rmi(dockerd)
                        loads.append(timed(site, ns, "load", host, port, certs, saved))
                    rate[name] = {"save": gib / save, "load": gib / statistics.median(loads)}
                for what in ("save", "load"):
                    mine, theirs = rate["tunnel"][what], rate["direct"][what]
                    rows.append(Row(f"{what} throughput, through the tunnel / direct",
                                    mine / theirs, f"x ({mine * 1024:.0f} / "
                                    f"{theirs * 1024:.0f} MiB/s)", ">= 0.5",
                                    mine / theirs >= 0.5))
                rows.append(Row("agent peak RSS after the transfers", status_kb(
                    agent.proc.pid, "VmHWM") / 1024, "MiB", "report", None))
            finally:
                agent.close()
        saved.unlink()
        if n > 0:
            fleet(site, work, n, rows)
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return report(rows)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6])
    elif len(sys.argv) > 1 and sys.argv[1] == "--fleet-child":
        fleet_child(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        sys.exit(main())
