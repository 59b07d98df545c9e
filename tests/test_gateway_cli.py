"""The docker CLI through the gateway over mutual TLS, against a real dockerd (issue 20).

One private dockerd and one gateway (a Listener in this process, upstream on dockerd's
unix socket) serve the whole module. The test dockerd has no bridge network: containers
run with ``--network none``.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import gateway as shared
from support.dockerd import DOCKER_CLI, Dockerd, make_tls_files
from support.gateway import GatewayRig, RssWatch, lines, wait_for, write_image_tar
from support.image import IMAGE

pytestmark = pytest.mark.docker
engine, cfg = shared.engine, shared.cfg  # the gateway tests' fixtures

NONE = ("--network", "none")


@pytest.fixture(scope="module")
def gw(engine: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayRig]:
    rig = GatewayRig(make_tls_files(tmp_path_factory.mktemp("gwtls")), engine.unix_url)
    yield rig
    rig.close()


def test_ps_over_mutual_tls(gw: GatewayRig, engine: Dockerd, cfg: Path) -> None:
    cid = engine.api("/containers/create", "POST", {"Image": IMAGE, "Cmd": ["true"],
                                                   "HostConfig": {"NetworkMode": "none"}})["Id"]
    out = gw.docker(cfg, "ps", "-a", "--no-trunc", "--format", "{{.ID}}").stdout
    assert cid in lines(out)
    engine.api(f"/containers/{cid}", "DELETE")


def test_run_rm_echo(gw: GatewayRig, cfg: Path) -> None:
    proc = gw.docker(cfg, "run", "--rm", *NONE, IMAGE, "echo", "through the gateway")
    assert proc.stdout == b"through the gateway\n"


def test_run_interactive_cat_half_close(gw: GatewayRig, cfg: Path) -> None:
    """stdin ends → the CLI's close_notify → the gateway half-closes towards Docker →
    cat ends, its output still arrives, and the CLI exits 0."""
    proc = gw.docker(cfg, "run", "-i", "--rm", *NONE, IMAGE, "cat", stdin=b"hi\n", timeout=60)
    assert (proc.returncode, proc.stdout) == (0, b"hi\n")


def test_run_interactive_cat_large_stdin(gw: GatewayRig, cfg: Path) -> None:
    """More than every buffer on the way holds, both ways at once: neither direction may
    wait on the other."""
    data = bytes(range(256)) * (128 * 1024)  # 32 MiB
    proc = gw.docker(cfg, "run", "-i", "--rm", *NONE, IMAGE, "cat", stdin=data, timeout=120)
    assert proc.returncode == 0
    assert len(proc.stdout) == len(data) and proc.stdout == data


def test_exec_interactive(gw: GatewayRig, cfg: Path) -> None:
    name = "gw-exec"
    gw.docker(cfg, "run", "-d", "--name", name, *NONE, IMAGE, "sleep", "300")
    try:
        proc = gw.docker(cfg, "exec", "-i", name, "cat", stdin=b"exec stdin\n")
        assert proc.stdout == b"exec stdin\n"
    finally:
        gw.docker(cfg, "rm", "-f", name, check=False)


def test_logs_follow_until_exit(gw: GatewayRig, cfg: Path) -> None:
    script = "for i in 1 2 3; do echo line$i; sleep 0.3; done"
    cid = gw.docker(cfg, "run", "-d", *NONE, IMAGE, "sh", "-c", script).stdout.strip()
    try:
        proc = gw.docker(cfg, "logs", "-f", cid.decode(), timeout=60)
        assert lines(proc.stdout) == ["line1", "line2", "line3"]
    finally:
        gw.docker(cfg, "rm", "-f", cid.decode(), check=False)


def test_events_bounded(gw: GatewayRig, cfg: Path) -> None:
    since = str(int(time.time()) - 1)
    gw.docker(cfg, "run", "--rm", "--name", "gw-ev", *NONE, IMAGE, "true")
    until = str(int(time.time()) + 1)
    proc = gw.docker(cfg, "events", "--since", since, "--until", until, "--filter",
                     "container=gw-ev", "--format", "{{.Action}}", timeout=60)
    actions = lines(proc.stdout)
    assert "create" in actions and "destroy" in actions


def test_events_stream_ends_when_client_leaves(gw: GatewayRig, cfg: Path) -> None:
    """A stream has no idle timeout; the client leaving ends it (and its upstream)."""
    before = gw.listener.snapshot()["connections"]
    events = subprocess.Popen([DOCKER_CLI, "events", "--format", "{{.Action}} {{.Actor.ID}}"],
                              stdout=subprocess.PIPE, env=gw.cli_env(cfg))
    seen: queue.Queue[str] = queue.Queue()
    assert events.stdout is not None
    out = events.stdout
    threading.Thread(target=lambda: [seen.put(b.decode()) for b in iter(out.readline, b"")],
                     daemon=True).start()
    made: list[str] = []
    try:
        # the stream is open once Docker's events come through it (the connection count
        # says less: the CLI pings first, and connections of earlier tests may still be
        # closing); a container made before is not in it, so make one until one is
        got: list[str] = []
        for _ in range(10):
            made.append(gw.docker(cfg, "create", *NONE, IMAGE, "true").stdout.strip().decode())
            try:
                while (line := seen.get(timeout=3).split())[:1] != ["create"]:
                    got.append(" ".join(line))  # another container's event: read on
            except queue.Empty:
                continue
            assert line[1] in made, (line, made)
            break
        else:
            raise AssertionError(f"no create event came through the stream: {got}")
    finally:
        events.kill()
        events.wait()
    wait_for(lambda: gw.listener.snapshot()["connections"] <= before,
             "the gateway to end the stream of a client that left")
    gw.docker(cfg, "rm", *made)


def test_load_large_image_streams(gw: GatewayRig, cfg: Path, tmp_path: Path) -> None:
    """A 256 MiB `docker load` (chunked upload) does not grow the gateway's memory."""
    tar = tmp_path / "big.tar"
    size = 256 << 20
    write_image_tar(tar, "dmtest/big:1", size)
    try:
        with RssWatch() as rss:
            proc = gw.docker(cfg, "load", "-i", str(tar), timeout=300)
        assert b"dmtest/big:1" in proc.stdout
        assert rss.growth < 64 << 20, f"RSS grew by {rss.growth >> 20} MiB during the load"
        inspect = json.loads(gw.docker(cfg, "image", "inspect", "dmtest/big:1").stdout)
        assert inspect[0]["Size"] >= size
    finally:
        gw.docker(cfg, "rmi", "dmtest/big:1", check=False)


def test_build_small_context(gw: GatewayRig, cfg: Path, tmp_path: Path) -> None:
    """The classic builder: the CLI here has no buildx plugin, which BuildKit needs."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "greeting").write_text("built through the gateway\n")
    (ctx / "Dockerfile").write_text(f"FROM {IMAGE}\nCOPY greeting /greeting\n"
                                    "RUN cat /greeting\n")
    gw.docker(cfg, "build", "--network", "none", "-t", "dmtest/built:1", str(ctx),
              env={"DOCKER_BUILDKIT": "0"}, timeout=180)
    try:
        out = gw.docker(cfg, "run", "--rm", *NONE, "dmtest/built:1", "cat", "/greeting").stdout
        assert out == b"built through the gateway\n"
    finally:
        gw.docker(cfg, "rmi", "dmtest/built:1", check=False)


def test_cp_both_ways(gw: GatewayRig, cfg: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(bytes(range(256)) * 4096)
    name = "gw-cp"
    gw.docker(cfg, "run", "-d", "--name", name, *NONE, IMAGE, "sleep", "300")
    try:
        gw.docker(cfg, "cp", str(src), f"{name}:/tmp/in.bin")
        gw.docker(cfg, "cp", f"{name}:/tmp/in.bin", str(tmp_path / "out.bin"))
        assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
    finally:
        gw.docker(cfg, "rm", "-f", name, check=False)


def test_stats_no_stream(gw: GatewayRig, cfg: Path) -> None:
    name = "gw-stats"
    gw.docker(cfg, "run", "-d", "--name", name, *NONE, IMAGE, "sleep", "300")
    try:
        out = gw.docker(cfg, "stats", "--no-stream", "--format", "{{.Name}} {{.PIDs}}",
                        name).stdout
        assert lines(out) == [f"{name} 1"]
    finally:
        gw.docker(cfg, "rm", "-f", name, check=False)
