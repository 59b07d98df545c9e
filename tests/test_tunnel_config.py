"""The tunnel's settings and its key as the real program reads them (docs/design.md §8):
what --check-config refuses with exit 78 and naming which key, what the node announces,
``dm-agent tunnel-key``; and the parts that need no relay (the converters, the backoff)."""

from __future__ import annotations

import json
import random
import signal
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest
from agentproc import NO_DOCKER, popen, run, stop
from support.gateway import free_port
from support.master import Master

from dm_agent.config import relay as spec
from dm_agent.tunnel import service

HASH = bcrypt.hashpw(b"s3cret-for-the-master", bcrypt.gensalt(4)).decode()
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHt3Q2kM7ImeG06M6zGz1iUvXjyhoXabAhNq4Z5SOX3J"
RSA_BLOB = "AAAAB3NzaC1yc2EAAAADAQABAAAAAQE="  # an ssh-rsa blob (not an ed25519 one)


def write_ini(home: Path, **keys: str) -> Path:
    base = {"master": "10.0.0.3:8761", "docker": NO_DOCKER, "gateway": "0.0.0.0:8771",
            "gateway_password_hash": HASH, "tunnel": "relay@203.0.113.7",
            "tunnel_listen": "203.0.113.7:20011", "tunnel_host_key": HOST_KEY}
    base.update(keys)
    path = home / "dm-agent.ini"
    path.write_text("[main]\n" + "".join(f"{k} = {v}\n" for k, v in base.items() if v))
    return path


def check(home: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = run(["--check-config", "-f", str(home / "dm-agent.ini")], home,
               {"STATE_DIRECTORY": str(home / "state"), **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


# --- the converters ------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("relay@203.0.113.7", "relay@203.0.113.7:22"),
    ("relay@Relay.Example.com:2222", "relay@relay.example.com:2222"),
    ("relay@[2001:db8::7]:2200", "relay@[2001:db8::7]:2200"),
    ("relay@2001:db8::7", "relay@[2001:db8::7]:22"),
])
def test_tunnel_is_normalised_with_its_port(text: str, value: str) -> None:
    assert spec.parse_tunnel(text) == value


@pytest.mark.parametrize("text, words", [
    ("203.0.113.7", "USER@RELAY"), ("@203.0.113.7", "USER@RELAY"),
    ("re lay@host", "user name"), ("relay@host:0", "port number"),
    ("relay@host:x", "port number"), ("relay@bad_host", "host name"),
])
def test_a_bad_tunnel_says_what_is_expected(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        spec.parse_tunnel(text)


@pytest.mark.parametrize("text", ["127.0.0.1:20011", "127.8.0.1:20011", "[::1]:20011",
                                  "localhost:20011", "0.0.0.0:20011", "[::]:20011",
                                  "203.0.113.7", "203.0.113.7:70000"])
def test_tunnel_listen_refuses_loopback_wildcards_and_no_port(text: str) -> None:
    with pytest.raises(ValueError):
        spec.parse_tunnel_listen(text)


def test_tunnel_listen_takes_an_address_or_a_name() -> None:
    assert spec.parse_tunnel_listen(" 203.0.113.7:20011 ") == "203.0.113.7:20011"
    assert spec.parse_tunnel_listen("[2001:db8::7]:20011") == "[2001:db8::7]:20011"
    assert spec.parse_tunnel_listen("relay.example.com:20011") == "relay.example.com:20011"


def test_the_host_key_is_checked_inside_and_may_come_from_a_file(tmp_path: Path) -> None:
    assert spec.parse_host_key(HOST_KEY + " root@relay") == HOST_KEY
    assert spec.parse_host_key("relay.example.com,203.0.113.7 " + HOST_KEY) == HOST_KEY
    key_file = tmp_path / "relay.pub"
    key_file.write_text("# the relay\n" + HOST_KEY + " root@relay\n")
    assert spec.parse_host_key(str(key_file)) == HOST_KEY
    with pytest.raises(ValueError, match="not a ssh-ed25519 key"):
        spec.parse_host_key("ssh-ed25519 " + RSA_BLOB)
    with pytest.raises(ValueError, match="base64"):
        spec.parse_host_key("ssh-ed25519 AAAA!!!")
    with pytest.raises(ValueError, match="unknown host key type"):
        spec.parse_host_key("ssh-dss " + RSA_BLOB)
    with pytest.raises(ValueError, match="cannot read"):
        spec.parse_host_key(str(tmp_path / "missing.pub"))
    fingerprint = spec.decode_host_key(HOST_KEY).fingerprint
    keygen = subprocess.run(["ssh-keygen", "-lf", str(key_file)], capture_output=True,
                            text=True, check=True).stdout
    assert fingerprint in keygen  # as ssh-keygen -l shows it


def test_the_backoff_is_jittered_below_a_bound_that_doubles_to_its_cap() -> None:
    rand = random.Random(7).uniform
    firsts = [service.backoff(0, False, rand) for _ in range(200)]
    assert max(firsts) <= service.BACKOFF_FIRST and min(firsts) >= 0.2
    assert max(firsts) - min(firsts) > 1.0  # spread: a fleet does not come back at once
    late = [service.backoff(30, False, rand) for _ in range(200)]
    assert max(late) <= service.BACKOFF_CAP and max(late) > service.BACKOFF_CAP / 2
    assert max(service.backoff(30, True, rand) for _ in range(200)) <= \
        service.BACKOFF_CAP_PERMANENT


def test_the_forward_goes_to_the_gateways_own_address() -> None:
    assert service.forward_target("0.0.0.0:8771") == ("127.0.0.1", 8771)
    assert service.forward_target("[::]:8771") == ("::1", 8771)
    assert service.forward_target("10.0.0.11:8771") == ("10.0.0.11", 8771)


# --- the real program ----------------------------------------------------------------


def test_check_config_shows_the_tunnel_and_the_node_announces_the_relays_port(
        tmp_path: Path) -> None:
    write_ini(tmp_path, address="10.0.0.11")
    code, out, err = check(tmp_path)
    assert code == 0, err
    assert "tunnel = relay@203.0.113.7:22" in out and "tunnel_listen = 203.0.113.7:20011" in out
    assert f"tunnel_host_key = {HOST_KEY}" in out
    assert "tunnel_key =  ; default: an ed25519 key made in the state directory" in out
    proc = run(["--once", "--dry-run", "-f", str(tmp_path / "dm-agent.ini")], tmp_path,
               {"STATE_DIRECTORY": str(tmp_path / "state")})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["address"] == "https://203.0.113.7:20011"
    assert not (tmp_path / "state" / "tunnel").exists()  # a check makes no key


@pytest.mark.parametrize("keys, key, words", [
    ({"tunnel_listen": "127.0.0.1:20011"}, "tunnel_listen", "loopback"),
    ({"tunnel_listen": ""}, "tunnel", "needs tunnel_listen"),
    ({"tunnel_host_key": ""}, "tunnel", "needs tunnel_host_key"),
    ({"tunnel_host_key": "ssh-ed25519 " + RSA_BLOB}, "tunnel_host_key", "not a ssh-ed25519"),
    ({"gateway": ""}, "tunnel", "the gateway, which is off"),
    ({"gateway_password_hash": "", "gateway_optional": "yes"}, "tunnel", "which is off"),
    ({"tunnel": ""}, "tunnel_listen", "tunnel is not"),
    ({"tunnel": "relay"}, "tunnel", "USER@RELAY"),
])
def test_check_config_refuses_naming_the_key(tmp_path: Path, keys: dict[str, str], key: str,
                                             words: str) -> None:
    ini = write_ini(tmp_path, **keys)
    code, _, err = check(tmp_path)
    assert code == 78, err
    assert f"{ini} [main] {key}" in err and words in err, err


def test_the_environment_sets_the_tunnel(tmp_path: Path) -> None:
    write_ini(tmp_path, tunnel="", tunnel_listen="", tunnel_host_key="")
    code, out, err = check(tmp_path, {"DM_AGENT_TUNNEL": "relay@203.0.113.8:2222",
                                      "DM_AGENT_TUNNEL_LISTEN": "203.0.113.8:20012",
                                      "DM_AGENT_TUNNEL_HOST_KEY": HOST_KEY})
    assert code == 0, err
    assert "tunnel = relay@203.0.113.8:2222  ; environment DM_AGENT_TUNNEL" in out


def test_a_key_with_a_passphrase_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "node_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "a passphrase", "-f",
                    str(key)], check=True, capture_output=True)
    ini = write_ini(tmp_path, tunnel_key=str(key))
    code, _, err = check(tmp_path)
    assert code == 78 and f"{ini} [main] tunnel_key" in err and "passphrase" in err, err
    assert "PRIVATE" not in err


def test_tunnel_key_makes_the_key_once_and_prints_the_relays_line(tmp_path: Path) -> None:
    ini = write_ini(tmp_path)
    env = {"STATE_DIRECTORY": str(tmp_path / "state")}
    proc = run(["tunnel-key", "-f", str(ini), "--name", "node-11"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    key = tmp_path / "state" / "tunnel" / "id_ed25519"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    public = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert proc.stdout.splitlines() == [
        f"# this node's key for the relay: {key} (made now)", public,
        "# its line in the relay's authorized_keys (of relay):",
        f'restrict,port-forwarding,permitlisten="203.0.113.7:20011" {public} node-11']
    again = json.loads(run(["tunnel-key", "--json", "-f", str(ini)], tmp_path, env).stdout)
    assert again["public"] == public and again["created"] is False
    assert "PRIVATE" not in proc.stdout + proc.stderr


def test_tunnel_key_shows_a_configured_key(tmp_path: Path) -> None:
    key = tmp_path / "node_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(key)], check=True,
                   capture_output=True)
    ini = write_ini(tmp_path, tunnel_key=str(key))
    data = json.loads(run(["tunnel-key", "--json", "-f", str(ini)], tmp_path).stdout)
    assert data["public"] == " ".join(Path(f"{key}.pub").read_text().split()[:2])
    assert data["key"] == str(key) and data["created"] is False
    bad = write_ini(tmp_path, tunnel_key=str(ini))
    proc = run(["tunnel-key", "-f", str(bad)], tmp_path)
    assert proc.returncode == 78 and "tunnel_key" in proc.stderr, proc.stderr


def test_a_reload_or_a_stop_gives_up_a_login_that_hangs(
        tmp_path: Path, master_factory: Callable[..., Master]) -> None:
    """A relay that accepts and then says nothing holds the login until asyncssh's
    timeouts (15 s, 20 s): a SIGHUP that changes the tunnel closes that attempt at once
    (no second tunnel left running beside the new one), and so does a stop."""
    master = master_factory()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    silent.settimeout(20)
    port = silent.getsockname()[1]
    ini = write_ini(tmp_path, master=master.address, tunnel=f"relay@127.0.0.1:{port}",
                    gateway=f"127.0.0.1:{free_port()}", timeout="1")
    proc = popen(["-f", str(ini)], tmp_path, {"STATE_DIRECTORY": str(tmp_path / "state")})
    try:
        first, _ = silent.accept()
        master.wait_for(1)
        write_ini(tmp_path, master=master.address, tunnel=f"other@127.0.0.1:{port}",
                  gateway=ini.read_text().split("gateway = ")[1].split()[0], timeout="1")
        proc.send_signal(signal.SIGHUP)
        first.settimeout(10)  # far below the login's own timeouts
        assert first.recv(4096).startswith(b"SSH-2.0-")  # the client's banner, then
        while first.recv(4096):  # nothing but its end
            pass
        second, _ = silent.accept()  # the new settings' attempt
        master.wait_for(len(master.requests) + 1)
    finally:
        err = stop(proc)
    second.settimeout(10)
    assert second.recv(4096).startswith(b"SSH-2.0-")
    while second.recv(4096):
        pass
    assert "Traceback" not in err, err
    first.close()
    second.close()
    silent.close()
