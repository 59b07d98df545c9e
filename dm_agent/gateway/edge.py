"""Strict HTTP/1.1 at the gateway's edge (docs/design.md §6).

h11 parses every byte a client sends; this module adds what h11 lets through and a
gateway in front of root must not: a request with both ``Content-Length`` and
``Transfer-Encoding``, two ``Content-Length`` headers (h11 merges equal ones), a transfer
coding other than ``chunked`` (h11's 501) — each a request-smuggling shape, answered 400
with the connection closed. It also decides which headers go on (hop-by-hop ones and
``Authorization`` never do) and writes the gateway's own answers in Docker's error shape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

#: All request headers together may be this large (``X-Registry-Config`` is big).
MAX_HEAD = 1 << 20

#: Never forwarded, either way (RFC 9110 §7.6.1), plus the client's credentials.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"expect",
})
NEVER_UPSTREAM = frozenset({b"authorization"})

#: Docker's answers that turn the connection into a raw stream (attach, exec start).
RAW_STREAM_TYPES = (b"application/vnd.docker.raw-stream",
                    b"application/vnd.docker.multiplexed-stream")

Headers = Sequence[tuple[bytes, bytes]]


class BadRequest(Exception):
    """The request is refused with ``status``; the connection is closed after it."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def head_end(buf: bytes | bytearray) -> int:
    """Where the request head at the start of ``buf`` ends (after its blank line), or -1.
    h11 takes a bare LF for CRLF, and so must every check of the same bytes."""
    crlf, lf = buf.find(b"\r\n\r\n"), buf.find(b"\n\n")
    ends = [i + n for i, n in ((crlf, 4), (lf, 2)) if i >= 0]
    return min(ends) if ends else -1


def check_head(head: bytes) -> None:
    """Refuse the smuggling shapes in a request head (the bytes up to its blank line)."""
    lengths = encodings = 0
    for line in head.rstrip(b"\r\n").split(b"\n")[1:]:
        if line[:1] in (b" ", b"\t"):  # h11 would join it to the line before
            raise BadRequest("a folded header line (obsolete line folding)")
        name = line.partition(b":")[0].strip().lower()
        if name == b"content-length":
            lengths += 1
        elif name == b"transfer-encoding":
            encodings += 1
    if lengths > 1:
        raise BadRequest("more than one Content-Length header")
    if lengths and encodings:
        raise BadRequest("both Content-Length and Transfer-Encoding: ambiguous framing")
    if encodings > 1:
        raise BadRequest("more than one Transfer-Encoding header")


def header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def tokens(value: bytes | None) -> set[bytes]:
    return {t.strip().lower() for t in (value or b"").split(b",") if t.strip()}


def has_body(headers: Headers) -> bool:
    """Whether a request carries a body (h11 frames a GET as an empty one)."""
    length = header(headers, b"content-length")
    return header(headers, b"transfer-encoding") is not None or (
        length is not None and length.strip() not in (b"0", b""))


def wants_upgrade(headers: Headers) -> bytes | None:
    """The protocol a request asks to switch to (``tcp`` for attach and exec, ``h2c``,
    ``websocket``), or None."""
    upgrade = header(headers, b"upgrade")
    if upgrade and b"upgrade" in tokens(header(headers, b"connection")):
        return upgrade
    return None


def forward_headers(headers: Headers, *, upstream: bool) -> list[tuple[bytes, bytes]]:
    """The headers that go on: without hop-by-hop ones, those the ``Connection`` header
    names, and (towards Docker) the client's ``Authorization``."""
    named = tokens(header(headers, b"connection"))
    drop = HOP_BY_HOP | named | (NEVER_UPSTREAM if upstream else frozenset())
    return [(k, v) for k, v in headers if k not in drop]


def is_raw_stream(status: int, headers: Headers) -> bool:
    """Docker's older hijack answer: 200 with a raw stream type and no framing, after
    which the connection carries stdin one way and the output the other."""
    content_type = (header(headers, b"content-type") or b"").split(b";")[0].strip().lower()
    return (status == 200 and content_type in RAW_STREAM_TYPES
            and header(headers, b"content-length") is None
            and header(headers, b"transfer-encoding") is None)


REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           408: "Request Timeout", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


def error_body(message: str) -> bytes:
    """Docker's own error shape, so the docker CLI and the master show the message."""
    return json.dumps({"message": message}).encode() + b"\n"


def error_headers(body: bytes, extra: Iterable[tuple[str, str]] = (),
                  close: bool = False) -> list[tuple[str, str]]:
    out = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    out += list(extra)
    if close:
        out.append(("Connection", "close"))
    return out


def raw_response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """A response head written as it is, for an answer after which h11 no longer frames
    the connection (a switch of protocol, Docker's raw stream)."""
    lines = [b"HTTP/1.1 %d %s" % (status, reason or b"")]
    lines += [k + b": " + v for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


_VERSIONED = re.compile(rb"^/v[0-9.]+(/.*)$")


def api_path(target: bytes) -> bytes:
    """The target's path without its query and its ``/vX.Y`` prefix: ``/containers/json``."""
    path = target.split(b"?", 1)[0]
    match = _VERSIONED.match(path)
    return match.group(1) if match else path
