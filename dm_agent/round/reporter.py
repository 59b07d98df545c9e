"""The one send function: POST a registration to the master, with bounded timeouts.

Retry and backoff live in the loop, not here. Every failure becomes a
:class:`ReportError` whose ``kind`` lets the loop log an outage once.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.parse

import requests
import urllib3

from .. import __version__
from ..errors import ReportError
from ..net import redact, system_ca_bundle

MAX_BODY_IN_LOG = 200
# Of an answer, no more than this is read (an error page is summarised to its title).
MAX_ANSWER = 64 * 1024

def node_url(master: str, name: str, ttl: int) -> str:
    """``{master}/discovery/nodes/{name}?ttl={ttl}``, the name one encoded path segment."""
    return f"{master}/discovery/nodes/{urllib.parse.quote(name, safe='')}?ttl={int(ttl)}"


_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&#39;": "'",
             "&nbsp;": " "}


def _unescape(text: str) -> str:
    # html.unescape would import a table of 2,200 entities (0.5 MB) for a log line.
    return re.sub(r"&(?:amp|lt|gt|quot|#39|nbsp);", lambda m: _ENTITIES[m.group(0)], text)


def summarise_body(text: str, content_type: str = "") -> str:
    """A log-sized version of an error body: an HTML page is reduced to its title."""
    size = len(text)
    head = text.lstrip()[:15].lower()
    if "html" in content_type.lower() or head.startswith(("<!doctype", "<html")):
        match = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
        text = match.group(1) if match else re.sub(r"<[^>]+>", " ", text)
        text = _unescape(text)
    text = " ".join(text.split())
    if len(text) > MAX_BODY_IN_LOG:
        text = text[: MAX_BODY_IN_LOG - 1] + "…"
    if size > MAX_BODY_IN_LOG:
        text += f" ({size} bytes)"
    return text


class Reporter:
    """Sends registrations to one master over a (reused) ``requests.Session``."""

    def __init__(self, master: str, secret: str | None = None, ca_file: str | None = None,
                 timeout: tuple[float, float] = (5.0, 10.0),
                 session: requests.Session | None = None) -> None:
        self.master = master
        self._secret = secret
        self.verify: bool | str = ca_file or system_ca_bundle()
        self.timeout = timeout
        self.session = session or requests.Session()
        # Neither a node's http_proxy nor REQUESTS_CA_BUNDLE (which requests lets win
        # over an explicit CA) may change where and how the master is reached.
        self.session.trust_env = False
        self.user_agent = f"dm-agent/{__version__}"
        self._reading: requests.Response | None = None

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": self.user_agent}
        if self._secret:
            headers["X-Auth-Node"] = self._secret
        return headers

    def close(self) -> None:
        self.session.close()

    def abort(self) -> None:
        """From another thread: cut the answer being read, if any, so a round abandoned
        at its deadline does not stay connected to a master that dribbles."""
        resp = self._reading
        sock = getattr(getattr(resp.raw, "connection", None), "sock", None) if resp else None
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once
            except OSError:
                pass

    def send(self, name: str, ttl: int, body: bytes, deadline: float | None = None) -> None:
        """POST one registration; returns on 200, raises ReportError otherwise.

        requests' timeouts bound each socket operation, not the exchange: a master
        that sends its answer a byte at a time would hold the round for ever. The
        answer is therefore read as a stream and given up at ``deadline`` (monotonic)."""
        url = node_url(self.master, name, ttl)
        try:
            resp = self.session.post(url, data=body, headers=self.headers(),
                                     timeout=self.timeout, verify=self.verify,
                                     allow_redirects=False, stream=True)
        except requests.exceptions.SSLError as exc:
            raise ReportError(kind="tls", message=f"TLS to {self.master} failed: "
                              f"{self.redacted(exc)}") from None
        except requests.exceptions.ConnectTimeout:
            raise ReportError(kind="timeout", message=f"connecting to {self.master} timed out "
                              f"after {self.timeout[0]:g}s") from None
        except requests.exceptions.ReadTimeout:
            raise ReportError(kind="timeout", message=f"{self.master} did not answer within "
                              f"{self.timeout[1]:g}s") from None
        except requests.exceptions.ConnectionError as exc:
            raise ReportError(kind="connection", message=f"cannot reach {self.master}: "
                              f"{self.redacted(exc)}") from None
        except requests.exceptions.RequestException as exc:
            raise ReportError(kind="connection", message=f"request to {self.master} failed: "
                              f"{self.redacted(exc)}") from None
        self._reading = resp
        try:
            text = self._read(resp, deadline)
        finally:
            self._reading = None
            resp.close()  # an answer not read to its end closes the connection
        if resp.status_code == 200:
            return
        detail = summarise_body(text, resp.headers.get("Content-Type", ""))
        if resp.status_code == 401:
            raise ReportError(
                kind="unauthorized",
                message=f"master {self.master} refused the node secret (HTTP 401): "
                + ("check 'secret' in the config (or -s / DM_AGENT_SECRET)"
                   if self._secret else "the master wants one; set 'secret' in the config")
                + (f"; master said: {detail}" if detail else ""),
            )
        raise ReportError(kind="http", message=f"master {self.master} answered HTTP "
                          f"{resp.status_code}" + (f": {detail}" if detail else ""))


    def _read(self, resp: requests.Response, deadline: float | None) -> str:
        """The answer's text (at most MAX_ANSWER bytes), read before ``deadline``."""
        chunks: list[bytes] = []
        size = 0
        raw = resp.raw
        # read1: what the socket has (urllib3 2); read(n) would wait for all n bytes.
        read1 = getattr(raw, "read1", None)
        try:
            while size < MAX_ANSWER:
                if deadline is not None and time.monotonic() > deadline:
                    raise ReportError(kind="timeout", message=f"{self.master} sends its answer too "
                                      f"slowly: HTTP {resp.status_code} and {size} bytes "
                                      "when the round's deadline passed")
                chunk = read1(1024, decode_content=True) if read1 else \
                    raw.read(1, decode_content=True)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if resp.status_code == 200:
                return ""  # accepted; how the rest of the answer went does not matter
            raise ReportError(kind="connection", message=f"{self.master} answered HTTP "
                              f"{resp.status_code}, then: {self.redacted(exc)}") from None
        data = b"".join(chunks)
        try:
            return data.decode(resp.encoding or "utf-8", "replace")
        except LookupError:  # a charset Python does not know
            return data.decode("utf-8", "replace")

    def redacted(self, exc: BaseException) -> str:
        return redact(_short(exc), self._secret)


def _short(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Connection reset by peer", "Name or service not known",
                   "Temporary failure in name resolution", "No route to host",
                   "Network is unreachable", "RemoteDisconnected", "certificate verify failed",
                   "Connection aborted"):
        if marker in text:
            return marker
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:199] + "…"
