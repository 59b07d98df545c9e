"""The gateway's settings as the real program reads them (docs/design.md §6): what it
refuses with exit 78 and where, what it announces, and that the hash never shows."""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import bcrypt
import pytest
from agentproc import NO_DOCKER, popen, run, stop, wait_listening
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# cost 4: the tests make many hashes; the agent checks any cost from 04 to 31
GOOD = bcrypt.hashpw(b"s3cret-for-the-master", bcrypt.gensalt(4)).decode()
DEFAULT = bcrypt.hashpw(b"password", bcrypt.gensalt(4)).decode()


def write_ini(home: Path, **keys: str) -> Path:
    path = home / "dm-agent.ini"
    path.write_text("[main]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    return path


def make_cert(directory: Path, *, days: int = 30, expired: bool = False,
              name: str = "node") -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)) \
        if expired else (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def check(home: Path, env: dict[str, str] | None = None, *args: str) -> tuple[int, str, str]:
    proc = run(["--check-config", "-f", str(home / "dm-agent.ini"), *args], home, env)
    return proc.returncode, proc.stdout, proc.stderr


def test_a_gateway_without_authentication_is_refused_naming_the_key(tmp_path: Path) -> None:
    ini = write_ini(tmp_path, master="10.0.0.3:8761", gateway="0.0.0.0:8771")
    code, _out, err = check(tmp_path)
    assert code == 78, err
    assert f"{ini} [main] gateway" in err
    assert "gateway_password_hash" in err and "gateway_client_ca" in err


def test_the_published_default_password_is_refused_and_no_hash_is_echoed(
        tmp_path: Path) -> None:
    write_ini(tmp_path, master="10.0.0.3:8761", gateway=":8771",
              gateway_password_hash=DEFAULT)
    code, out, err = check(tmp_path)
    assert code == 78
    assert "gateway_password_hash" in err and "password" in err
    assert DEFAULT not in out + err and DEFAULT[7:] not in out + err


@pytest.mark.parametrize("bad", ["$2b$12$short", "$1$md5crypt$abcdefgh", "plain-password",
                                 "$2x$12$" + "a" * 53])
def test_what_is_not_a_bcrypt_hash_is_refused_without_echo(tmp_path: Path, bad: str) -> None:
    write_ini(tmp_path, master="10.0.0.3:8761", gateway=":8771", gateway_password_hash=bad)
    code, out, err = check(tmp_path)
    assert code == 78
    assert "invalid gateway_password_hash" in err and "hash-password" in err
    assert bad not in out + err


def test_the_hash_is_masked_in_the_effective_settings(tmp_path: Path) -> None:
    write_ini(tmp_path, master="10.0.0.3:8761", gateway="0.0.0.0:8771",
              gateway_password_hash=GOOD, gateway_access="read-only")
    code, out, err = check(tmp_path)
    assert code == 0, err
    assert "gateway_password_hash = ********" in out
    assert "gateway = 0.0.0.0:8771" in out and "gateway_access = read-only" in out
    assert GOOD not in out + err and GOOD[7:29] not in out + err


def test_the_hash_comes_from_the_systemd_credential(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "gateway_password_hash").write_text(GOOD + "\n")
    write_ini(tmp_path, master="10.0.0.3:8761", gateway="0.0.0.0:8771")
    code, out, err = check(tmp_path, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert code == 0, err
    assert f"systemd credential {creds}/gateway_password_hash" in out
    (creds / "gateway_password_hash").write_text(DEFAULT)
    code, out, err = check(tmp_path, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert code == 78 and f"systemd credential {creds}/gateway_password_hash" in err


@pytest.mark.parametrize("mode", [["--once"], [], ["--daemon"]], ids=["once", "foreground",
                                                                    "daemon"])
def test_every_start_refuses_what_check_config_refuses(tmp_path: Path, mode: list[str]) -> None:
    """The gateway's own check (``gateway.check``) is made where the settings are loaded,
    the one path of every start: ``--once``, the foreground agent and ``--daemon`` exit
    78 with ``--check-config``'s message, before anything runs."""
    ini = write_ini(tmp_path, master="127.0.0.1:9", docker=NO_DOCKER, gateway="127.0.0.1:8771",
                    gateway_password_hash=DEFAULT)
    refused = check(tmp_path)
    assert refused[0] == 78
    proc = run([*mode, "-f", str(ini), "--pidfile", str(tmp_path / "run" / "a.pid")], tmp_path)
    assert (proc.returncode, proc.stderr) == (78, refused[2])
    assert f"{ini} [main] gateway_password_hash: invalid gateway_password_hash" in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before the daemon's pidfile


def test_a_reload_refuses_it_and_keeps_the_running_gateway(tmp_path: Path) -> None:
    """SIGHUP loads by the same path: the published default password's hash is refused
    with the file and the key named, and the running gateway goes on listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    keys = {"master": "127.0.0.1:9", "docker": NO_DOCKER, "gateway": f"127.0.0.1:{port}",
            "timeout": "60"}
    ini = write_ini(tmp_path, **keys, gateway_password_hash=GOOD)
    proc = popen(["-f", str(ini)], tmp_path, {"XDG_STATE_HOME": str(tmp_path / "state")})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")),
                              daemon=True)
    try:
        wait_listening(port, proc)
        reader.start()
        write_ini(tmp_path, **keys, gateway_password_hash=DEFAULT)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while not any("reload failed" in ln for ln in lines):
            assert time.monotonic() < deadline and proc.poll() is None, lines
            time.sleep(0.05)
        wait_listening(port, proc)
    finally:
        err = stop(proc)
    reader.join(5)
    [line] = [ln for ln in lines if "reload failed" in ln]
    assert f"keeping the running configuration: {ini} [main] gateway_password_hash: invalid " \
        "gateway_password_hash" in line, line
    assert DEFAULT not in "".join(lines) + err


def test_certificate_files_are_checked_at_start(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    _other_cert, other_key = make_cert(tmp_path, name="other")
    old_cert, old_key = make_cert(tmp_path, expired=True, name="old")
    base = {"master": "10.0.0.3:8761", "gateway": ":8771", "gateway_password_hash": GOOD}

    write_ini(tmp_path, **base, gateway_cert=str(cert))
    code, _, err = check(tmp_path)
    assert code == 78 and "gateway_cert and gateway_key go together" in err

    write_ini(tmp_path, **base, gateway_cert=str(cert), gateway_key=str(other_key))
    code, _, err = check(tmp_path)
    assert code == 78 and "gateway_cert" in err and "match" in err, err

    write_ini(tmp_path, **base, gateway_cert=str(old_cert), gateway_key=str(old_key))
    code, _, err = check(tmp_path)
    assert code == 78 and "expired" in err, err

    write_ini(tmp_path, **base, gateway_cert=str(tmp_path / "missing.crt"),
              gateway_key=str(key))
    code, _, err = check(tmp_path)
    assert code == 78 and "gateway_cert" in err and "does not exist" in err

    write_ini(tmp_path, **base, gateway_cert=str(cert), gateway_key=str(key))
    code, _, err = check(tmp_path)
    assert code == 0, err
    for path in (key, other_key, old_key):
        body = path.read_text().splitlines()[1]
        assert body not in err


def test_an_optional_gateway_without_credentials_stays_off_and_says_so(
        tmp_path: Path) -> None:
    write_ini(tmp_path, master="10.0.0.3:8761", gateway="0.0.0.0:8771",
              gateway_optional="yes")
    code, _out, err = check(tmp_path)
    assert code == 0, err
    assert "the master cannot manage this node's Docker: the gateway is off" in err


def test_a_unix_socket_without_gateway_is_a_node_the_master_cannot_manage(
        tmp_path: Path) -> None:
    write_ini(tmp_path, master="10.0.0.3:8761")
    code, _, err = check(tmp_path)
    assert code == 0
    assert "the master cannot manage this node's Docker: Docker is on a unix socket" in err
    assert "gateway = 0.0.0.0:8771" in err
    write_ini(tmp_path, master="10.0.0.3:8761", docker="tcp://10.0.0.4:2375")
    assert "cannot manage" not in check(tmp_path)[2]


def _announced(home: Path, **keys: str) -> str:
    write_ini(home, **{"docker": NO_DOCKER, "gateway_password_hash": GOOD, **keys})
    proc = run(["--once", "--dry-run", "-f", str(home / "dm-agent.ini")], home,
               {"XDG_STATE_HOME": str(home / "state")})
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout)["address"])


def test_with_the_gateway_the_address_is_its_https_url(tmp_path: Path) -> None:
    assert _announced(tmp_path, gateway="0.0.0.0:8771", address="10.9.8.7") \
        == "https://10.9.8.7:8771"
    assert _announced(tmp_path, gateway="0.0.0.0:8771", address="node7.example:9443") \
        == "https://node7.example:9443"
    assert _announced(tmp_path, gateway="0.0.0.0:8771",
                      address="https://gw.example:443") == "https://gw.example:443"
    assert _announced(tmp_path, gateway="192.0.2.10:8771") == "https://192.0.2.10:8771"
    routed = _announced(tmp_path, gateway="0.0.0.0:8771", master="10.0.0.3:8761")
    assert routed.startswith("https://") and routed.endswith(":8771")
    # Docker over TCP: the gateway's address still wins (the master keeps the first)
    assert _announced(tmp_path, gateway="0.0.0.0:8771", address="10.9.8.7",
                      docker="tcp://10.9.8.7:2375") == "https://10.9.8.7:8771"


def test_the_master_line_aliases_name_the_master_and_the_secret(tmp_path: Path) -> None:
    proc = run(["--check-config"], tmp_path,
               {"dm_agent_notifier_server": "10.0.0.3:8761",
                "dm_agent_notifier_secret": "node-secret-1"})
    assert proc.returncode == 0, proc.stderr
    assert "master = http://10.0.0.3:8761  ; environment dm_agent_notifier_server" in proc.stdout
    assert "secret = ********  ; environment dm_agent_notifier_secret" in proc.stdout
    assert "node-secret-1" not in proc.stdout + proc.stderr
    proc = run(["--check-config"], tmp_path,
               {"dm_agent_notifier_server": "10.0.0.3:8761", "DM_AGENT_MASTER": "10.0.0.9:1"})
    assert "master = http://10.0.0.9:1  ; environment DM_AGENT_MASTER" in proc.stdout
