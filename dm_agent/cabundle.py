"""The node's system CA store, trusted by both the reporter (an https master) and the
Docker collector (an https Engine) unless a CA file is configured."""

from __future__ import annotations

import os

# Where distributions keep the system CA store (the list Go's crypto/x509 reads, too).
SYSTEM_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # RHEL 7+
    "/etc/ssl/ca-bundle.pem",  # SUSE
    "/etc/ssl/cert.pem",  # Alpine
)


def system_ca_bundle() -> str | bool:
    """The system CA store as a file; True (the bundled certifi store) if none is found.

    requests would otherwise use its bundled store, and a frozen program's OpenSSL has
    its own build-time default paths, neither of which is what the node's admin manages.
    """
    for path in SYSTEM_CA_FILES:
        if os.path.isfile(path):
            return path
    return True
