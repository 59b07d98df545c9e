"""``dm-agent hash-password``: the bcrypt hash for ``gateway_password_hash``, of the
password the master sends (its ``dm.agent.client.password``), read from stdin: without
echo and twice on a terminal, one line from a pipe. Only the hash is printed."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence

from ..errors import EX_CONFIG, EX_OK, EX_USAGE
from .parser import Parser, parse_command

DESCRIPTION = """\
Print the bcrypt hash of a password for gateway_password_hash (docs/gateway.md). The
password is read from standard input: asked twice without echo on a terminal, else the
first line of the pipe. Set the same password on the master as dm.agent.client.password."""

EPILOG = """\
Exit codes:
  0   the hash is printed
  64  no password (empty input), or the two entries differ
  78  the password is 'password', the published default the gateway refuses
"""


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="dm-agent hash-password", description=DESCRIPTION, epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=12, choices=range(10, 17), metavar="N",
                   help="bcrypt cost, 10 to 16 (default 12: tenths of a second of a core "
                   "per check, paid once per password by the gateway's cache; "
                   "docs/configuration.md has the figure)")
    return p


def _read() -> str | None:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if first != getpass.getpass("again: "):
            print("dm-agent hash-password: the two entries differ", file=sys.stderr)
            return None
        return first
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def main(argv: Sequence[str]) -> int:
    args = parse_command(parser(), argv)
    if isinstance(args, int):
        return args
    from ..gateway import auth

    password = _read()
    if password is None:
        return EX_USAGE
    if not password:
        print("dm-agent hash-password: no password given on standard input", file=sys.stderr)
        return EX_USAGE
    secret = password.encode("utf-8")
    if secret == auth.DEFAULT_PASSWORD:
        print("dm-agent hash-password: 'password' is the Java agent's published default, "
              "which the gateway refuses: choose another", file=sys.stderr)
        return EX_CONFIG
    if len(secret) > auth.BCRYPT_MAX:
        print(f"dm-agent hash-password: note: bcrypt reads only the first {auth.BCRYPT_MAX} "
              "bytes of a password, as the master's does", file=sys.stderr)
    print(auth.hash_password(secret, args.rounds))
    return EX_OK
