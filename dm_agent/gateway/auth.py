"""Who the gateway lets in (docs/design.md §6): a client certificate signed by
``gateway_client_ca``, or HTTP Basic ``admin`` with the password whose bcrypt hash is
``gateway_password_hash`` — the master's ``dm.agent.client.password``, in the format of
the Java agent's ``dm.auth.adminPassword``.

The master sends Basic auth on every request and bcrypt costs ~100 ms, so a verified
header is remembered: keyed by an HMAC of the header under a key made at start (never
the header itself), for at most ``CACHE_TTL`` seconds, at most ``CACHE_SIZE`` of them. A
wrong password is never remembered. Failures are counted per client address: after
``MAX_FAILURES`` within ``WINDOW`` seconds the client gets 429 without bcrypt running,
until the window passes; each burst of failures is logged once, naming the client.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import bcrypt

log = logging.getLogger("dm_agent")

USER = "admin"
#: The Java agent's published default: whoever read its documentation knows it.
DEFAULT_PASSWORD = b"password"
CACHE_SIZE = 64
CACHE_TTL = 300.0
MAX_FAILURES = 5
WINDOW = 60.0
MAX_CLIENTS = 1024
#: bcrypt reads at most 72 bytes; jBCrypt (the master's Java side) ignored the rest, and
#: bcrypt 5 refuses longer input, so the password is cut there, as the master's was.
BCRYPT_MAX = 72

CHALLENGE = (("WWW-Authenticate", 'Basic realm="dm-agent", charset="UTF-8"'),)


class Verdict(NamedTuple):
    ok: bool
    status: int
    message: str
    headers: tuple[tuple[str, str], ...] = ()


LET_IN = Verdict(True, 200, "")


def _bcrypt_hash(text: str) -> bytes:
    """The hash as bcrypt reads it: ``$2y$`` (PHP's name) is ``$2b$``'s algorithm."""
    raw = text.strip().encode("ascii")
    return b"$2b$" + raw[4:] if raw.startswith(b"$2y$") else raw


def verify(password: bytes, password_hash: str) -> bool:
    try:
        return bool(bcrypt.checkpw(password[:BCRYPT_MAX], _bcrypt_hash(password_hash)))
    except (ValueError, UnicodeEncodeError):  # a hash check_hash would have refused
        return False


def hash_password(password: bytes, rounds: int = 12) -> str:
    """A ``$2b$`` hash for ``gateway_password_hash``."""
    return bcrypt.hashpw(password[:BCRYPT_MAX], bcrypt.gensalt(rounds)).decode("ascii")


def check_hash(text: str) -> str:
    """The hash, if the gateway may use it; ValueError saying why not (never echoing it)."""
    try:
        raw = _bcrypt_hash(text)
        bcrypt.checkpw(b"probe", raw)
    except (ValueError, UnicodeEncodeError):
        raise ValueError("not a bcrypt hash bcrypt can read (make one with: "
                         "dm-agent hash-password) (value not shown)") from None
    if verify(DEFAULT_PASSWORD, text):
        raise ValueError("it is the hash of 'password', the Java agent's published default: "
                         "anyone can guess it; choose another password and set it on the "
                         "master as dm.agent.client.password")
    return text


class _Client:
    __slots__ = ("burst", "count", "first", "last", "last_mono", "trying", "window_count",
                 "window_start")

    def __init__(self, now: float, wall: float) -> None:
        self.window_start, self.window_count = now, 0
        self.trying = 0
        self.last_mono = now
        self.first = self.last = wall
        self.count = 0
        self.burst = 0


class Authenticator:
    """Decides each request; thread-safe (every connection's thread asks it)."""

    def __init__(self, password_hash: str | None, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.password_hash = password_hash
        self.clock, self.wall = clock, wall
        self._key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._lock = threading.Lock()
        self.failures_total = 0

    def check(self, client: str, cert_verified: bool, authorization: bytes | None) -> Verdict:
        if cert_verified:
            return LET_IN
        if authorization is None:
            return Verdict(False, 401, "gateway: authentication required (HTTP Basic, user "
                           f"{USER}, or a client certificate)", CHALLENGE)
        key = hmac.new(self._key, authorization, hashlib.sha256).digest()
        if self._cached(key):  # verified lately: no guess gains from it, no bcrypt runs
            return LET_IN
        wait = self._claim(client)
        if wait:
            return Verdict(False, 429, "gateway: too many failed logins from this address; "
                           f"try again in {wait} s", (("Retry-After", str(wait)),))
        try:
            if self.password_hash is None:
                return self._failed(client, "a password, but the gateway takes client "
                                    "certificates only")
            password = _basic_password(authorization)
            if password is None:
                return self._failed(client, "not HTTP Basic for user " + USER)
            if not verify(password, self.password_hash):
                return self._failed(client, "wrong password")
        finally:
            self._release(client)
        self._remember(key)
        return LET_IN

    # --- the cache of verified headers

    def _cached(self, key: bytes) -> bool:
        now = self.clock()
        with self._lock:
            until = self._cache.get(key)
            if until is None:
                return False
            if until < now:
                del self._cache[key]
                return False
            return True

    def _remember(self, key: bytes) -> None:
        with self._lock:
            self._cache[key] = self.clock() + CACHE_TTL
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)

    # --- failures

    def _claim(self, client: str) -> int:
        """A try for ``client``, or the seconds it must wait: its failures in the window
        and its tries under way together stay below MAX_FAILURES, so that concurrent
        requests cannot run bcrypt past the limit either."""
        now = self.clock()
        with self._lock:
            state = self._inflight_state(client, now)
            if now - state.window_start >= WINDOW:
                state.window_start, state.window_count = now, 0
            if state.window_count + state.trying >= MAX_FAILURES:
                return max(1, math.ceil(state.window_start + WINDOW - now))
            state.trying += 1
            return 0

    def _release(self, client: str) -> None:
        with self._lock:
            state = self._clients.get(client)
            if state is not None and state.trying:
                state.trying -= 1

    def _inflight_state(self, client: str, now: float) -> _Client:
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _Client(now, self.wall())
            state.window_start = now - WINDOW  # no window open yet
            while len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)
        return state

    def _failed(self, client: str, why: str) -> Verdict:
        now, wall = self.clock(), self.wall()
        with self._lock:
            self.failures_total += 1
            state = self._inflight_state(client, now)
            self._clients.move_to_end(client)
            new_burst = state.count == 0 or now - state.last_mono >= WINDOW
            previous = state.burst
            if new_burst:
                state.burst, state.first = 0, wall
            if now - state.window_start >= WINDOW:
                state.window_start, state.window_count = now, 0
            state.window_count += 1
            state.burst += 1
            state.count += 1
            state.last, state.last_mono = wall, now
        if new_burst:
            log.warning("gateway: authentication failed for %s (%s)%s", client, why,
                        f"; its previous burst had {previous} failures"
                        if previous and state.count > 1 else "")
        return Verdict(False, 401, f"gateway: authentication failed: {why}", CHALLENGE)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            recent = sorted(self._clients.items(), key=lambda kv: kv[1].last, reverse=True)
            return {"failures_total": self.failures_total,
                    "recent": [{"client": c, "count": s.count, "first": s.first,
                                "last": s.last} for c, s in recent[:10]]}


def _basic_password(authorization: bytes) -> bytes | None:
    """The password of ``Basic base64(admin:password)``; None for anything else."""
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep or user != USER.encode():
        return None
    return password
