"""Who the gateway lets in (dm_agent.gateway.auth): real bcrypt hashes of every prefix
the master's side writes, the keyed cache, the failure limit and its log lines."""

from __future__ import annotations

import base64
import logging
import shutil
import subprocess
import threading

import bcrypt
import pytest

from dm_agent.gateway import auth

PASSWORD = b"dm.agent.client.password value"


def basic(user: bytes, password: bytes) -> bytes:
    return b"Basic " + base64.b64encode(user + b":" + password)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hashed() -> str:
    return bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4)).decode()


def test_the_right_password_or_a_verified_certificate_lets_in(hashed: str) -> None:
    a = auth.Authenticator(hashed)
    assert a.check("10.0.0.3", False, basic(b"admin", PASSWORD)).ok
    assert a.check("10.0.0.3", True, None).ok  # the TLS layer verified its certificate
    for header, why in ((None, "authentication required"),
                        (basic(b"admin", b"wrong"), "wrong password"),
                        (basic(b"root", PASSWORD), "not HTTP Basic for user admin"),
                        (b"Bearer abc", "not HTTP Basic"), (b"Basic !!!", "not HTTP Basic"),
                        (b"Basic " + base64.b64encode(b"no-colon"), "not HTTP Basic"),
                        (b"", "not HTTP Basic")):
        verdict = auth.Authenticator(hashed).check("10.0.0.3", False, header)
        assert not verdict.ok and verdict.status == 401 and why in verdict.message, header
        assert verdict.headers[0][0] == "WWW-Authenticate"
        assert verdict.headers[0][1].startswith("Basic ")


def test_without_a_hash_only_certificates_let_in() -> None:
    a = auth.Authenticator(None)
    assert a.check("c", True, None).ok
    verdict = a.check("c", False, basic(b"admin", PASSWORD))
    assert not verdict.ok and "client certificates only" in verdict.message


def test_every_bcrypt_prefix_the_master_side_writes(tmp_path: object) -> None:
    b2b = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4, prefix=b"2b")).decode()
    b2a = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4, prefix=b"2a")).decode()  # Spring, jBCrypt
    assert b2a.startswith("$2a$") and b2b.startswith("$2b$")
    hashes = [b2a, b2b]
    htpasswd = shutil.which("htpasswd")
    assert htpasswd, "apache2-utils (htpasswd) is in .ci/deps: it writes PHP's $2y$"
    line = subprocess.run([htpasswd, "-nbBC", "4", "admin", PASSWORD.decode()],
                          capture_output=True, text=True, check=True).stdout.strip()
    b2y = line.split(":", 1)[1]
    assert b2y.startswith("$2y$")
    hashes.append(b2y)
    for h in hashes:
        assert auth.check_hash(h) == h
        a = auth.Authenticator(h)
        assert a.check("c", False, basic(b"admin", PASSWORD)).ok, h[:4]
        assert not a.check("c2", False, basic(b"admin", b"other")).ok, h[:4]


def test_the_published_default_and_garbage_are_refused_without_echo() -> None:
    default = bcrypt.hashpw(b"password", bcrypt.gensalt(4)).decode()
    with pytest.raises(ValueError, match="published default") as err:
        auth.check_hash(default)
    assert default not in str(err.value)
    for bad in ("$2b$04$tooshort", "not-a-hash", "$2b$04$" + "é" * 53):
        with pytest.raises(ValueError, match="not a bcrypt hash") as err:
            auth.check_hash(bad)
        assert bad not in str(err.value)


def test_the_cache_is_keyed_by_an_hmac_never_the_header(hashed: str, clock: Clock,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    a = auth.Authenticator(hashed, clock=clock)
    header = basic(b"admin", PASSWORD)
    assert a.check("c", False, header).ok
    (key,) = a._cache
    assert header not in key and PASSWORD not in key and len(key) == 32
    calls = []
    real = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda p, h: calls.append(1) or real(p, h))
    assert a.check("c", False, header).ok and calls == []  # cached: no bcrypt
    clock.now += auth.CACHE_TTL + 1
    assert a.check("c", False, header).ok and calls == [1]  # expired: checked again
    assert not a.check("c", False, basic(b"admin", b"wrong")).ok
    assert len(a._cache) == 1  # a wrong password is never remembered


def test_the_cache_is_bounded(hashed: str) -> None:
    a = auth.Authenticator(hashed)
    for i in range(auth.CACHE_SIZE + 10):
        # the same password, other headers: "admin:pw" with padding variants is one
        # header; distinct valid headers come from distinct passwords' hashes instead
        a._remember(bytes([i % 256]) * 32)
    assert len(a._cache) == auth.CACHE_SIZE


def test_failures_are_limited_per_client_and_logged_once_per_burst(
        hashed: str, clock: Clock, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    a = auth.Authenticator(hashed, clock=clock)
    wrong, right = basic(b"admin", b"guess"), basic(b"admin", PASSWORD)
    with caplog.at_level(logging.WARNING, logger="dm_agent"):
        statuses = [a.check("10.0.0.66", False, wrong).status
                    for _ in range(auth.MAX_FAILURES + 2)]
        assert statuses == [401] * auth.MAX_FAILURES + [429] * 2
        limited = a.check("10.0.0.66", False, right)
        assert limited.status == 429 and ("Retry-After", "60") in limited.headers
        assert a.check("10.0.0.7", False, right).ok  # another client is not limited
        calls = []
        monkeypatch.setattr(bcrypt, "checkpw", lambda p, h: calls.append(1) or False)
        a.check("10.0.0.66", False, wrong)
        assert calls == []  # while limited, bcrypt does not even run
        monkeypatch.undo()
        clock.now += auth.WINDOW + 1
        assert a.check("10.0.0.66", False, right).ok  # the window passed
        assert a.check("10.0.0.66", False, wrong).status == 401  # a new burst
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "gateway: authentication failed for 10.0.0.66 (wrong password)",
        "gateway: authentication failed for 10.0.0.66 (wrong password); its previous burst "
        f"had {auth.MAX_FAILURES} failures",
    ]
    assert all("guess" not in line and PASSWORD.decode() not in line for line in lines)
    snap = a.snapshot()
    assert snap["failures_total"] == auth.MAX_FAILURES + 1
    assert snap["recent"][0]["client"] == "10.0.0.66"


def test_a_long_password_is_cut_at_72_bytes_like_jbcrypt() -> None:
    long = b"x" * 72
    h = auth.hash_password(long + b"tail", rounds=4)
    assert auth.verify(long, h) and auth.verify(long + b"other tail", h)
    assert auth.Authenticator(h).check("c", False, basic(b"admin", long + b"more")).ok


def test_many_threads_at_once(hashed: str) -> None:
    a = auth.Authenticator(hashed)
    results: list[bool] = []
    lock = threading.Lock()

    def hammer(i: int) -> None:
        for j in range(20):
            ok = a.check(f"10.1.{i}.{j}", False,  # one try per client: none is limited
                         basic(b"admin", PASSWORD if j % 2 else b"bad")).ok
            with lock:
                results.append(ok == bool(j % 2))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 160 and all(results)
    assert a.snapshot()["failures_total"] == 80


def test_retry_after_is_the_time_left_and_a_verified_header_still_passes(
        hashed: str, clock: Clock) -> None:
    a = auth.Authenticator(hashed, clock=clock)
    right = basic(b"admin", PASSWORD)
    assert a.check("10.0.0.3", False, right).ok  # the master, verified and remembered
    for _ in range(auth.MAX_FAILURES):  # someone behind the same NAT guesses
        a.check("10.0.0.3", False, basic(b"admin", b"guess"))
    clock.now += 45
    limited = a.check("10.0.0.3", False, basic(b"admin", b"guess"))
    assert limited.status == 429 and ("Retry-After", "15") in limited.headers
    assert a.check("10.0.0.3", False, right).ok  # the master's remembered header passes


def test_concurrent_guesses_cannot_run_bcrypt_past_the_limit(
        hashed: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a = auth.Authenticator(hashed)
    runs: list[int] = []
    gate = threading.Barrier(20)
    real = bcrypt.checkpw

    def slow_check(password: bytes, h: bytes) -> bool:
        runs.append(1)
        return bool(real(password, h))

    monkeypatch.setattr(bcrypt, "checkpw", slow_check)

    def guess(i: int) -> None:
        gate.wait()
        a.check("10.9.9.9", False, basic(b"admin", b"guess%d" % i))

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) <= auth.MAX_FAILURES, len(runs)
