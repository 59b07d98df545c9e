"""A strict stand-in for the master's node-registration endpoint (docs/design.md §1).

``Master`` is a threaded HTTP server on 127.0.0.1 (port 0, or a port of your choice) that
records every request and validates it against the contract: method, path, query,
headers and the ``NodeAgentData`` body.  What it answers is a *mode*, changeable at run
time (``set_mode``) or scripted for the next requests (``script``):

``ok``            200 — or, like the real master, 401 when a secret is configured and
                  ``X-Auth-Node`` is missing or wrong; 404/405 for a wrong path/method;
                  500 when the body or the node name is refused (the master's catch-all
                  error handler answers a parse error so), 400 for the rest of what the
                  contract forbids (query, headers), listing the problems (``reject_invalid``)
``unauthorized``  401 with a text body saying the node secret is wrong
``error500``      500 with a short text body
``html502``       502 with a ~5 KB HTML page (what a proxy in front of a dead master says)
``drop``          read the request, then close the connection without a byte of answer
``hang``          read the request and never answer (until ``stop()``)
``dribble``       200 with its status line and headers at once, then the body one byte
                  every 0.5 s, until the client goes away (``RecordedRequest.ended``)
``refuse``        stop listening: connections are refused; ``resume()`` listens again on
                  the same port

``generation`` is the master's: ``v1`` reads the body into ``NodeAgentData`` (``time`` a
``LocalDateTime``: no offset, or a ``Z`` that is dropped; ``+hh:mm`` refused), ``v2`` into
``NotifierData`` (``time`` a ``ZonedDateTime``: an offset or an epoch number; ``id``,
``labels`` and ``containers`` unknown and ignored; a null ``address`` or ``system.net``
entry fails). Both read the node name with Guava's ``InternetDomainName`` (``name_problem``).

Validation problems go to ``RecordedRequest.errors``; things a lenient Jackson accepts but
that are not what the contract says (an integer ``cpuLoad``...) go to ``notes``.
``validate_payload`` is usable on its own (e.g. on ``--dry-run`` output).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import re
import select
import socket
import ssl
import tempfile
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "GENERATIONS",
    "MODES",
    "UNAUTHORIZED_BODY",
    "BodyGate",
    "Master",
    "MasterTimeout",
    "RecordedRequest",
    "name_problem",
    "parse_json_strict",
    "summarize",
    "validate_payload",
    "validate_time",
]

MODES = ("ok", "unauthorized", "error500", "html502", "drop", "hang", "refuse", "dribble")
DRIBBLE_EVERY = 0.5
GENERATIONS = ("v1", "v2")

UNAUTHORIZED_BODY = (
    "Unauthorized: the node secret is wrong or missing "
    "(X-Auth-Node header does not match the master's node secret)."
)
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
_LOCAL_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?"
)  # java.time ISO_LOCAL_DATE_TIME
_OFFSET_RE = re.compile(r"(.*?)(Z|[+-]\d{2}:\d{2}(?::\d{2})?)")
_UA_RE = re.compile(r"dm-agent/([0-9A-Za-z][0-9A-Za-z.+_~-]*)")
# RFC 3986 pchar minus '/': unreserved, pct-encoded, sub-delims, ':' and '@'
_SEGMENT_RE = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})+")


def _html_502() -> bytes:
    filler = "".join(
        f"<!-- a padding comment, as proxies' error pages have: line {i:03d} -->\n"
        for i in range(70)
    )
    page = (
        "<!DOCTYPE html>\n<html>\n<head><title>502 Bad Gateway</title></head>\n"
        "<body>\n<center><h1>502 Bad Gateway</h1></center>\n"
        "<hr><center>nginx/1.22.1</center>\n" + filler + "</body>\n</html>\n"
    )
    return page.encode()


HTML_502 = _html_502()


@dataclass
class BodyGate:
    """Holds the master's read of the next large body: the first ``after`` bytes are read,
    ``reached`` is set, and the rest is read only once ``release`` is set, so a test can
    act while the client is in the middle of sending (once: the gate then stays open)."""

    after: int = 64 * 1024
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class MasterTimeout(AssertionError):
    """wait_for() did not see the requests in time."""


@dataclass
class RecordedRequest:
    """One request as the master saw it."""

    method: str
    path: str  # percent-decoded path, without the query
    raw_path: str  # the request target exactly as sent (path and query)
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    json: Any
    node_name: str | None  # the decoded {name} segment
    time: float  # time.monotonic() when the request head had arrived
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mode: str = "ok"  # the mode it was answered in
    status: int | None = None  # the status sent; None: dropped, hung or not answered
    auth_ok: bool | None = None  # None when the master has no secret configured
    refused: bool = False  # the master itself would fail on it (body, node name): 500
    client: tuple[str, int] = ("", 0)
    #: time.monotonic() when the client closed a dribbled answer (``dribble`` mode)
    ended: float | None = None
    #: time.monotonic() when the answer had been written (None: not answered)
    answered: float | None = None

    @property
    def valid(self) -> bool:
        return not self.errors

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return None if value is None else str(value)

    @property
    def docker_url(self) -> str:
        """The URL the master manages this node's Docker through, from the registered
        ``address`` as ``DockerServiceImpl.createUri`` makes it (docs/design.md §1): an
        ``http(s)://`` URL as it is, ``host:port`` as ``http://host:port``, ``host`` as
        ``http://host:80``; a loopback host becomes the address the registration came
        from (``client``)."""
        address = str(self.json["address"])
        scheme, sep, rest = address.partition("://")
        if not sep:
            scheme, rest = "http", address
        hostport = rest.split("/", 1)[0]
        parsed = urllib.parse.urlsplit(f"//{hostport}")
        host = parsed.hostname or ""
        port = parsed.port or (443 if scheme == "https" else 80)
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if loopback:
            host = self.client[0]
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{shown}:{port}"


# --------------------------------------------------------------------------- validation


class _StrictJSONError(ValueError):
    pass


def _no_constants(name: str) -> Any:
    raise _StrictJSONError(f"{name} is not JSON")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _StrictJSONError(f"duplicate key {k!r} in an object")
        out[k] = v
    return out


def parse_json_strict(data: bytes | str) -> Any:
    """json.loads that refuses NaN/Infinity and duplicate keys (ValueError)."""
    if isinstance(data, bytes):
        data = data.decode("utf-8")  # UnicodeDecodeError is a ValueError
    return json.loads(data, parse_constant=_no_constants, object_pairs_hook=_pairs)


def validate_time(value: Any, generation: str = "v1") -> list[str]:
    """Errors for ``time`` as the generation's Jackson reads it (JSR-310 module).

    v1, ``LocalDateTime``: ISO_LOCAL_DATE_TIME, or the same with a trailing ``Z``, which
    it drops (the time is then read as the master's local time); an offset is refused.
    v2, ``ZonedDateTime``: ISO date-time with ``Z`` or ``±hh:mm``, or epoch seconds.
    """
    if generation not in GENERATIONS:
        raise ValueError(f"generation must be one of {GENERATIONS}")
    if generation == "v2" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return [] if math.isfinite(value) else [f"time: {value!r} is not a finite number"]
    if not isinstance(value, str):
        return [f"time: expected a string, got {type(value).__name__} {value!r}"]
    m_off = _OFFSET_RE.fullmatch(value)
    text, offset = (m_off.group(1), m_off.group(2)) if m_off else (value, "")
    m = _LOCAL_RE.fullmatch(text)
    if not m:
        return [f"time: {value!r} is not an ISO-8601 date-time (yyyy-MM-ddTHH:mm[:ss[.f]])"]
    y, mo, d, h, mi, sec = (int(g) if g else 0 for g in m.groups()[:6])
    try:
        datetime(y, mo, d, h, mi, sec)
    except ValueError as e:
        return [f"time: {value!r} is out of range: {e}"]
    if generation == "v1" and offset not in ("", "Z"):
        return [f"time: {value!r} has an offset; a v1 master reads a LocalDateTime "
                "(no offset, or a Z it drops)"]
    if generation == "v2" and not offset:
        return [f"time: {value!r} has no offset; a v2 master reads a ZonedDateTime "
                "(Z or +hh:mm)"]
    return []


def name_problem(name: str) -> str | None:
    """Why Guava's ``InternetDomainName.from`` refuses ``name`` (both generations read
    the node name with it), or None: letters, digits, ``-`` and ``_`` (non-ASCII passes
    unchecked), no ``-``/``_`` at either end of a label, labels of 1-63 characters, at
    most 127 labels and 253 characters, a trailing dot allowed, and a last label that
    does not start with a digit (so an IPv4 address is not a domain name)."""
    text = re.sub("[\u3002\uff0e\uff61]", ".", name)
    text = text[:-1] if text.endswith(".") else text
    parts = text.split(".")
    if len(text) > 253 or len(parts) > 127:
        return "too long"
    for i, part in enumerate(parts):
        ascii_ = "".join(c for c in part if ord(c) < 128)
        if not 1 <= len(part) <= 63:
            return f"label {part!r} is not 1-63 characters"
        if not re.fullmatch(r"[A-Za-z0-9_-]*", ascii_):
            return f"label {part!r} has a character other than letters, digits, - and _"
        if part[0] in "-_" or part[-1] in "-_":
            return f"label {part!r} starts or ends with - or _"
        if i == len(parts) - 1 and "0" <= part[0] <= "9":
            return f"last label {part!r} starts with a digit"
    return None


def _typename(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_long(where: str, v: Any, errors: list[str], *, minimum: int = 0) -> None:
    if not _is_int(v):
        errors.append(f"{where}: expected a JSON integer, got {_typename(v)} {v!r}")
    elif not _LONG_MIN <= v <= _LONG_MAX:
        errors.append(f"{where}: {v} does not fit a Java long")
    elif v < minimum:
        errors.append(f"{where}: {v} is negative")


def _check_str_map(where: str, v: Any, errors: list[str]) -> None:
    if not isinstance(v, dict):
        errors.append(f"{where}: expected an object of strings, got {_typename(v)}")
        return
    for k, val in v.items():
        if not isinstance(val, str):
            errors.append(f"{where}[{k!r}]: expected a string, got {_typename(val)} {val!r}")


def _need(obj: dict[str, Any], key: str, where: str, errors: list[str]) -> bool:
    if key not in obj:
        errors.append(f"{where}{key}: missing")
        return False
    return True


def validate_payload(payload: Any, *, generation: str = "v1") -> tuple[list[str], list[str]]:
    """Check a registration body against the generation's DTO; return (errors, notes).

    Stricter than Jackson where the contract is: ``long`` fields must be JSON integers
    (Jackson truncates a float silently) and every field the agent sends must be there."""
    errors: list[str] = []
    notes: list[str] = []
    if not isinstance(payload, dict):
        return [f"body: expected a JSON object, got {_typename(payload)}"], notes

    known = {"time", "id", "name", "address", "labels", "containers", "system"}
    extra = sorted(set(payload) - known)
    if extra:
        notes.append(f"body: extra fields (ignored by the master): {extra}")

    if _need(payload, "time", "", errors):
        errors += validate_time(payload["time"], generation)
    if generation == "v2":  # NotifierData has no id, labels or containers: ignored
        for key in ("name", "address"):
            if _need(payload, key, "", errors) and not isinstance(payload[key], str):
                errors.append(f"{key}: expected a string, got {_typename(payload[key])} "
                              "(a v2 master fails on a null address)")
        if _need(payload, "system", "", errors):
            if isinstance(payload["system"], dict):
                _validate_system(payload["system"], errors, notes)
            else:
                errors.append(f"system: expected an object, got {_typename(payload['system'])}")
        return errors, notes
    for key in ("id", "name", "address"):
        if _need(payload, key, "", errors):
            v = payload[key]
            if not isinstance(v, str):
                errors.append(f"{key}: expected a string, got {_typename(v)} {v!r}")
            elif not v:
                errors.append(f"{key}: empty")
    pid, pname = payload.get("id"), payload.get("name")
    if isinstance(pid, str) and isinstance(pname, str) and pid != pname:
        errors.append(f"id {payload['id']!r} != name {payload['name']!r}")

    if _need(payload, "labels", "", errors):
        _check_str_map("labels", payload["labels"], errors)

    if _need(payload, "containers", "", errors):
        containers = payload["containers"]
        if not isinstance(containers, list):
            errors.append(f"containers: expected a list, got {_typename(containers)}")
        else:
            for i, c in enumerate(containers):
                where = f"containers[{i}]"
                if not isinstance(c, dict):
                    errors.append(f"{where}: expected an object, got {_typename(c)}")
                    continue
                for key in ("id", "name", "image"):
                    if _need(c, key, f"{where}.", errors) and not isinstance(c[key], str):
                        errors.append(
                            f"{where}.{key}: expected a string, got {_typename(c[key])}"
                        )
                if isinstance(c.get("name"), str) and c["name"].startswith("/"):
                    errors.append(f"{where}.name: {c['name']!r} keeps Docker's leading '/'")
                if _need(c, "labels", f"{where}.", errors):
                    _check_str_map(f"{where}.labels", c["labels"], errors)

    if _need(payload, "system", "", errors):
        system = payload["system"]
        if not isinstance(system, dict):
            errors.append(f"system: expected an object, got {_typename(system)}")
        else:
            _validate_system(system, errors, notes)
    return errors, notes


def _validate_system(system: dict[str, Any], errors: list[str], notes: list[str]) -> None:
    if _need(system, "cpuLoad", "system.", errors):
        load = system["cpuLoad"]
        if isinstance(load, bool) or not isinstance(load, (int, float)):
            errors.append(f"system.cpuLoad: expected a JSON number, got {_typename(load)}")
        else:
            if _is_int(load):
                notes.append(
                    f"system.cpuLoad: integer {load}; Jackson accepts it for the DTO's "
                    "float, but the contract says a float"
                )
            if not math.isfinite(load) or not 0.0 <= load <= 100.0:
                errors.append(f"system.cpuLoad: {load} is outside 0.0..100.0")

    if _need(system, "memory", "system.", errors):
        mem = system["memory"]
        if not isinstance(mem, dict):
            errors.append(f"system.memory: expected an object, got {_typename(mem)}")
        else:
            for key in ("total", "available", "used"):
                if _need(mem, key, "system.memory.", errors):
                    _check_long(f"system.memory.{key}", mem[key], errors)
            if all(_is_int(mem.get(k)) for k in ("total", "used")) and mem["used"] > mem["total"]:
                notes.append("system.memory: used > total")

    for key, fields in (("disks", ("total", "used")), ("net", ("bytesIn", "bytesOut"))):
        if not _need(system, key, "system.", errors):
            continue
        table = system[key]
        if not isinstance(table, dict):
            errors.append(f"system.{key}: expected an object, got {_typename(table)}")
            continue
        for name, entry in table.items():
            where = f"system.{key}[{name!r}]"
            if key == "disks" and not name.startswith("/"):
                errors.append(f"{where}: a mount point must be an absolute path")
            if not isinstance(entry, dict):
                errors.append(f"{where}: expected an object, got {_typename(entry)}")
                continue
            for f in fields:
                if _need(entry, f, f"{where}.", errors):
                    _check_long(f"{where}.{f}", entry[f], errors)
            ints = all(_is_int(entry.get(f)) for f in fields)
            if key == "disks" and ints and entry["used"] > entry["total"]:
                notes.append(f"{where}: used > total")
        if key == "net" and "lo" in table:
            notes.append("system.net: 'lo' is reported")


# --------------------------------------------------------------------------- server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    master: Master

    def finish_request(self, request: Any, client_address: Any) -> None:
        ctx = self.master._ssl_context
        if ctx is not None:
            try:
                request.settimeout(10)
                request = ctx.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as e:
                self.master.tls_errors.append(str(e))
                with contextlib.suppress(OSError):
                    request.close()
                return
        self.master._track(request, True)
        try:
            super().finish_request(request, client_address)
        finally:
            self.master._track(request, False)
            if ctx is not None:  # the wrapped socket is ours to close
                with contextlib.suppress(OSError):
                    request.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that goes away mid-request is not the test's business


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "DockMasterTest/1.0"
    timeout = 30
    server: _Server
    _in_handle = False

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        if not self._in_handle:  # http.server refused the request line / headers itself
            line = getattr(self, "raw_requestline", b"")
            rec = RecordedRequest(
                method=getattr(self, "command", None) or "",
                path="",
                raw_path=getattr(self, "path", "") or "",
                query={},
                headers=getattr(self, "headers", None) or Message(),
                body=b"",
                json=None,
                node_name=None,
                time=time.monotonic(),
                errors=[f"malformed request ({code} {message}): {line!r}"],
                status=code,
                client=self.client_address,
            )
            self.server.master._record(rec)
        super().send_error(code, message, explain)

    def do_POST(self) -> None:
        self._handle()

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_POST

    def _read_body(self) -> tuple[bytes, list[str]]:
        errors: list[str] = []
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks: list[bytes] = []
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(16)
            return b"".join(chunks), errors
        length = self.headers.get("Content-Length")
        if length is None:
            if self.command == "POST":
                errors.append("Content-Length: missing (and the body is not chunked)")
            return b"", errors
        try:
            n = int(length)
        except ValueError:
            return b"", [f"Content-Length: {length!r} is not a number"]
        gate = self.server.master.body_gate
        body = b""
        if gate is not None and n > gate.after and not gate.reached.is_set():
            body = self.rfile.read(gate.after)
            gate.reached.set()
            gate.release.wait(30)
        body += self.rfile.read(n - len(body))
        if len(body) < n:  # what a real server sees when its client dies mid-request
            errors.append(f"body: truncated: the client closed after {len(body)} of the "
                          f"{n} bytes its Content-Length announced")
        return body, errors

    def _dribble(self, rec: RecordedRequest) -> None:
        """Headers at once, then a body byte every DRIBBLE_EVERY s until the client closes
        (the connection turns readable with EOF), which ``rec.ended`` records."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.flush()
        master = self.server.master
        with contextlib.suppress(OSError):
            while not master._stopping.is_set():
                readable, _, _ = select.select([self.connection], [], [], DRIBBLE_EVERY)
                if readable and not self.connection.recv(1024):
                    break
                self.connection.sendall(b" ")
        rec.ended = time.monotonic()

    def _handle(self) -> None:
        self._in_handle = True
        master = self.server.master
        arrived = time.monotonic()
        body, body_errors = self._read_body()
        rec = master._check(self, body, arrived, truncated=bool(body_errors))
        rec.errors[:0] = body_errors
        mode = master._next_mode()
        rec.mode = mode
        status, ctype, payload = master._answer(rec, mode)
        rec.status = status
        master._record(rec)
        if master.delay and mode not in ("drop", "hang"):
            master._stopping.wait(master.delay)
        if mode == "hang":
            master._stopping.wait()
            status = None
        if mode == "dribble":
            self._dribble(rec)
            return
        if status is None:  # drop / hang / refuse: no answer at all
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        rec.answered = time.monotonic()


class Master:
    """A strict, scriptable master on 127.0.0.1.  Context manager or start()/stop().

    ``secret``: the node secret; ``X-Auth-Node`` must equal it (else 401), and must be
    absent when None.  ``prefix``: a path prefix before ``/discovery/nodes/``.
    ``generation``: ``v1`` (NodeAgentData) or ``v2`` (NotifierData), see the module doc.
    ``expected_version`` / ``expected_name`` / ``expected_ttl``: checked when given.
    ``reject_invalid``: answer 400 to an invalid request in ``ok`` mode (default).
    ``tls``: serve https with a throwaway CA (``ca_file``); ``port``: 0 for a free one.
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        prefix: str = "",
        generation: str = "v1",
        expected_version: str | None = None,
        expected_name: str | None = None,
        expected_ttl: int | None = None,
        mode: str = "ok",
        reject_invalid: bool = True,
        delay: float = 0.0,
        tls: bool = False,
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        if generation not in GENERATIONS:
            raise ValueError(f"generation must be one of {GENERATIONS}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.secret = secret
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.generation = generation
        self.expected_version = expected_version
        self.expected_name = expected_name
        self.expected_ttl = expected_ttl
        self.reject_invalid = reject_invalid
        self.delay = delay
        #: set by a test: holds the read of the next large body (BodyGate)
        self.body_gate: BodyGate | None = None
        #: when False, the ``master`` fixture fails a test whose requests had errors
        self.allow_invalid = False
        self.port = port
        self.host = host  # the address it listens on (a veth's, for a container's engine)
        self.tls_errors: list[str] = []
        self._mode = mode
        self._script: deque[str] = deque()
        self._requests: list[RecordedRequest] = []
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[Any] = set()
        self._conns_lock = threading.Lock()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.tls_files: Any = None
        self._ssl_context: ssl.SSLContext | None = None
        if tls:
            from .dockerd import make_tls_files

            self._tmp = tempfile.TemporaryDirectory(prefix="dmtest-master-")
            self.tls_files = make_tls_files(Path(self._tmp.name) / "tls")
            self._ssl_context = self.tls_files.server_context()

    # ----------------------------------------------------------------- addresses
    @property
    def scheme(self) -> str:
        return "https" if self._ssl_context else "http"

    @property
    def address(self) -> str:
        """``HOST:PORT`` (the ``host:port`` form of ``-m``)."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """``http(s)://HOST:PORT`` plus the prefix: what ``-m`` should be given."""
        return f"{self.scheme}://{self.host}:{self.port}{self.prefix}"

    @property
    def ca_file(self) -> Path | None:
        return self.tls_files.ca if self.tls_files else None

    def expected_path(self, name: str) -> str:
        """The decoded path a registration of node ``name`` must reach."""
        return f"{self.prefix}/discovery/nodes/{name}"

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> Master:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Master:
        self._stopping.clear()
        if self._mode != "refuse":
            self._listen()
        elif not self.port:
            raise ValueError("cannot start in refuse mode without a fixed port")
        return self

    def _listen(self) -> None:
        if self._server is not None:
            return
        server = _Server((self.host, self.port), _Handler)
        server.master = self
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"master-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def _unlisten(self, *, close_connections: bool) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if close_connections:
            with self._conns_lock:
                conns = list(self._conns)
            for c in conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Stop listening, release hung requests, close open connections."""
        self._stopping.set()
        self._unlisten(close_connections=True)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # ----------------------------------------------------------------- modes
    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> None:
        """Switch the answer mode now (``refuse`` closes the port, others reopen it)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self._mode = mode
        if mode == "refuse":
            self._unlisten(close_connections=True)
        elif not self._stopping.is_set():
            self._listen()

    def resume(self, mode: str = "ok") -> None:
        """Listen again on the same port after ``refuse`` (and answer in ``mode``)."""
        if mode == "refuse":
            raise ValueError("resume into a mode that listens")
        self.set_mode(mode)

    def script(self, *modes: str) -> None:
        """Answer the next requests in these modes, then fall back to ``mode``."""
        for m in modes:
            if m not in MODES or m == "refuse":
                raise ValueError(f"cannot script mode {m!r}")
        with self._cond:
            self._script.extend(modes)

    def _next_mode(self) -> str:
        with self._cond:
            if self._script:
                return self._script.popleft()
        return "drop" if self._mode == "refuse" else self._mode

    # ----------------------------------------------------------------- requests
    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of everything received so far, in arrival order."""
        with self._cond:
            return list(self._requests)

    @property
    def errors(self) -> list[str]:
        """All validation errors, each prefixed with the request's index."""
        return [f"request {i}: {e}" for i, r in enumerate(self.requests) for e in r.errors]

    def clear(self) -> None:
        with self._cond:
            self._requests.clear()

    def wait_for(self, n: int = 1, timeout: float = 10.0) -> list[RecordedRequest]:
        """Block until ``n`` requests have arrived (MasterTimeout after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MasterTimeout(
                        f"expected {n} request(s) within {timeout}s, got {len(self._requests)}"
                    )
                self._cond.wait(left)
            return list(self._requests)

    def assert_valid(self) -> None:
        errors = self.errors
        if errors:
            raise AssertionError("the master saw invalid requests:\n  " + "\n  ".join(errors))

    def _record(self, rec: RecordedRequest) -> None:
        with self._cond:
            self._requests.append(rec)
            self._cond.notify_all()

    def _track(self, conn: Any, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # ----------------------------------------------------------------- checking
    def _check(self, h: _Handler, body: bytes, arrived: float,
               truncated: bool = False) -> RecordedRequest:
        errors: list[str] = []
        notes: list[str] = []
        raw = h.path
        raw_path, _, raw_query = raw.partition("?")
        try:
            path = urllib.parse.unquote(raw_path, errors="strict")
        except UnicodeDecodeError:
            path = urllib.parse.unquote(raw_path, errors="replace")
            errors.append(f"path: {raw_path!r} does not decode as UTF-8")
        query = urllib.parse.parse_qs(raw_query, keep_blank_values=True)
        rec = RecordedRequest(
            method=h.command,
            path=path,
            raw_path=raw,
            query=query,
            headers=h.headers,
            body=body,
            json=None,
            node_name=None,
            time=arrived,
            errors=errors,
            notes=notes,
            client=h.client_address,
        )
        if h.command != "POST":
            errors.append(f"method: {h.command}, expected POST")

        base = f"{self.prefix}/discovery/nodes/"
        if not raw_path.startswith(base):
            errors.append(f"path: {raw_path!r} is not under {base!r}")
        else:
            segment = raw_path[len(base) :]
            if not segment:
                errors.append("path: the node name segment is empty")
            elif "/" in segment:
                errors.append(f"path: node name {segment!r} is not one path segment (raw '/')")
            elif not _SEGMENT_RE.fullmatch(segment):
                errors.append(f"path: segment {segment!r} is not properly percent-encoded")
            else:
                with contextlib.suppress(UnicodeDecodeError):
                    rec.node_name = urllib.parse.unquote(segment, errors="strict")
                why = name_problem(rec.node_name) if rec.node_name is not None else None
                if why:
                    rec.refused = True
                    errors.append(f"path: node name {rec.node_name!r} is not a domain name "
                                  f"(InternetDomainName): {why}")
            if self.expected_name is not None and rec.node_name != self.expected_name:
                errors.append(f"path: node {rec.node_name!r}, expected {self.expected_name!r}")
        if "#" in raw:
            errors.append("request target carries a fragment")

        pairs = urllib.parse.parse_qsl(raw_query, keep_blank_values=True)
        if [k for k, _ in pairs] != ["ttl"] or not re.fullmatch(r"ttl=[0-9]+", raw_query):
            errors.append(f"query: {raw_query!r}, expected exactly ttl=<integer seconds>")
        else:
            ttl = int(pairs[0][1])
            if ttl <= 0:
                errors.append(f"query: ttl={ttl} is not positive")
            if self.expected_ttl is not None and ttl != self.expected_ttl:
                errors.append(f"query: ttl={ttl}, expected {self.expected_ttl}")

        ctypes_ = h.headers.get_all("Content-Type") or []
        if len(ctypes_) != 1:
            errors.append(f"Content-Type: expected one application/json, got {ctypes_}")
        else:
            media, *params = [p.strip() for p in ctypes_[0].split(";")]
            if media.lower() != "application/json":
                errors.append(f"Content-Type: {ctypes_[0]!r}, expected application/json")
            for p in params:
                if p.lower().replace(" ", "") in ("charset=utf-8", 'charset="utf-8"'):
                    notes.append(f"Content-Type: carries {p!r}")
                else:
                    errors.append(f"Content-Type: unexpected parameter {p!r}")

        uas = h.headers.get_all("User-Agent") or []
        m = _UA_RE.fullmatch(uas[0]) if len(uas) == 1 else None
        if not m:
            errors.append(f"User-Agent: {uas}, expected exactly dm-agent/<version>")
        elif self.expected_version is not None and m.group(1) != self.expected_version:
            errors.append(f"User-Agent: version {m.group(1)!r}, expected {self.expected_version!r}")

        auths = h.headers.get_all("X-Auth-Node") or []
        if self.secret is None:
            if auths:
                errors.append("X-Auth-Node: sent although no secret is configured")
        else:
            rec.auth_ok = len(auths) == 1 and auths[0] == self.secret
            if len(auths) > 1:
                errors.append(f"X-Auth-Node: sent {len(auths)} times")

        if h.headers.get("Host") is None:
            errors.append("Host: missing")

        if truncated:  # said by _read_body; its JSON would only repeat it
            rec.refused = True
        elif h.command == "POST":
            try:
                rec.json = parse_json_strict(body)
            except ValueError as e:
                rec.refused = True
                errors.append(f"body: not strict UTF-8 JSON: {e}")
            else:
                perrs, pnotes = validate_payload(rec.json, generation=self.generation)
                rec.refused = rec.refused or bool(perrs)
                errors += perrs
                notes += pnotes
                name = rec.json.get("name") if isinstance(rec.json, dict) else None
                if rec.node_name is not None and isinstance(name, str) and name != rec.node_name:
                    errors.append(f"path names node {rec.node_name!r}, body name is {name!r}")
        return rec

    def _answer(self, rec: RecordedRequest, mode: str) -> tuple[int | None, str, bytes]:
        text = "text/plain; charset=utf-8"
        if mode in ("drop", "hang", "dribble"):
            return None, "", b""
        if mode == "unauthorized":
            return 401, text, UNAUTHORIZED_BODY.encode()
        if mode == "error500":
            return 500, text, b"Internal Server Error: the test master was told to fail\n"
        if mode == "html502":
            return 502, "text/html", HTML_502
        # ok: behave like the real master
        if rec.method != "POST":
            return 405, text, b"Method Not Allowed\n"
        if rec.node_name is None and not rec.raw_path.startswith(
            f"{self.prefix}/discovery/nodes/"
        ):
            return 404, text, b"Not Found\n"
        if rec.auth_ok is False:
            return 401, text, UNAUTHORIZED_BODY.encode()
        if rec.refused and self.reject_invalid:
            return 500, "application/json", json.dumps({
                "timestamp": datetime.now().isoformat(), "status": 500,
                "error": "Internal Server Error", "message": "; ".join(rec.errors),
                "path": rec.path}).encode()
        if rec.errors and self.reject_invalid:
            return 400, text, ("Bad Request:\n" + "\n".join(rec.errors) + "\n").encode()
        return 200, "application/json", b"{}"


def summarize(requests: Iterable[RecordedRequest]) -> Sequence[str]:
    """One line per request, for assertion messages."""
    return [
        f"{r.method} {r.raw_path} -> {r.status} ({r.mode}) errors={r.errors}" for r in requests
    ]
