"""The parser every command line uses: the agent's own (cli) and its subcommands'.

It sits below cli, status and migrate so that the subcommands need nothing from cli,
which dispatches to them: the imports point one way only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..errors import UsageError


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageError (exit 64), not SystemExit(2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def parse_command(p: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    """``argv`` parsed by a subcommand's parser (a ``Parser``), or the exit code to return:
    64 after the usage and the error on stderr, 0 after ``--help``."""
    try:
        return p.parse_args(list(argv))
    except UsageError as exc:
        p.print_usage(sys.stderr)
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
