"""Command line: the original agent's flags, then the extensions. Only main() ends the process."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from . import __version__, config, logs
from .errors import EX_OK, AgentError, UsageError

EPILOG = """\
Example:
  dm-agent -d 172.31.0.11:2375 -m 172.31.0.3:8763 -t 2 -vv
Sample config:
  [main]
  docker = 172.31.0.12:2375
  master = 172.31.0.3:8762
  timeout = 10
  log_level = 2
By default find config in:
        $CWD/dm-agent.ini
        $HOME/.config/dm-agent.ini
        /etc/dm-agent.ini
Exit codes: 0 success, 1 failure, 64 usage, 75 pidfile locked, 78 configuration.
Commands (see dm-agent COMMAND --help):
  dm-agent status [--json]   is the daemon registered? exit 0 registered within its
                             ttl, 1 running but stale, failing or hung, 3 not running,
                             4 unknown (no state readable, e.g. permissions)
  dm-agent migrate [--dry-run] [--name NAME]
                             take over from the original agent's unit: its settings
                             into /etc/dm-agent.ini, then stop and disable it
"""


def _status(argv: list[str]) -> int:
    from . import status

    return status.main(argv)


def _migrate(argv: list[str]) -> int:
    from . import migrate

    return migrate.main(argv)


# Subcommands, each with its own parser and exit codes; the agent itself takes none.
COMMANDS: dict[str, Callable[[list[str]], int]] = {"status": _status, "migrate": _migrate}

# Set while re-executing with the -s value moved out of the command line (see _hide_secret).
_SECRET_ENV = "DM_AGENT__CLI_SECRET"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dm-agent", description="DockMaster node agent.", epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--docker", help="Docker endpoint: host:port, tcp://host:port, "
                   "unix:///path or https://host:port (default unix:///var/run/docker.sock)")
    p.add_argument("-m", "--master", help="IP and port (or URL) of dockmaster service")
    p.add_argument("-t", "--timeout", help="timeout in seconds between node registration updates")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="logging level, -v is INFO, -vv is DEBUG")
    p.add_argument("-f", "--config", help="path to the configuration file")
    p.add_argument("-s", "--secret", help="node secret sent as X-Auth-Node "
                   "(prefer the config file: a command line is visible to every user)")
    p.add_argument("--daemon", action="store_true", help="detach and run in the background")
    p.add_argument("--pidfile", help="pidfile of --daemon (default /run/dm-agent/dm-agent.pid "
                   "for root, $XDG_RUNTIME_DIR/dm-agent.pid otherwise)")
    p.add_argument("--once", action="store_true",
                   help="register once, then exit 0 on success, 1 on failure")
    p.add_argument("--dry-run", action="store_true",
                   help="print the registration JSON to stdout instead of sending it")
    p.add_argument("--check-config", action="store_true",
                   help="validate and print the effective settings (secret masked), then exit")
    p.add_argument("--version", action="version", version=f"dm-agent {__version__}")
    return p


def _hide_secret(argv: list[str]) -> list[str] | None:
    """argv without -s/--secret, its value moved to the environment; None when absent.

    /proc/PID/cmdline is readable by every user, /proc/PID/environ only by the owner,
    so the agent re-executes itself with the secret taken off its command line.
    """
    out: list[str] = []
    secret: str | None = None
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg in ("-s", "--secret") and i + 1 < len(argv):
            secret = argv[i + 1]
            next(it, None)
        elif arg.startswith("--secret="):
            secret = arg.split("=", 1)[1]
        elif arg.startswith("-s") and len(arg) > 2 and not arg.startswith("--"):
            secret = arg[2:]
        elif arg == "--":
            out.extend(argv[i:])
            break
        else:
            out.append(arg)
    if secret is None:
        return None
    os.environ[_SECRET_ENV] = secret
    return out


def _reexec(argv: list[str]) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    if getattr(sys, "frozen", False):
        os.execv(sys.executable, [sys.argv[0], *argv])
    os.execv(sys.executable, [sys.executable, "-m", "dm_agent", *argv])


def _load(args: argparse.Namespace) -> tuple[config.Settings, list[str]]:
    overrides = config.cli_overrides(args.docker, args.master, args.timeout,
                                     args.secret, args.verbose, args.pidfile)
    return config.load(overrides, args.config)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dm-agent`` command; returns the exit code."""
    real_argv = argv is None
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in COMMANDS:
        return COMMANDS[args_list[0]](args_list[1:])
    if real_argv and _SECRET_ENV not in os.environ:
        hidden = _hide_secret(args_list)
        if hidden is not None:
            _reexec(hidden)
    try:
        args = parser().parse_args(args_list)
    except UsageError as exc:
        parser().print_usage(sys.stderr)
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    if args.secret is None and _SECRET_ENV in os.environ:
        args.secret = os.environ.pop(_SECRET_ENV)
    try:
        return _run(args)
    except AgentError as exc:
        print(f"dm-agent: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    if sum(bool(x) for x in (args.daemon, args.once, args.check_config)) > 1:
        raise UsageError("dm-agent: --daemon, --once and --check-config exclude each other")
    settings, warnings = _load(args)
    if args.check_config:
        for warning in warnings:
            print(f"dm-agent: warning: {warning}", file=sys.stderr)
        sys.stdout.write(config.render(settings))
        if not args.dry_run:
            settings.require_master()
        print(f"dm-agent: configuration OK ({settings.config_file or 'no file'})",
              file=sys.stderr)
        return EX_OK
    if not args.dry_run:
        settings.require_master()

    def reload() -> config.Settings:
        new, new_warnings = _load(args)
        for warning in new_warnings:
            logs.logger.warning("%s", warning)
        return new

    if args.daemon:
        from . import daemon

        return daemon.run(settings, warnings, reload, dry_run=args.dry_run)

    logs.setup(settings.log_level)
    for warning in warnings:
        logs.logger.warning("%s", warning)
    logs.logger.info("Configs: %s", settings.config_file or "(none found)")
    from .agent import Agent

    agent = Agent(settings, dry_run=args.dry_run, reload_settings=reload)
    if args.once:
        ok = agent.register()
        agent.close()
        return EX_OK if ok else 1
    from .signals import Signals

    signals = Signals(agent.waker)
    signals.install()
    logs.logger.info("started: registering every %ds with %s", settings.timeout,
                     settings.master or "(dry run)")
    try:
        return agent.run(signals)
    finally:
        signals.restore()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
