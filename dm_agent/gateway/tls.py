"""The gateway's TLS (docs/design.md §6): the server context, the checks of configured
certificate files, and the certificate the agent issues itself when none is configured.

TLS 1.2 and later, AEAD ciphers only. The self-issued certificate is for trying the
gateway out: its key is made on the node and never leaves it, and no CA key exists at
all (a fleet's node certificates come from a CA the master trusts, docs/gateway-ca.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: TLS 1.2's AEAD suites with forward secrecy; TLS 1.3's are all AEAD.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
#: A self-issued certificate is valid this long, and renewed this long before it ends.
VALIDITY = datetime.timedelta(days=398)
RENEW_BEFORE = datetime.timedelta(days=30)
CERT_NAME, KEY_NAME = "gateway.crt", "gateway.key"


class CertInfo(NamedTuple):
    fingerprint: str
    not_after: float
    subject: str
    names: tuple[str, ...]


def _info(cert: x509.Certificate) -> CertInfo:
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(str(n) for n in san.get_values_for_type(x509.DNSName)) + tuple(
            str(n) for n in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        names = ()
    return CertInfo("SHA256:" + ":".join(digest[i:i + 2] for i in range(0, len(digest), 2)),
                    cert.not_valid_after_utc.timestamp(), cert.subject.rfc4514_string(), names)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(1 << 20)
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from None


def load_pair(cert: str, key: str) -> CertInfo:
    """Check that ``cert`` and ``key`` can serve now; ValueError naming the file and why."""
    cert_pem, key_pem = _read(cert, "certificate"), _read(key, "key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ValueError(f"{cert} holds no PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        reason = "it is encrypted" if isinstance(exc, TypeError) else "not a PEM private key"
        raise ValueError(f"cannot use the key {key}: {reason}") from None
    leaf = chain[0]
    public = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    mine = private.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    if public != mine:
        raise ValueError(f"the key {key} does not match the certificate {cert}")
    now = datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc <= now:
        raise ValueError(f"the certificate {cert} expired on "
                         f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if leaf.not_valid_before_utc > now:
        raise ValueError(f"the certificate {cert} is not valid before "
                         f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    return _info(leaf)


def _san(hostname: str, addresses: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys([hostname, *addresses]):
        if not name:
            continue
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _reusable(cert_path: str, key_path: str, names: list[x509.GeneralName]) -> CertInfo | None:
    try:
        info = load_pair(cert_path, key_path)
    except ValueError:
        return None
    left = datetime.datetime.fromtimestamp(info.not_after, datetime.timezone.utc) \
        - datetime.datetime.now(datetime.timezone.utc)
    wanted = {str(n.value) for n in names}
    return info if left > RENEW_BEFORE and wanted <= set(info.names) else None


def _write(path: str, data: bytes, mode: int) -> None:
    """Atomically: a new file beside it, then a rename; never a moment of wrong mode."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".new-")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def issue_self_signed(directory: str, hostname: str,
                      addresses: Sequence[str]) -> tuple[str, str, CertInfo]:
    """The certificate in ``directory``, issued now unless the one there still serves
    (valid for more than RENEW_BEFORE, naming ``hostname`` and ``addresses``)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert_path, key_path = os.path.join(directory, CERT_NAME), os.path.join(directory, KEY_NAME)
    names = _san(hostname, addresses)
    info = _reusable(cert_path, key_path, names)
    if info is not None:
        return cert_path, key_path, info
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname or "dm-agent"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dm-agent (self-issued)")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path, _info(cert)


def server_context(cert: str, key: str, client_ca: str | None, *,
                   require_client_cert: bool) -> ssl.SSLContext:
    """The gateway's TLS: 1.2 or later, AEAD only, no compression or renegotiation; with
    ``client_ca``, client certificates are verified against it (required, or optional
    when a password may stand in for one)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
                        | ssl.OP_CIPHER_SERVER_PREFERENCE)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context
