"""Command line: the original agent's flags, then the extensions. Only main() ends the process."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from . import __version__, gateway, logs, tunnel
from .commands.parser import Parser
from .config import settings as config
from .errors import EX_OK, AgentError, UsageError
from .process.pidfile import pidfile_path


def _defaults() -> str:
    """Every key of [main] with its default, one per line, for --help (in brackets, what
    an empty default means)."""
    return "\n".join(f"  {k.name} = {k.default or '(' + (k.empty or 'unset') + ')'}"
                     for k in config.KEYS)


EPILOG = f"""\
Example:
  dm-agent -m 10.0.0.3:8761 -t 10 -v
Sample config (/etc/dm-agent.ini):
  [main]
  master = 10.0.0.3:8761
  docker = unix:///var/run/docker.sock
  timeout = 60
  log_level = 1
Keys of [main] with their defaults (DM_AGENT_<KEY> overrides the file; docs/configuration.md):
{_defaults()}
By default find config in (the first that exists, and only it):
        $CWD/dm-agent.ini
        ${{XDG_CONFIG_HOME:-$HOME/.config}}/dm-agent.ini
        /etc/dm-agent.ini
Exit codes: 0 success, 1 failure, 64 usage, 75 pidfile locked, 78 configuration,
  130 interrupted (Ctrl-C) outside the loop.
Commands (see dm-agent COMMAND --help):
  dm-agent status [--json] [--manageable]
                             is the daemon registered? exit 0 registered within its
                             ttl, 1 running but stale, failing or hung, 3 not running,
                             4 unknown (no state readable, e.g. permissions); with
                             --manageable, 2 registered but not manageable by the master
  dm-agent migrate [--dry-run] [--name NAME]
                             take over from the original agent's unit: its settings
                             into /etc/dm-agent.ini, then stop and disable it
  dm-agent hash-password [--rounds N]
                             the bcrypt hash of a password read from stdin, for
                             gateway_password_hash (the gateway, docs/gateway.md)
  dm-agent tunnel-key [-f CONFIG] [--name NAME] [--json]
                             this node's public key for the tunnel's relay and its
                             authorized_keys line (made on first use; docs/tunnel.md)
"""


def _status(argv: list[str]) -> int:
    from .commands import status

    return status.main(argv)


def _migrate(argv: list[str]) -> int:
    from .commands import migrate

    return migrate.main(argv)


def _hash_password(argv: list[str]) -> int:
    from .commands import hash_password

    return hash_password.main(argv)


def _tunnel_key(argv: list[str]) -> int:
    from .commands import tunnel_key

    return tunnel_key.main(argv)


# Subcommands, each with its own parser and exit codes; the agent itself takes none.
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "status": _status, "migrate": _migrate, "hash-password": _hash_password,
    "tunnel-key": _tunnel_key}

# Set while re-executing with the -s value moved out of the command line (see without_secret).
_SECRET_ENV = "DM_AGENT__CLI_SECRET"


#: The flags that set a config key: (short, long, key, help). The parser, the secret-free
#: command line of the re-exec and the overrides are all made from this one table.
KEY_FLAGS: tuple[tuple[str | None, str, str, str], ...] = (
    ("-d", "--docker", "docker", "Docker endpoint: host:port, tcp://host:port, unix:///path "
     "or https://host:port (default unix:///var/run/docker.sock)"),
    ("-m", "--master", "master", "IP and port (or URL) of dockmaster service "
     "(default: unset, nothing is sent)"),
    ("-t", "--timeout", "timeout", "timeout in seconds between node registration updates "
     "(default 60; the ttl sent is twice this)"),
    ("-s", "--secret", "secret", "node secret sent as X-Auth-Node (default: unset; prefer "
     "the config file: a command line is visible to every user)"),
    (None, "--pidfile", "pidfile", "pidfile of --daemon, or of the foreground agent when set "
     "(default /run/dm-agent/dm-agent.pid for root, $XDG_RUNTIME_DIR/dm-agent.pid otherwise)"),
    (None, "--gateway", "gateway", "serve this node's Docker API to the master on HOST:PORT "
     "over TLS (the ecosystem's port is 8771; default off)"),
)
#: The switches, in the order the re-exec writes them back.
SWITCHES = (("--daemon", "daemon"), ("--once", "once"), ("--dry-run", "dry_run"),
            ("--check-config", "check_config"))


def parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: the seed's flags are whole words, and an abbreviation that
    # works today would change meaning when a flag is added.
    p = Parser(prog="dm-agent", description="DockMaster node agent.", epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    for short, long, key, text in KEY_FLAGS:
        names = (short, long) if short else (long,)
        p.add_argument(*names, dest=key, help=text)
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="logging level, -v is INFO, -vv is DEBUG (default WARNING, "
                   "or log_level of the config)")
    p.add_argument("-f", "--config", help="path to the configuration file (default: the "
                   "search path below)")
    p.add_argument("--daemon", action="store_true", help="detach and run in the background "
                   "(default: the foreground)")
    p.add_argument("--once", action="store_true",
                   help="register once, then exit 0 on success, 1 on failure")
    p.add_argument("--dry-run", action="store_true",
                   help="print the registration JSON to stdout instead of sending it")
    p.add_argument("--check-config", action="store_true",
                   help="validate and print the effective settings (secret masked), then exit")
    p.add_argument("--version", action="version", version=f"dm-agent {__version__}")
    return p


def _parse(argv: list[str]) -> argparse.Namespace:
    """parse_args(), but an unknown argument is named without its value: ``--sec S``
    (an abbreviation, refused) would otherwise print the secret in the error."""
    args, extra = parser().parse_known_args(argv)
    if extra:
        shown = " ".join(a.partition("=")[0] if a.startswith("-") else "…" for a in extra)
        raise UsageError(f"dm-agent: error: unrecognized arguments: {shown} "
                         "(values not shown; flags are whole words)")
    return args


def without_secret(args: argparse.Namespace) -> list[str]:
    """A command line that parses to *args* except the secret.

    /proc/PID/cmdline is readable by every user, /proc/PID/environ only by the owner,
    so the agent re-executes itself with the secret moved to its environment. The new
    command line is rebuilt from what argparse parsed rather than edited token by
    token, so no spelling of -s (``-s S``, ``-sS``, ``--secret=S``, ``-vs S``, ``-vsS``)
    can survive in it.
    """
    out: list[str] = []
    for _, flag, key, _ in KEY_FLAGS:
        value = getattr(args, key)
        if value is not None and key != "secret":
            out.append(f"{flag}={value}")
    if args.config is not None:
        out.append(f"--config={args.config}")
    out += ["--verbose"] * args.verbose
    out += [flag for flag, dest in SWITCHES if getattr(args, dest)]
    return out


def _reexec(argv: list[str]) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    if getattr(sys, "frozen", False):
        os.execv(sys.executable, [sys.argv[0], *argv])
    os.execv(sys.executable, [sys.executable, "-m", "dm_agent", *argv])


def cli_overrides(verbose: int = 0, **given: str | None) -> dict[str, str | None]:
    """Map parsed command-line options onto key names (raw text, None when absent):
    ``cli_overrides(verbose=2, master="10.0.0.3:8761")``. ``-v`` counts into log_level."""
    unknown = set(given) - set(config.BY_NAME)
    if unknown:
        raise TypeError(f"cli_overrides: not config keys: {sorted(unknown)}")
    out: dict[str, str | None] = {name: None for name in config.BY_NAME}
    out.update(given)
    out["log_level"] = str(min(verbose, 2)) if verbose else None
    return out


def _load(args: argparse.Namespace) -> tuple[config.Settings, list[str]]:
    """The settings, by the one path of a start and a reload (SIGHUP): the precedence
    rule, then what the gateway refuses to serve with and a tunnel key the agent cannot
    use; ConfigError (exit 78) on any."""
    overrides = cli_overrides(args.verbose,
                              **{key: getattr(args, key) for _, _, key, _ in KEY_FLAGS})
    settings, warnings = config.load(overrides, args.config, cwd=args.cwd)
    gateway.check(settings)
    tunnel.check(settings)
    return settings, warnings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dm-agent`` command; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in COMMANDS:
        return COMMANDS[args_list[0]](args_list[1:])
    try:
        args = _parse(args_list)
    except UsageError as exc:
        parser().print_usage(sys.stderr)
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    if args.secret is not None and argv is None:
        os.environ[_SECRET_ENV] = args.secret
        _reexec(without_secret(args))
    if args.secret is None and _SECRET_ENV in os.environ:
        args.secret = os.environ.pop(_SECRET_ENV)
    # The starting directory: a daemon runs in / and reloads from there, but a
    # relative -f, --pidfile or DM_AGENT_* path keeps meaning what it meant at start.
    args.cwd = os.getcwd()
    try:
        return _run(args)
    except AgentError as exc:
        print(f"dm-agent: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted()


def _interrupted() -> int:
    """Ctrl-C where no loop handles it (``--once``, ``--check-config``, start-up): die of
    SIGINT, as the shell expects of a command it interrupted, so that a script looping
    over dm-agent stops too (a shell only breaks its loop on a child killed by SIGINT);
    ``$?`` shows 130. The running loop treats SIGINT as a stop and exits 0."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    return 130  # 128 + SIGINT, should the signal reach another thread first


def _warn_not_reloaded(running: config.Settings, new: config.Settings) -> None:
    """A daemon keeps its pidfile (systemd's PIDFile= names it) and its log file for its
    whole life; a reload that changes them says so rather than ignoring them silently."""
    for key, was, now in (
        ("pidfile", pidfile_path(running), pidfile_path(new)),
        ("log_file", running.log_file, new.log_file),
    ):
        if was != now:
            logs.logger.warning("%s changed to %s: not applied by a reload, restart the agent "
                                "to use it (still %s)", key, now or "(none)", was or "(none)")


def _run(args: argparse.Namespace) -> int:
    if sum(bool(x) for x in (args.daemon, args.once, args.check_config)) > 1:
        raise UsageError("--daemon, --once and --check-config exclude each other")
    settings, warnings = _load(args)
    if args.check_config:
        for warning in warnings:
            print(f"dm-agent: warning: {warning}", file=sys.stderr)
        sys.stdout.write(config.render(settings, {"pidfile": pidfile_path(settings)}))
        if not args.dry_run:
            settings.require_master()
        from .round.address import unmanaged

        if note := unmanaged(settings):
            print(f"dm-agent: note: {note}", file=sys.stderr)
        print(f"dm-agent: configuration OK ({settings.config_file or 'no file'})",
              file=sys.stderr)
        return EX_OK
    if not args.dry_run:
        settings.require_master()

    def reload() -> config.Settings:
        new, new_warnings = _load(args)
        for warning in new_warnings:
            logs.logger.warning("%s", warning)
        if args.daemon:
            _warn_not_reloaded(settings, new)
        return new

    if args.daemon:
        from .process import daemon

        return daemon.run(settings, warnings, reload, dry_run=args.dry_run)

    logs.setup(settings.log_level)
    for warning in warnings:
        logs.logger.warning("%s", warning)
    logs.logger.info("Configs: %s", settings.config_file or "(none found)")
    if args.once:
        from .round.agent import Agent

        agent = Agent(settings, dry_run=args.dry_run)
        outcome = agent.register()  # one round, in this thread: its outcome applied here
        agent.settle(outcome)
        agent.close()
        return EX_OK if outcome.ok else 1
    return _foreground(settings, reload, args.dry_run)


def _foreground(settings: config.Settings, reload: Callable[[], config.Settings],
                dry_run: bool) -> int:
    """The agent in the foreground. With a ``pidfile`` configured (the container image
    sets one) it holds it and writes the state file beside it, as the daemon does, so
    that ``dm-agent status`` answers; otherwise it leaves no file behind."""
    from .process import runner
    from .process.notify import Watchdog
    from .process.pidfile import LockedPidfile
    from .process.state import state_path

    watchdog = Watchdog.from_env({os.getpid()})
    if not settings.pidfile:
        return runner.serve(settings, reload, dry_run=dry_run, watchdog=watchdog)
    with LockedPidfile(settings.pidfile):
        return runner.serve(settings, reload, dry_run=dry_run, watchdog=watchdog,
                            state_file=state_path(settings.pidfile))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
