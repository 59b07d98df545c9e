"""The tunnel through a real OpenSSH relay (docs/design.md §8, docs/tunnel.md): the node
behind a NAT that drops every inbound connection, the relay (``sshd`` with the
``Match User`` block of docs/tunnel.md) and the master on one segment, a real dockerd.

Each test is one start of the real agent, in the node's namespace
(``support.netns.NatSite``): through the tunnel (the registrations, a client acting as
the master, the docker CLI over TLS to the relay's port, status), the relay's refusals,
and the faults (relay unreachable at start, sshd restarted, the link cut, SIGHUP)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from agentproc import BIN, clean_env, stop
from support import gateway as shared
from support.dockerd import DOCKER_CLI, Dockerd, TlsFiles, make_tls_files
from support.gateway import lines, write_image_tar
from support.image import IMAGE
from support.master import Master
from support.netns import NatSite
from support.relay import USER, Relay, keygen

pytestmark = pytest.mark.docker
engine = shared.engine  # a private dockerd with the test image

PASSWORD = "tunnel-test-password"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
GATEWAY_PORT = 8771
PORT = 20011


@pytest.fixture(scope="module")
def site() -> Iterator[NatSite]:
    with NatSite() as s:
        yield s


@pytest.fixture(scope="module")
def certs(site: NatSite, tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """The gateway's certificate names the relay's address: the master and the docker
    CLI dial that, and the TLS session ends at the node."""
    return make_tls_files(tmp_path_factory.mktemp("tun-tls"), hosts=(site.relay_ip,))


@pytest.fixture
def relay(site: NatSite) -> Iterator[Relay]:
    # ClientAlive 2 s × 3: the relay frees a dead node's port in seconds (docs/tunnel.md
    # recommends 15 s × 3, within a minute); the mechanism is the same
    with Relay(site.relay, site.relay_ip, alive_interval=2, alive_count=3) as r:
        yield r


class Node:
    """The agent in the node's namespace, its config, and the tools to look at it."""

    def __init__(self, site: NatSite, home: Path, program: str, relay: Relay, master: Master,
                 docker: str, certs: TlsFiles, **extra: str) -> None:
        self.site, self.home, self.program, self.relay = site, home, program, relay
        self.ini = home / "dm-agent.ini"
        self.env = {"STATE_DIRECTORY": str(home / "state")}
        self.values = {
            "docker": docker, "master": master.url, "timeout": "1", "log_level": "1",
            "pidfile": str(home / "agent.pid"), "gateway": f"0.0.0.0:{GATEWAY_PORT}",
            "gateway_cert": str(certs.server_cert), "gateway_key": str(certs.server_key),
            "gateway_client_ca": str(certs.ca), "gateway_password_hash": HASH,
            "tunnel": f"{USER}@{site.relay_ip}", "tunnel_listen": f"{site.relay_ip}:{PORT}",
            "tunnel_host_key": str(relay.host_key_file), **extra}
        self.write()
        self.proc: subprocess.Popen[str] | None = None

    def write(self, **changes: str) -> None:
        self.values.update(changes)
        self.ini.write_text("[main]\n" + "".join(f"{k} = {v}\n" for k, v in
                                                 self.values.items()))

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.site.exec(self.site.node), self.program, *args],
                              capture_output=True, text=True, cwd=self.home, timeout=60,
                              env=clean_env(self.home, self.env), stdin=subprocess.DEVNULL)

    def authorize(self, port: int = PORT, *others: str) -> str:
        """This node's line (from ``dm-agent tunnel-key``) in the relay's table."""
        proc = self.run("tunnel-key", "--json", "-f", str(self.ini))
        assert proc.returncode == 0, proc.stderr
        line = json.loads(proc.stdout)["authorized_keys"]
        self.relay.authorize([line.replace(f":{PORT}\"", f":{port}\""), *others])
        return str(line)

    def start(self) -> Node:
        self.proc = subprocess.Popen([*self.site.exec(self.site.node), self.program,
                                      "-f", str(self.ini)], text=True, cwd=self.home,
                                     env=clean_env(self.home, self.env),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        return self

    def stop(self) -> str:
        assert self.proc is not None
        err = stop(self.proc)
        self.proc = None
        assert PASSWORD not in err and "Traceback" not in err, err
        assert "PRIVATE KEY" not in err, err
        return err

    def status(self) -> tuple[str, dict[str, Any]]:
        text = self.run("status", "-f", str(self.ini)).stdout
        data = json.loads(self.run("status", "--json", "-f", str(self.ini)).stdout)
        return text, data

    def tunnel(self) -> dict[str, Any]:
        state = self.status()[1].get("state") or {}
        return dict(state.get("tunnel") or {})

    def pid(self) -> int:
        """The agent's own PID (``ip netns exec`` execs it, so the Popen's)."""
        assert self.proc is not None
        return self.proc.pid


def wait(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def as_master(host: str, port: int, path: str, certs: TlsFiles,
              timeout: float = 10.0) -> tuple[int, bytes]:
    """One request as the master sends it: TLS verified against the CA, no SNI and no
    host name check, preemptive Basic ``admin``."""
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.check_hostname = False
    token = base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
    with socket.create_connection((host, port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Basic "
                    f"{token}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    return int(head.split()[1]), body


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out, body = out + rest[:n], rest[n + 2:]
    return out


def through(site: NatSite, certs: TlsFiles, port: int = PORT) -> bool:
    """The gateway answers the master through the relay's port."""
    return as_master(site.relay_ip, port, "/_ping", certs, timeout=5)[0] == 200


def docker_cli(site: NatSite, certs: TlsFiles, home: Path, *args: str,
               stdin: bytes | None = None, timeout: float = 120) -> bytes:
    """The docker CLI over mutual TLS to the relay's port."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")},
           "DOCKER_HOST": f"tcp://{site.relay_ip}:{PORT}", "DOCKER_TLS_VERIFY": "1",
           "DOCKER_CERT_PATH": str(certs.client_dir), "DOCKER_CONFIG": str(home / "dcfg")}
    proc = subprocess.run([DOCKER_CLI, *args], input=stdin, capture_output=True, env=env,
                          timeout=timeout, stdin=None if stdin is not None else
                          subprocess.DEVNULL)
    assert proc.returncode == 0, f"docker {args}: {proc.stderr.decode(errors='replace')}"
    return proc.stdout


def refused(host: str, port: int, timeout: float = 3.0) -> bool:
    """Nothing answers at host:port (dropped or refused) within ``timeout``."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return True
    return False


# --- through the tunnel ----------------------------------------------------------------


def through_the_tunnel(program: str, site: NatSite, relay: Relay, master: Master,
                       engine: Dockerd, certs: TlsFiles, home: Path) -> None:
    node = Node(site, home, program, relay, master, engine.unix_url, certs)
    line = node.authorize()
    key = home / "state" / "tunnel" / "id_ed25519"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert line.startswith(f'restrict,port-forwarding,permitlisten="{site.relay_ip}:{PORT}" '
                           "ssh-ed25519 ")
    node.start()
    try:
        announced = f"https://{site.relay_ip}:{PORT}"
        first = master.wait_for(1, timeout=30)[0]
        assert first.json["address"] == announced
        wait("the tunnel", lambda: through(site, certs))

        # the master cannot dial the node itself: its gateway listens on the node's own
        # address, which answers inside the node's network only
        assert refused(site.node_ip, GATEWAY_PORT)
        inside = subprocess.run([*site.exec(site.node), "curl", "-sk", "-o", "/dev/null",
                                 "-w", "%{http_code}", f"https://{site.node_ip}:"
                                 f"{GATEWAY_PORT}/_ping"], capture_output=True, text=True,
                                timeout=30)
        assert inside.stdout == "401", inside

        # as the master: exactly the engine's containers
        cid = docker_cli(site, certs, home, "run", "-d", "--network", "none", IMAGE,
                         "sleep", "300").decode().strip()
        code, body = as_master(site.relay_ip, PORT, "/containers/json?all=1", certs)
        assert code == 200
        engine_ids = subprocess.run([DOCKER_CLI, "-H", engine.unix_url, "ps", "-aq",
                                     "--no-trunc"], capture_output=True, text=True,
                                    timeout=60, check=True).stdout.split()
        assert sorted(c["Id"] for c in json.loads(body)) == sorted(engine_ids)
        assert cid in engine_ids

        # the docker CLI over TLS to the relay's port: half-close, exec -i, logs -f, load
        assert docker_cli(site, certs, home, "run", "-i", "--rm", "--network", "none", IMAGE,
                          "cat", stdin=b"hi\n") == b"hi\n"
        assert docker_cli(site, certs, home, "exec", "-i", cid, "cat",
                          stdin=b"through the relay\n") == b"through the relay\n"
        script = "for i in 1 2 3; do echo tick$i; sleep 0.2; done"
        ticker = docker_cli(site, certs, home, "run", "-d", "--network", "none", IMAGE,
                            "sh", "-c", script).decode().strip()
        assert lines(docker_cli(site, certs, home, "logs", "-f", ticker)) == \
            ["tick1", "tick2", "tick3"]
        tar = home / "big.tar"
        write_image_tar(tar, "dmtest/tunnelbig:1", 200 << 20)
        assert b"dmtest/tunnelbig:1" in docker_cli(site, certs, home, "load", "-i", str(tar),
                                                   timeout=300)
        tar.unlink()
        docker_cli(site, certs, home, "rm", "-f", cid, ticker)
        docker_cli(site, certs, home, "rmi", "dmtest/tunnelbig:1")

        text, data = node.status()
        assert "tunnel: up since " in text and f"through {USER}@{site.relay_ip}:22" in text
        assert data["state"]["tunnel"]["state"] == "up"
        assert node.run("status", "--manageable", "-f", str(node.ini)).returncode == 0
        maps = Path(f"/proc/{node.pid()}/maps").read_text()
        assert "/_asyncio." in maps  # the SSH library runs (the negative case: below)
    finally:
        err = node.stop()
    assert {r.json["address"] for r in master.requests} == {announced}
    assert err.count("INFO - tunnel: up through") == 1, err
    assert "ERROR" not in err, err


def test_through_the_tunnel(site: NatSite, relay: Relay, master_factory: Callable[..., Master],
                            engine: Dockerd, certs: TlsFiles, tmp_path: Path) -> None:
    through_the_tunnel(BIN, site, relay, master_factory(host=site.master_ip), engine, certs,
                       tmp_path)


@pytest.mark.packages
def test_frozen_through_the_tunnel(site: NatSite, relay: Relay,
                                   master_factory: Callable[..., Master], engine: Dockerd,
                                   certs: TlsFiles, tmp_path: Path) -> None:
    """The frozen program the packages ship, with PyInstaller's bundled asyncssh."""
    from support.frozen import require_frozen

    through_the_tunnel(str(require_frozen()), site, relay, master_factory(host=site.master_ip),
                       engine, certs, tmp_path)


# --- the relay's refusals --------------------------------------------------------------


def _ssh(relay: Relay, site: NatSite, key: Path, home: Path, *args: str,
         timeout: float = 30) -> subprocess.Popen[bytes]:
    known = home / "known_hosts"
    known.write_text(f"{site.relay_ip} {relay.host_key}\n")
    return subprocess.Popen(["ssh", "-F", "none", "-i", str(key), "-o", "IdentitiesOnly=yes",
                             "-o", f"UserKnownHostsFile={known}", "-o", "BatchMode=yes",
                             "-o", "StrictHostKeyChecking=yes", "-o", "ExitOnForwardFailure=yes",
                             *args, f"{USER}@{site.relay_ip}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _finish(proc: subprocess.Popen[bytes], timeout: float = 30) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, (out + err).decode(errors="replace")


def test_the_relay_refuses_all_but_the_nodes_own_port(
        site: NatSite, relay: Relay, master_factory: Callable[..., Master], engine: Dockerd,
        certs: TlsFiles, tmp_path: Path) -> None:
    """With OpenSSH's own client and the node's key: another port, a local forward, a
    dynamic forward, a command are refused; an unknown key is refused; and an agent whose
    pinned host key is not the relay's refuses to authenticate, with one ERROR naming
    tunnel_host_key, while its registrations go on."""
    master = master_factory(host=site.master_ip)
    other_host_key = keygen(tmp_path / "other_host_key", "not the relay")
    node = Node(site, tmp_path, BIN, relay, master, engine.unix_url, certs,
                tunnel_host_key=other_host_key)
    node.authorize()
    key = tmp_path / "state" / "tunnel" / "id_ed25519"
    node.start()
    try:
        # the agent with the wrong pin: one ERROR, registrations go on, status says why
        master.wait_for(3, timeout=30)
        down = wait("the tunnel's state", lambda: (t := node.tunnel()).get("error") and t)
        assert down["state"] == "down" and "tunnel_host_key" in down["error"]
        text, _ = node.status()
        assert "tunnel: down since" in text and "not the pinned tunnel_host_key" in text
        manageable = node.run("status", "--manageable", "-f", str(node.ini))
        assert manageable.returncode == 2, manageable.stdout  # registered, not manageable
        assert f"the tunnel to {USER}@{site.relay_ip}:22 is not up" in manageable.stdout

        # another port than its permitlisten
        code, out = _finish(_ssh(relay, site, key, tmp_path, "-N", "-R",
                                 f"{site.relay_ip}:{PORT + 1}:127.0.0.1:9"))
        assert code != 0 and "remote port forwarding failed" in out, out
        assert not relay.listens(PORT + 1)
        # its own port works with the same client (the refusals above are not a broken key)
        ok = _ssh(relay, site, key, tmp_path, "-N", "-R", f"{site.relay_ip}:{PORT}:127.0.0.1:9")
        try:
            wait("the node's own port", lambda: relay.listens(PORT, site.relay_ip))
        finally:
            os.killpg(ok.pid, signal.SIGTERM)
            _finish(ok)
        # a local forward and a dynamic one (SOCKS): the relay opens no connection, to
        # a listener on the master's segment that counts who connects
        target = socket.create_server((site.master_ip, 0))
        target.settimeout(0.2)
        for forward in (["-L", f"127.0.0.1:{PORT + 2}:{site.master_ip}:"
                               f"{target.getsockname()[1]}"],
                        ["-D", f"127.0.0.1:{PORT + 3}"]):
            fwd = _ssh(relay, site, key, tmp_path, "-N", *forward)
            try:
                local = PORT + 2 if forward[0] == "-L" else PORT + 3
                wait("the client's local listener",
                     lambda port=local: not refused("127.0.0.1", port, 1))
                curl = ["curl", "-s", "--max-time", "10", "-o", "/dev/null", "-w",
                        "%{http_code}"]
                if forward[0] == "-L":
                    curl.append(f"http://127.0.0.1:{local}/")
                else:
                    curl += ["--socks5", f"127.0.0.1:{local}",
                             f"http://{site.master_ip}:{target.getsockname()[1]}/"]
                got = subprocess.run(curl, capture_output=True, text=True, timeout=30)
                assert got.stdout in ("000", ""), got
            finally:
                os.killpg(fwd.pid, signal.SIGTERM)
                code, out = _finish(fwd)
            assert "administratively prohibited" in out, out
        try:
            peer = target.accept()[1]
        except TimeoutError:
            peer = None
        target.close()
        assert peer is None, f"the relay opened a connection for the node: {peer}"
        # a command: the forced one does nothing, and no TTY
        code, out = _finish(_ssh(relay, site, key, tmp_path, "-tt", "id"))
        assert "uid=" not in out and code != 0, out
        # an unknown key
        stranger = tmp_path / "stranger"
        keygen(stranger, "stranger")
        code, out = _finish(_ssh(relay, site, stranger, tmp_path, "-N", "-R",
                                 f"{site.relay_ip}:{PORT}:127.0.0.1:9"))
        assert code != 0 and "Permission denied" in out, out
    finally:
        err = node.stop()
    assert err.count("ERROR - tunnel:") == 1, err
    assert "tunnel_host_key" in err and relay.host_key.split()[1] not in err


# --- faults ----------------------------------------------------------------------------


def test_faults_unreachable_restarted_cut_and_reloaded(
        site: NatSite, relay: Relay, master_factory: Callable[..., Master], engine: Dockerd,
        certs: TlsFiles, tmp_path: Path) -> None:
    master = master_factory(host=site.master_ip)
    node = Node(site, tmp_path, BIN, relay, master, engine.unix_url, certs)
    node.authorize()
    relay.kill()
    node.start()
    try:
        # the relay unreachable at start: registrations go on, status says why
        master.wait_for(3, timeout=30)
        down = wait("the tunnel's state", lambda: (t := node.tunnel()).get("error") and t)
        assert down["state"] == "down" and "cannot reach the relay" in down["error"]
        assert "tunnel: down since" in node.status()[0]
        relay.start()
        wait("the tunnel after the relay started", lambda: through(site, certs))

        # sshd restarted (every process of it, as a reboot): back within 30 s
        relay.restart()
        wait("the tunnel after sshd restarted", lambda: through(site, certs), timeout=30)

        # the node's link cut: the relay frees the port on its own (ClientAlive), and
        # the tunnel is back once the link is
        site.cut()
        try:
            wait("the relay to free the dead node's port",
                 lambda: not relay.listens(PORT), timeout=30)
        finally:
            site.restore()
        wait("the tunnel after the link came back", lambda: through(site, certs), timeout=60)

        # SIGHUP with another port: the old one is given up, the new one is held
        node.authorize(PORT + 5)
        node.write(tunnel_listen=f"{site.relay_ip}:{PORT + 5}")
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        wait("the tunnel on the new port", lambda: through(site, certs, PORT + 5))
        assert not relay.listens(PORT)
        master.clear()
        assert master.wait_for(2, timeout=30)[-1].json["address"] == \
            f"https://{site.relay_ip}:{PORT + 5}"
    finally:
        err = node.stop()
    assert "tunnel: up again through" in err, err
    assert err.count("cannot reach the relay") == 1, err  # repeats are not logged again


def test_without_a_tunnel_none_of_it_is_loaded(tmp_path: Path,
                                               master_factory: Callable[..., Master]) -> None:
    """The agent's memory budget: with the gateway on and no tunnel, the SSH library and
    asyncio stay out of the running agent (its /proc/PID/maps: asyncio's C part is the
    one shared object they bring; the tunnel case above checks that it shows there)."""
    from agentproc import NO_DOCKER, popen
    from support.gateway import free_port

    master = master_factory()
    proc = popen(["-d", NO_DOCKER, "-m", master.address, "-t", "1", "--gateway",
                  f"127.0.0.1:{free_port()}"], tmp_path,
                 {"DM_AGENT_GATEWAY_PASSWORD_HASH": HASH,
                  "STATE_DIRECTORY": str(tmp_path / "state")})
    try:
        master.wait_for(2)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
    finally:
        stop(proc)
    assert "/_ssl." in maps and "/_asyncio." not in maps
