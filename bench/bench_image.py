"""Benchmarks of the container image (docs/container.md), run the way the master adds a
node: its generated line, ``-p 8771:8771`` on Docker's bridge, against a private dockerd
in a network namespace of its own and the test master on the namespace's veth (as
tests/test_image.py runs it). Needs root and ``make image``.

Prints one table (bench_agent.report): the compressed size per architecture against the
15 MB target, ``docker stop`` against 2 s (the agent ends on SIGTERM: Docker's 10 s kill
is never needed), and, as figures, the time from ``docker run`` to the first accepted
registration, from a crash (PID 1 killed from the host) to the next registration, from
``docker run`` to Docker's ``healthy`` (the health check runs every 30 s), and the agent's
peak memory in the container. Each timed figure is the median of several runs.

    make bench-image
    python bench/bench_image.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test harness, as the suite imports it
sys.path.insert(0, str(ROOT / "bench"))

from bench_agent import Row, report, status_kb  # noqa: E402
from support.dockerd import Dockerd  # noqa: E402
from support.master import Master  # noqa: E402
from support.netns import Netns  # noqa: E402
from support.oci import docker_cli, ensure_image  # noqa: E402

SECRET = "bench-image-secret"
NODE = "node-bench"
MB = 1_000_000


def docker(cli: list[str], *args: str) -> str:
    proc = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"docker {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def state(cli: list[str]) -> dict[str, Any]:
    return json.loads(docker(cli, "inspect", "havenAgent"))[0]["State"]  # type: ignore[no-any-return]


def until(predicate: Any, what: str, timeout: float) -> float:
    """Seconds until *predicate* holds (polled every 20 ms)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def one_run(cli: list[str], d: Dockerd, ns: Netns, tag: str,
            health: bool) -> dict[str, float]:
    master = Master(secret=SECRET, expected_name=NODE, host=ns.host_ip).start()
    try:
        line = ["run", "--name", "havenAgent", "-d",
                "-e", f"dm_agent_notifier_server={master.url}",
                "-e", f"dm_agent_notifier_secret={SECRET}",
                f"--hostname={NODE}", "--restart=unless-stopped", "-p", "8771:8771",
                "-v", f"{d.socket_path}:/run/docker.sock", tag]
        start = time.monotonic()
        docker(cli, *line)
        master.wait_for(1, timeout=60)
        out = {"first": time.monotonic() - start}
        pid = state(cli)["Pid"]
        out["rss"] = status_kb(pid, "VmHWM") / 1024
        os.kill(pid, signal.SIGKILL)
        crashed = time.monotonic()
        master.wait_for(2, timeout=60)
        out["restart"] = time.monotonic() - crashed
        if health:
            out["healthy"] = time.monotonic() - start + until(
                lambda: state(cli).get("Health", {}).get("Status") == "healthy",
                "healthy", 120)
        stop_start = time.monotonic()
        docker(cli, "stop", "havenAgent")
        out["stop"] = time.monotonic() - stop_start
        if state(cli)["ExitCode"] != 0:
            raise SystemExit(f"docker stop: exit {state(cli)['ExitCode']}, not 0")
        return out
    finally:
        subprocess.run([*cli, "rm", "-f", "havenAgent"], capture_output=True,
                       stdin=subprocess.DEVNULL)
        master.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per timed figure (5)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_image.py needs root (dockerd, network namespaces)")
    files = ensure_image()
    sizes = {}
    with tempfile.TemporaryDirectory() as layout:
        with tarfile.open(files.oci) as tar:
            tar.extractall(layout, filter="data")
        for arch in ("amd64", "arm64"):  # (what build-image.sh prints: layer and config)
            out = subprocess.run([sys.executable, str(ROOT / "packaging" / "sbom_image.py"),
                                  "--size", layout, arch],
                                 capture_output=True, text=True, check=True)
            sizes[arch] = int(out.stdout)
    runs: list[dict[str, float]] = []
    with Netns() as ns, Dockerd(hostname=NODE, netns=ns) as d:
        cli = docker_cli(d.unix_url)
        docker(cli, "load", "-i", str(files.docker("amd64")))
        for i in range(args.runs):
            runs.append(one_run(cli, d, ns, files.tag, health=i == 0))

    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs if key in r)

    rows = [Row(f"compressed size, {arch}", sizes[arch] / MB, "MB", "<= 15 MB",
                sizes[arch] <= 15 * MB) for arch in ("amd64", "arm64")]
    rows += [
        Row("docker stop", median("stop"), "s", "< 2 s", median("stop") < 2),
        Row("docker run to first registration", median("first"), "s", "report", None),
        Row("crash to next registration", median("restart"), "s", "report", None),
        Row("docker run to healthy (every 30 s)", median("healthy"), "s", "report", None),
        Row("agent peak memory in the container", median("rss"), "MiB", "report", None),
    ]
    print(f"image {files.digest}, {args.runs} runs, medians")
    return report(rows)


if __name__ == "__main__":
    sys.exit(main())
