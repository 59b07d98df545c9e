"""``dm-agent hash-password`` as an operator runs it: the real program, stdin piped."""

from __future__ import annotations

import subprocess
from pathlib import Path

import bcrypt
from agentproc import BIN, clean_env

from dm_agent.gateway import auth


def hash_password(home: Path, stdin: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([BIN, "hash-password", *args], input=stdin, capture_output=True,
                          cwd=home, env=clean_env(home), timeout=60)


def test_the_printed_hash_verifies_and_the_agent_takes_it(tmp_path: Path) -> None:
    proc = hash_password(tmp_path, b"the master's password\n", "--rounds", "10")
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.decode()
    assert printed.count("\n") == 1 and printed.startswith("$2b$10$")
    hashed = printed.strip()
    assert bcrypt.checkpw(b"the master's password", hashed.encode())
    assert not bcrypt.checkpw(b"the master's password\n", hashed.encode())  # newline dropped
    assert b"master's password" not in proc.stdout + proc.stderr
    assert auth.check_hash(hashed) == hashed  # what config accepts for gateway_password_hash


def test_no_password_and_the_published_default_are_refused(tmp_path: Path) -> None:
    empty = hash_password(tmp_path, b"")
    assert empty.returncode == 64 and empty.stdout == b""
    assert b"no password" in empty.stderr
    default = hash_password(tmp_path, b"password\n")
    assert default.returncode == 78 and default.stdout == b""
    assert b"published default" in default.stderr


def test_rounds_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    proc = hash_password(tmp_path, b"x\n", "--rounds", "4")
    assert proc.returncode == 64 and proc.stdout == b""
    assert b"--rounds" in proc.stderr


def test_long_passwords_hash_as_the_master_checks_them(tmp_path: Path) -> None:
    """bcrypt reads 72 bytes; the gateway and the hash agree on the cut (jBCrypt's)."""
    long = b"p" * 72 + b"-ignored-tail"
    proc = hash_password(tmp_path, long + b"\n", "--rounds", "10")
    assert proc.returncode == 0 and b"only the first 72 bytes" in proc.stderr
    hashed = proc.stdout.decode().strip()
    assert auth.verify(long, hashed) and auth.verify(b"p" * 72, hashed)
    assert not auth.verify(b"p" * 71, hashed)
