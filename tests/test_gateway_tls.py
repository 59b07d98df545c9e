"""The gateway's certificates (dm_agent.gateway.tls): the one it issues itself, and the
checks of configured files, with real keys and real handshakes."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from test_gateway_config import make_cert

from dm_agent.gateway import tls


def test_the_self_issued_certificate_names_the_node_and_keeps_its_key_private(
        tmp_path: Path) -> None:
    directory = tmp_path / "state" / "gateway"
    cert, key, info = tls.issue_self_signed(str(directory), "node7", ["10.0.0.11", "node7.lan"])
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert set(info.names) == {"node7", "node7.lan", "10.0.0.11"}
    parsed = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    assert parsed.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    days = (parsed.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).days
    assert 390 <= days <= 398
    assert tls.load_pair(cert, key).fingerprint == info.fingerprint
    assert info.fingerprint.startswith("SHA256:") and len(info.fingerprint) == 7 + 32 * 3 - 1


def test_it_is_reused_while_it_serves_and_issued_again_when_not(tmp_path: Path) -> None:
    d = str(tmp_path)
    _, _, first = tls.issue_self_signed(d, "node7", ["10.0.0.11"])
    assert tls.issue_self_signed(d, "node7", ["10.0.0.11"])[2] == first
    assert tls.issue_self_signed(d, "node7", [])[2] == first  # a subset is covered
    moved = tls.issue_self_signed(d, "node7", ["10.0.0.12"])[2]  # the address changed
    assert moved.fingerprint != first.fingerprint and "10.0.0.12" in moved.names
    # near its end (a month left), it is renewed
    cert, key = make_cert(tmp_path, days=20, name="node7")
    os.replace(cert, tmp_path / tls.CERT_NAME)
    os.replace(key, tmp_path / tls.KEY_NAME)
    renewed = tls.issue_self_signed(d, "node7", [])[2]
    assert renewed.not_after - datetime.datetime.now().timestamp() > 300 * 86400


def test_configured_files_that_cannot_serve_are_refused_by_name(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    _, other_key = make_cert(tmp_path, name="other")
    old_cert, old_key = make_cert(tmp_path, expired=True, name="old")
    with pytest.raises(ValueError, match=f"the key {other_key} does not match"):
        tls.load_pair(str(cert), str(other_key))
    with pytest.raises(ValueError, match="expired on"):
        tls.load_pair(str(old_cert), str(old_key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="holds no PEM certificate"):
        tls.load_pair(str(garbage), str(key))
    with pytest.raises(ValueError, match="not a PEM private key"):
        tls.load_pair(str(cert), str(cert))
    with pytest.raises(ValueError, match="cannot read the key"):
        tls.load_pair(str(cert), str(tmp_path / "missing.key"))
    assert tls.load_pair(str(cert), str(key)).names == ("node",)


def _serve_once(context: ssl.SSLContext) -> tuple[int, threading.Thread, list[object]]:
    server = socket.create_server(("127.0.0.1", 0))
    seen: list[object] = []

    def accept() -> None:
        conn, _ = server.accept()
        try:
            with context.wrap_socket(conn, server_side=True) as tls_conn:
                seen.append(tls_conn.getpeercert())
                tls_conn.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            seen.append(exc)
        server.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return server.getsockname()[1], thread, seen


def test_client_certificates_are_optional_beside_a_password_and_verified_when_shown(
        tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, name="gw")
    ca_cert, _ = make_cert(tmp_path, name="clientca")
    context = tls.server_context(str(cert), str(key), str(ca_cert), require_client_cert=False)
    assert context.verify_mode == ssl.CERT_OPTIONAL
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    port, thread, seen = _serve_once(context)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    with client.wrap_socket(socket.create_connection(("127.0.0.1", port))) as s:
        assert s.recv(2) == b"ok"
    thread.join(5)
    assert seen == [None]  # no certificate: in, the password decides
    strict = tls.server_context(str(cert), str(key), str(ca_cert), require_client_cert=True)
    assert strict.verify_mode == ssl.CERT_REQUIRED
    port, thread, seen = _serve_once(strict)
    with pytest.raises((ssl.SSLError, ConnectionResetError)), \
            client.wrap_socket(socket.create_connection(("127.0.0.1", port))) as s:
        if not s.recv(2):
            raise ConnectionResetError("refused")
    thread.join(5)
    assert isinstance(seen[0], ssl.SSLError)
