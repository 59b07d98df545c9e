"""The gateway: this node's Docker API, served to the master over TLS with authentication
(docs/design.md §6).

``service.Gateway`` is the service the runner adds: when ``gateway`` is set it builds the TLS
context (the configured certificate, or one it issues itself and keeps in the state
directory), the authenticator and the connection to Docker from the settings, listens,
and follows reloads. ``check`` refuses, where the settings are loaded, what it could not
serve with. The parts, each in its own module:

- ``service``: the service (start, reload, stop, status) built from the settings;
- ``edge``: strict HTTP/1.1 from clients (h11), header filtering, error answers;
- ``auth``: Basic ``admin`` + bcrypt with a keyed cache, mutual TLS, failure rate limit;
- ``tls``: the server context, certificate checks, the self-issued certificate;
- ``upstream``: connections to Docker (unix socket, TCP, TLS);
- ``relay``: one client connection: requests, streams, uploads, hijack, half-close;
- ``server``: the listener, its accept thread and connection cap.

Registrations never wait for it: it runs in its own threads, and whatever it raises is
its own.
"""

from __future__ import annotations

from ..config.settings import Settings
from ..errors import ConfigError


def check(settings: Settings) -> None:
    """Refuse what the gateway could not serve with (docs/design.md §6): the hash of the
    published default password, a certificate and key that do not load, match or are
    expired. Raises ConfigError naming where the value came from and the key, so a start,
    a reload and ``--check-config`` refuse alike. (That the gateway has a way to
    authenticate, and a certificate goes with its key, is the settings' own rule.)

    Its modules (bcrypt, cryptography) are imported only when the gateway is on."""
    if not settings.gateway:
        return
    from . import auth, tls

    sources = settings.sources
    if settings.gateway_password_hash:
        try:
            auth.check_hash(settings.gateway_password_hash)
        except ValueError as exc:
            raise ConfigError(f"{sources['gateway_password_hash']}: invalid "
                              f"gateway_password_hash: {exc}") from None
    if settings.gateway_cert and settings.gateway_key:
        try:
            tls.load_pair(settings.gateway_cert, settings.gateway_key)
        except ValueError as exc:
            raise ConfigError(f"{sources['gateway_cert']}: invalid gateway_cert/gateway_key: "
                              f"{exc}") from None
