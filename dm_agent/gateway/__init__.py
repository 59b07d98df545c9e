"""The gateway: this node's Docker API, served to the master over TLS with authentication
(docs/design.md §6).

``service.Gateway`` is the service the runner adds: when ``gateway`` is set it builds the TLS
context (the configured certificate, or one it issues itself and keeps in the state
directory), the authenticator and the connection to Docker from the settings, listens,
and follows reloads. The parts, each in its own module:

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
