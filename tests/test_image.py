"""The container image (docs/design.md §7, docs/container.md) against a real dockerd, a
real local registry and a real rootful Podman.

Networking: the master's line exactly as generated (``-p 8771:8771``, the container on
Docker's bridge) runs against a dockerd, and a rootful Podman, each in a network namespace
of the test's own (support.netns), with the test master on the host end of its veth: the
master manages the node through the URL it makes of the registered address, as the
real one does. The other tests use a dockerd without a bridge, so their containers run
with ``--network=host``; their gateway listens on a free port of 127.0.0.1, given as
``DM_AGENT_GATEWAY`` (an address, as the master's line's are).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.binfmt import ensure as ensure_binfmt
from support.dockerd import Dockerd, populate
from support.frozen import require_frozen
from support.gateway import free_port, wait_for
from support.master import Master
from support.netns import Netns
from support.oci import (
    ImageFiles,
    PodmanCli,
    PodmanService,
    Registry,
    build,
    docker_cli,
    ensure_image,
    image_config,
    layer_members,
    tools_missing,
    version,
)

from dm_agent.gateway.auth import hash_password

pytestmark = pytest.mark.docker

NODE = "node-img"
SECRET = "image-node-secret"
PASSWORD = "image-gateway-pw"


@pytest.fixture(scope="module")
def image() -> ImageFiles:
    if os.geteuid() != 0:
        pytest.fail("tests/test_image.py needs root (dockerd, buildah)", pytrace=False)
    missing = tools_missing()
    if missing:
        pytest.fail(f"missing {' '.join(missing)}: run `bash .ci/deps`", pytrace=False)
    return ensure_image()


@pytest.fixture(scope="module")
def engine(image: ImageFiles) -> Iterator[Dockerd]:
    """A private dockerd named NODE with both architectures' images loaded
    (``dm-agent:VERSION-amd64``, ``-arm64``) and the fixture containers."""
    with Dockerd(hostname=NODE) as d:
        cli = docker_cli(d.unix_url)
        for arch in ("amd64", "arm64"):
            run(cli, "load", "-i", str(image.docker(arch)))
            run(cli, "tag", image.tag, f"{image.tag}-{arch}")
        populate(d)
        yield d


def run(cli: list[str], *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr}"
    return proc.stdout


def inspect(cli: list[str], name: str) -> dict[str, Any]:
    return json.loads(run(cli, "inspect", name))[0]  # type: ignore[no-any-return]


def master_line(d: Dockerd, master: Master, image: str, *extra: str,
                name: str = "havenAgent") -> list[str]:
    """The master's ``dm.agent.start`` line, its addresses changed (module docstring)."""
    return ["run", "--name", name, "-d",
            "-e", f"dm_agent_notifier_server={master.url}",
            "-e", f"dm_agent_notifier_secret={SECRET}",
            f"--hostname={NODE}", "--restart=unless-stopped", "--network=host",
            "-v", f"{d.socket_path}:/run/docker.sock", *extra, image]


@pytest.fixture
def agent(engine: Dockerd, master_factory: Callable[..., Master]
          ) -> Iterator[Callable[..., tuple[list[str], Master]]]:
    """Start the master's line (extra ``docker run`` flags, architecture); removed after."""
    cli = docker_cli(engine.unix_url)
    started: list[str] = []

    def start(*extra: str, arch: str = "amd64", name: str = "havenAgent"
              ) -> tuple[list[str], Master]:
        master = master_factory(secret=SECRET, expected_name=NODE)
        run(cli, *master_line(engine, master, f"dm-agent:{version()}-{arch}", *extra,
                              name=name))
        started.append(name)
        return cli, master

    yield start
    for name in started:
        subprocess.run([*cli, "rm", "-f", name], capture_output=True, stdin=subprocess.DEVNULL)


def registrations(master: Master, n: int, timeout: float) -> list[Any]:
    reqs = master.wait_for(n, timeout=timeout)
    for req in reqs:
        assert req.valid, req.errors
        assert req.status == 200
    return reqs


# ----------------------------------------------------------------- the build
def test_two_builds_give_the_same_index_digest(image: ImageFiles, tmp_path: Path) -> None:
    again = build(tmp_path / "dist", tmp_path / "work")
    assert again.digest == image.digest
    # The archives' own tar headers carry the time they were written; what they hold is
    # compared: the OCI blobs through the index digest; the docker archives through their
    # layer (diff_ids: its content digest) and their config, except the two fields of
    # Docker's format that buildah fills with its working container's random id and
    # hostname (the OCI config has neither: hence the index digest's reproducibility).
    for arch in ("amd64", "arm64"):
        first, second = image_config(image.docker(arch)), image_config(again.docker(arch))
        assert first["rootfs"] == second["rootfs"], arch
        for config in (first, second):
            config.pop("container")
            for key in ("config", "container_config"):
                config[key].pop("Hostname")
        assert first == second, arch


def test_image_is_scratch_with_the_program_its_libraries_and_a_health_check(
        image: ImageFiles) -> None:
    for arch, loader in (("amd64", "lib64/ld-linux-x86-64.so.2"),
                         ("arm64", "lib/ld-linux-aarch64.so.1")):
        config = image_config(image.docker(arch))
        assert config["architecture"] == arch
        cfg = config["config"]
        assert isinstance(cfg, dict)
        assert cfg["Entrypoint"] == ["/opt/dm-agent/dm-agent"]
        assert cfg["Healthcheck"]["Test"] == ["CMD", "/opt/dm-agent/dm-agent", "status"]
        names = layer_members(image.docker(arch))
        for path in ("opt/dm-agent/dm-agent", loader, "etc/dm-agent.ini", "tmp",
                     "run/dm-agent", "var/lib/dm-agent", "etc/ssl/certs/ca-certificates.crt"):
            assert path in names, f"{arch}: {path} missing"
        assert not any(n in names for n in ("bin/sh", "usr/bin/sh", "bin/busybox",
                                            "usr/bin/apt", "usr/bin/dpkg")), arch
        assert names["tmp"].mode & 0o7777 == 0o1777


def test_bill_of_materials_covers_the_image(image: ImageFiles) -> None:
    bom = json.loads(image.sbom.read_text())
    assert bom["metadata"]["component"]["hashes"][0]["content"] == image.digest.split(":")[1]
    for arch in ("amd64", "arm64"):
        system = {"/" + name for name, m in layer_members(image.docker(arch)).items()
                  if m.isfile() and name.startswith("lib")}
        (per_arch,) = [c for c in bom["components"] if c["bom-ref"] == f"image/{arch}"]
        named = {f["name"] for c in per_arch["components"] for f in c.get("components", [])
                 if f.get("type") == "file"}
        assert system and system <= named, system - named
        assert any(c["name"] == "libc6" for c in per_arch["components"])


def left_out(name: str) -> list[str]:
    """An array of build-image.sh: NEVER_LOADED or OPTIONAL, the extension modules the
    image leaves out."""
    text = (Path(__file__).resolve().parents[1] / "packaging" / "build-image.sh").read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"{name}=(")]
    return line.removeprefix(f"{name}=(").removesuffix(")").split()


def test_image_leaves_out_only_modules_it_can_do_without(
        image: ImageFiles, engine: Dockerd, master_factory: Callable[..., Master],
        tmp_path: Path) -> None:
    """The host's frozen program, where those modules are files of their own, runs what
    the image runs (registrations, the gateway's TLS and bcrypt, a reload, status). The
    modules the image says are never loaded are not in its memory map afterwards; the
    optional ones are (so the image, which lacks them, runs those imports' fallbacks:
    test_gateway_answers_with_credentials runs the same paths in the image); the image
    holds none of either."""
    never, optional = left_out("NEVER_LOADED"), left_out("OPTIONAL")
    assert {"_decimal", "_codecs_jp"} <= set(never) and "_lzma" in optional
    # the tunnel's asyncssh imports ctypes unconditionally: the image keeps it
    assert "_ctypes" not in never + optional
    program = require_frozen()
    dynload = next((program.parent / "_internal").glob("python3*/lib-dynload"))
    for name in never + optional:  # (so that the map below can show them)
        assert list(dynload.glob(f"{name}.*.so")), f"{name} is not a module of its own"
    master = master_factory(secret=SECRET, expected_name=NODE)
    port = free_port()
    env = {**os.environ, "STATE_DIRECTORY": str(tmp_path / "state"),
           "DM_AGENT_GATEWAY_PASSWORD_HASH": hash_password(PASSWORD.encode(), 4)}
    args = [str(program), "-f", "/dev/null", "-m", master.url, "-s", SECRET, "-t", "1",
            "-d", engine.unix_url, "--gateway", f"127.0.0.1:{port}",
            "--pidfile", str(tmp_path / "agent.pid")]
    proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        registrations(master, 1, timeout=30)
        assert wait_for(lambda: managed_containers(f"https://127.0.0.1:{port}"),
                        "the gateway's answer", 30)
        proc.send_signal(signal.SIGHUP)
        registrations(master, len(master.requests) + 2, timeout=30)
        status = subprocess.run([str(program), "status", "--pidfile", str(tmp_path / "agent.pid")],
                                capture_output=True, text=True, env=env, timeout=30)
        assert status.returncode == 0, status.stdout + status.stderr
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert "_bcrypt" in maps and "_ssl." in maps  # (the map is read while it all ran)
    loaded = [name for name in never if f"/lib-dynload/{name}." in maps]
    assert not loaded, f"the image leaves out {loaded} as never loaded, but the agent loaded it"
    tried = [name for name in optional if f"/lib-dynload/{name}." in maps]
    assert tried == optional, "an optional module is no longer imported: move it to NEVER_LOADED"
    for arch in ("amd64", "arm64"):
        names = layer_members(image.docker(arch))
        present = [n for n in names if "/lib-dynload/" in n
                   and n.rsplit("/", 1)[1].split(".")[0] in never + optional]
        assert not present, (arch, present)
        assert not [n for n in names if "liblzma" in n or "libbz2" in n], arch


# ----------------------------------------------------------------- the registry
def test_pushed_to_a_local_registry_pulled_by_docker_and_podman(
        image: ImageFiles, dockerd_factory: Callable[..., Dockerd]) -> None:
    with Registry() as registry:
        ref = f"{registry.address}/dm-agent:{image.version}"
        subprocess.run(["skopeo", "copy", "--all", "--quiet", "--dest-tls-verify=false",
                        f"oci-archive:{image.oci}:{image.version}", f"docker://{ref}"],
                       check=True, capture_output=True, timeout=300)
        d = dockerd_factory()
        cli = docker_cli(d.unix_url)
        run(cli, "pull", ref, timeout=300)  # 127.0.0.0/8: Docker's default insecure range
        assert f"{registry.address}/dm-agent@{image.digest}" in inspect(cli, ref)["RepoDigests"]
        podman = PodmanCli()
        try:
            pulled = podman("pull", "--tls-verify=false", ref)
            assert pulled.returncode == 0, pulled.stderr
            got = json.loads(podman("image", "inspect", ref).stdout)[0]
            assert got["Digest"] == image.digest
            assert got["Architecture"] == "amd64"
        finally:
            podman.close()


# ----------------------------------------------------------------- the master's line
def test_master_line_registers_stops_at_once_and_restarts_after_a_crash(
        engine: Dockerd, agent: Callable[..., tuple[list[str], Master]]) -> None:
    cli, master = agent()
    first = registrations(master, 1, timeout=60)[0]
    own = inspect(cli, "havenAgent")
    ids = {c["id"] for c in first.json["containers"]}
    assert own["Id"] in ids
    assert {c["Id"] for c in engine.api("/containers/json", params={"all": 1})} <= ids
    assert first.headers["X-Auth-Node"] == SECRET
    # the status command (the image's health check) answers from inside
    status = subprocess.run([*cli, "exec", "havenAgent", "dm-agent", "status"],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert status.returncode == 0, status.stdout + status.stderr
    logs = subprocess.run([*cli, "logs", "havenAgent"], capture_output=True, text=True).stderr
    assert " - INFO - started: master " in logs
    assert f" - INFO - registered as {NODE} with {master.url}" in logs
    assert "gateway: not started, so the master cannot manage this node's Docker" in logs

    # a crash: PID 1 of the container killed from the host, not by docker kill
    os.kill(own["State"]["Pid"], signal.SIGKILL)
    wait_for(lambda: inspect(cli, "havenAgent")["RestartCount"] >= 1, "a restart", 60)
    wait_for(lambda: inspect(cli, "havenAgent")["State"]["Running"], "running again", 60)
    n = len(master.requests)
    registrations(master, n + 1, timeout=60)

    # docker stop: SIGTERM; the agent ends by itself (exit 0), Docker's 10 s kill unused
    run(cli, "stop", "havenAgent", timeout=60)
    state = inspect(cli, "havenAgent")["State"]
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    assert "failed to exit within" not in engine.log_tail(200)


def test_gateway_answers_with_credentials(
        agent: Callable[..., tuple[list[str], Master]], tmp_path: Path) -> None:
    port = free_port()
    pw_hash = hash_password(PASSWORD.encode(), 4)
    cli, master = agent("-e", f"DM_AGENT_GATEWAY=127.0.0.1:{port}",
                        "-e", f"DM_AGENT_GATEWAY_PASSWORD_HASH={pw_hash}")
    registrations(master, 1, timeout=60)

    def version() -> dict[str, Any] | None:
        proc = subprocess.run(["curl", "-sk", "--max-time", "5", "-u", f"admin:{PASSWORD}",
                               f"https://127.0.0.1:{port}/version"], capture_output=True)
        return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout else None

    got = wait_for(version, "the gateway's /version", 30)
    assert "ApiVersion" in got
    denied = subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                             "-u", "admin:wrong", f"https://127.0.0.1:{port}/version"],
                            capture_output=True, text=True)
    assert denied.stdout == "401"
    logs = subprocess.run([*cli, "logs", "havenAgent"], capture_output=True, text=True).stderr
    assert PASSWORD not in logs and pw_hash not in logs
    assert "gateway: not started" not in logs


# ----------------------------------------------------------------- the line as generated
def generated_line(image: str, master: Master, socket_path: Path, pw_hash: str,
                   *extra: str) -> list[str]:
    """``dm.agent.start`` as the master generates it, its addresses the only change, plus
    the gateway's credentials (docs/container.md) and *extra* flags."""
    return ["run", "--name", "havenAgent", "-d",
            "-e", f"dm_agent_notifier_server={master.url}",
            "-e", f"dm_agent_notifier_secret={SECRET}",
            "-e", f"DM_AGENT_GATEWAY_PASSWORD_HASH={pw_hash}",
            f"--hostname={NODE}", "--restart=unless-stopped", "-p", "8771:8771",
            "-v", f"{socket_path}:/run/docker.sock", *extra, image]


def managed_containers(url: str) -> set[str] | None:
    """The container ids the master gets through the node's gateway (Basic ``admin``, the
    master's certificate check aside: it trusts the cluster CA, this test has none)."""
    proc = subprocess.run(["curl", "-sk", "--max-time", "5", "-u", f"admin:{PASSWORD}",
                           f"{url}/containers/json?all=1"], capture_output=True)
    if proc.returncode != 0 or not proc.stdout.startswith(b"["):
        return None
    return {c["Id"] for c in json.loads(proc.stdout)}


@pytest.fixture(scope="module")
def bridged(image: ImageFiles) -> Iterator[tuple[Netns, Dockerd]]:
    """A dockerd with Docker's bridge, NAT and published ports, in a namespace of its own
    whose veth's host end is where the test master listens."""
    with Netns() as ns, Dockerd(hostname=NODE, netns=ns) as d:
        run(docker_cli(d.unix_url), "load", "-i", str(image.docker("amd64")))
        yield ns, d


def test_generated_line_on_dockers_bridge_is_managed_through_the_published_port(
        bridged: tuple[Netns, Dockerd], master_factory: Callable[..., Master]) -> None:
    ns, d = bridged
    cli = docker_cli(d.unix_url)
    master = master_factory(secret=SECRET, expected_name=NODE, host=ns.host_ip)
    pw_hash = hash_password(PASSWORD.encode(), 4)
    run(cli, *generated_line(f"dm-agent:{version()}", master, d.socket_path, pw_hash))
    try:
        req = registrations(master, 1, timeout=60)[0]
        # the container's own address (its bridge's) is not announced: the master could
        # not reach it. A loopback host is, which the master replaces with the address the
        # registration came from: the node's, through Docker's NAT.
        assert req.json["address"] == "https://127.0.0.1:8771"
        assert req.client[0] == ns.ns_ip
        assert req.docker_url == f"https://{ns.ns_ip}:8771"
        own = inspect(cli, "havenAgent")["Id"]
        engine_ids = {c["Id"] for c in d.api("/containers/json", params={"all": 1})}
        assert own in engine_ids
        got = wait_for(lambda: managed_containers(req.docker_url), "the gateway's answer", 30)
        assert got == engine_ids
        logs = run_logs(cli)
        assert "announced as https://127.0.0.1:8771 (the master puts the address" in logs
        assert PASSWORD not in logs and pw_hash not in logs
        # the image's HEALTHCHECK (dm-agent status, every 30 s): healthy once registered
        wait_for(lambda: health(cli) == "healthy", "docker's health status: healthy", 90)
        assert health(cli) == "healthy"
    finally:
        subprocess.run([*cli, "rm", "-f", "havenAgent"], capture_output=True,
                       stdin=subprocess.DEVNULL)


def test_generated_line_with_the_tunnels_variables_is_managed_through_the_relay(
        bridged: tuple[Netns, Dockerd], master_factory: Callable[..., Master]) -> None:
    """The master's line with the tunnel's variables added (docs/tunnel.md): the node's
    container on Docker's bridge keeps an SSH connection to a real sshd relay (here in the
    engine's own namespace, on its address the master reaches), announces the relay's
    port from its first registration, and the master manages the node through it. The
    node's key is made in the container; ``dm-agent tunnel-key`` run in it gives the
    relay's line, and a SIGHUP (``docker kill -s HUP``) makes the waiting tunnel try at
    once."""
    from support.relay import USER, Relay

    ns, d = bridged
    cli = docker_cli(d.unix_url)
    master = master_factory(secret=SECRET, expected_name=NODE, host=ns.host_ip)
    pw_hash = hash_password(PASSWORD.encode(), 4)
    listen = f"{ns.ns_ip}:20011"
    with Relay(ns.name, ns.ns_ip) as relay:
        run(cli, *generated_line(f"dm-agent:{version()}", master, d.socket_path, pw_hash,
                                 "-e", f"DM_AGENT_TUNNEL={USER}@{ns.ns_ip}",
                                 "-e", f"DM_AGENT_TUNNEL_LISTEN={listen}",
                                 "-e", f"DM_AGENT_TUNNEL_HOST_KEY={relay.host_key}"))
        try:
            req = registrations(master, 1, timeout=60)[0]
            assert req.json["address"] == f"https://{listen}"
            key = json.loads(run(cli, "exec", "havenAgent", "/opt/dm-agent/dm-agent",
                                 "tunnel-key", "--json"))
            relay.authorize([key["authorized_keys"]])
            run(cli, "kill", "-s", "HUP", "havenAgent")
            engine_ids = {c["Id"] for c in d.api("/containers/json", params={"all": 1})}
            got = wait_for(lambda: managed_containers(f"https://{listen}"),
                           "the gateway's answer through the relay", 60)
            assert got == engine_ids
            assert {r.json["address"] for r in master.requests} == {f"https://{listen}"}
            logs = run_logs(cli)
            assert "tunnel: up" in logs and PASSWORD not in logs and pw_hash not in logs
            assert "PRIVATE KEY" not in logs
        finally:
            subprocess.run([*cli, "rm", "-f", "havenAgent"], capture_output=True,
                           stdin=subprocess.DEVNULL)


def health(cli: list[str]) -> str | None:
    state = inspect(cli, "havenAgent")["State"]
    return state.get("Health", {}).get("Status")  # type: ignore[no-any-return]


def run_logs(cli: list[str]) -> str:
    proc = subprocess.run([*cli, "logs", "havenAgent"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    return proc.stdout + proc.stderr


def test_generated_line_runs_on_rootful_podman(
        image: ImageFiles, master_factory: Callable[..., Master]) -> None:
    """The line with ``podman`` for ``docker`` (docs/container.md), Podman's socket as
    the node's Docker, its CNI bridge and port mapping in a namespace of the test's own."""
    podman = PodmanCli()
    try:
        loaded = podman("load", "-i", str(image.docker("amd64")))
        assert loaded.returncode == 0, loaded.stderr
        with Netns() as ns, PodmanService(podman) as service:
            # Podman's own name for the host (its /info's Name): this machine's hostname
            master = master_factory(secret=SECRET, expected_name=service.name(),
                                    host=ns.host_ip)
            pw_hash = hash_password(PASSWORD.encode(), 4)
            # (this machine's hard limits are under Podman's default NOFILE and NPROC,
            # which runc would fail to set; a node's are not. Podman's health check timers
            # need systemd as PID 1, which this machine has not)
            line = generated_line(f"docker.io/library/dm-agent:{version()}", master,
                                  service.socket, pw_hash, "--ulimit", "nofile=1024:4096",
                                  "--ulimit", "nproc=1024:1024", "--no-healthcheck")
            started = subprocess.run(["nsenter", f"--net={ns.path}", "--", *podman.args, *line],
                                     capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                     timeout=120)
            assert started.returncode == 0, started.stderr
            try:
                req = registrations(master, 1, timeout=60)[0]
                assert req.json["address"] == "https://127.0.0.1:8771"
                assert req.client[0] == ns.ns_ip
                ids = {c["id"] for c in req.json["containers"]}
                own = json.loads(podman("inspect", "havenAgent").stdout)[0]["Id"]
                assert own in ids
                got = wait_for(lambda: managed_containers(req.docker_url),
                               "the gateway's answer through Podman's port mapping", 30)
                assert own in got
                logs = podman("logs", "havenAgent")
                assert f" - INFO - registered as {service.name()} with {master.url}" \
                    in logs.stdout + logs.stderr
            finally:
                podman("rm", "-f", "havenAgent")
    finally:
        podman.close()


# ----------------------------------------------------------------- host figures
def host_dry_run(d: Dockerd) -> dict[str, Any]:
    program = require_frozen()
    proc = subprocess.run([str(program), "--once", "--dry-run", "-f", "/dev/null",
                           "-d", d.unix_url], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["system"]  # type: ignore[no-any-return]


def test_with_the_flags_disks_and_network_are_the_hosts(
        engine: Dockerd, agent: Callable[..., tuple[list[str], Master]]) -> None:
    before = host_dry_run(engine)
    cli, master = agent("--pid=host", "-v", "/:/host:ro")
    system = registrations(master, 1, timeout=60)[0].json["system"]
    after = host_dry_run(engine)
    assert set(system["disks"]) == set(before["disks"]) == set(after["disks"])
    for mount, fig in system["disks"].items():
        assert fig["total"] == before["disks"][mount]["total"], mount
        assert abs(fig["used"] - before["disks"][mount]["used"]) < 64 * 1024 * 1024, mount
    assert set(system["net"]) == set(before["net"]) == set(after["net"])
    for nic, fig in system["net"].items():
        for key in ("bytesIn", "bytesOut"):
            assert before["net"][nic][key] <= fig[key] <= after["net"][nic][key], (nic, key)
    logs = subprocess.run([*cli, "logs", "havenAgent"], capture_output=True, text=True).stderr
    assert "running in a container without" not in logs


def test_without_the_flags_no_container_mount_is_a_host_disk(
        agent: Callable[..., tuple[list[str], Master]]) -> None:
    cli, master = agent()
    reqs = registrations(master, 1, timeout=60)
    system = reqs[0].json["system"]
    assert system["disks"] == {}
    assert system["net"] == {}
    assert system["memory"]["total"] > 0
    logs = subprocess.run([*cli, "logs", "havenAgent"], capture_output=True, text=True).stderr
    warning = ("WARNING - running in a container without the host's PID 1: host disks and "
               "network are not reported (add --pid=host -v /:/host:ro to show them)")
    assert logs.count(warning) == 1, logs


def test_with_pid_host_but_no_host_root_disks_are_absent_network_is_the_hosts(
        engine: Dockerd, agent: Callable[..., tuple[list[str], Master]]) -> None:
    cli, master = agent("--pid=host")
    system = registrations(master, 1, timeout=60)[0].json["system"]
    assert system["disks"] == {}
    assert set(system["net"]) == set(host_dry_run(engine)["net"])
    logs = subprocess.run([*cli, "logs", "havenAgent"], capture_output=True, text=True).stderr
    assert "add -v /:/host:ro to show them" in logs


# ----------------------------------------------------------------- arm64
def test_arm64_image_runs_under_qemu_and_registers(
        agent: Callable[..., tuple[list[str], Master]]) -> None:
    ensure_binfmt("arm64")
    cli, master = agent("--platform", "linux/arm64", arch="arm64")
    req = registrations(master, 1, timeout=180)[0]
    assert req.node_name == NODE
    assert inspect(cli, "havenAgent")["Platform"] == "linux"
    assert image_arch(cli, "havenAgent") == "arm64"


def image_arch(cli: list[str], name: str) -> str:
    image_id = inspect(cli, name)["Image"]
    return str(json.loads(run(cli, "image", "inspect", image_id))[0]["Architecture"])
