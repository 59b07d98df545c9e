"""Settings: one table of keys, its converters (``values``), one precedence rule.

Precedence is command line > ``DM_AGENT_<KEY>`` environment > config file > default.
Only the first config file found on the search path is read. Every invalid value
becomes a :class:`ConfigError` that names where it came from, the key, the value
(never the secret's) and what is expected.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from ..errors import ConfigError
from ..net import SECRET_MASK, ignored_environment, redact_userinfo
from .relay import parse_host_key, parse_tunnel, parse_tunnel_listen
from .values import (
    Secret,
    parse_access,
    parse_address,
    parse_bool,
    parse_docker,
    parse_existing_file,
    parse_interval,
    parse_listen,
    parse_log_level,
    parse_master,
    parse_optional_path,
    parse_password_hash,
    parse_patterns,
    parse_secret,
    parse_time_format,
)

SECTION = "main"
ENV_PREFIX = "DM_AGENT_"
DEFAULT_DOCKER = "unix:///var/run/docker.sock"


# NamedTuple rather than dataclasses: dataclasses imports inspect and ast, 1.5 MB of
# RSS in an agent whose budget is 40 MB.
class Key(NamedTuple):
    name: str
    convert: Callable[[str], Any]
    default: str
    secret: bool = False
    #: the Settings field, when it is not the key's name: the seed's ``timeout`` is
    #: the interval between registrations, and the code calls it that
    field: str = ""
    #: a path, made absolute before use (a daemon runs in ``/``)
    path: bool = False
    #: environment variables read after ``DM_AGENT_<KEY>``: the master's own "add node"
    #: line names the master and the secret so (docs/design.md §7)
    aliases: tuple[str, ...] = ()
    #: what an empty value means, where it is not "unset": the program finds the value
    #: at run time (``--help`` and ``--check-config`` say what it is)
    empty: str = ""

    @property
    def attr(self) -> str:
        return self.field or self.name


# The one table of settings. ``default`` is the text form, converted like any input;
# Settings' defaults are derived from it.
KEYS: tuple[Key, ...] = (
    Key("docker", parse_docker, DEFAULT_DOCKER),
    Key("master", parse_master, "", aliases=("dm_agent_notifier_server",)),
    Key("timeout", parse_interval, "60", field="interval"),
    Key("secret", parse_secret, "", secret=True, aliases=("dm_agent_notifier_secret",)),
    Key("secret_file", parse_existing_file, "", path=True),
    Key("log_level", parse_log_level, "0"),
    Key("address", parse_address, "",
        empty="the Docker TCP host:port, else the IP that routes to the master"),
    Key("pidfile", parse_optional_path, "", path=True,
        empty="/run/dm-agent/dm-agent.pid for root, else $XDG_RUNTIME_DIR/dm-agent.pid"),
    Key("log_file", parse_optional_path, "", path=True),
    Key("docker_tls_ca", parse_existing_file, "", path=True),
    Key("docker_tls_cert", parse_existing_file, "", path=True),
    Key("docker_tls_key", parse_existing_file, "", path=True),
    Key("master_ca", parse_existing_file, "", path=True, empty="the system CA store"),
    Key("time_format", parse_time_format, "utc"),
    Key("net_exclude", parse_patterns, "lo, veth*"),
    Key("jitter", parse_bool, "yes"),
    Key("docker_events", parse_bool, "yes"),
    Key("gateway", parse_listen, ""),
    Key("gateway_cert", parse_existing_file, "", path=True),
    Key("gateway_key", parse_existing_file, "", path=True),
    Key("gateway_client_ca", parse_existing_file, "", path=True),
    Key("gateway_password_hash", parse_password_hash, "", secret=True),
    Key("gateway_access", parse_access, "full"),
    Key("gateway_optional", parse_bool, "no"),
    Key("tunnel", parse_tunnel, ""),
    Key("tunnel_listen", parse_tunnel_listen, ""),
    Key("tunnel_host_key", parse_host_key, ""),
    Key("tunnel_key", parse_existing_file, "", path=True,
        empty="an ed25519 key made in the state directory (dm-agent tunnel-key)"),
)
BY_NAME = {k.name: k for k in KEYS}


class Settings(NamedTuple):
    """The effective configuration, plus where each value came from. A field a key: its
    default is the key's (set below from KEYS, so no default is written twice)."""

    docker: str
    master: str | None
    interval: int
    secret: Secret | None
    secret_file: str | None
    log_level: int
    address: str | None
    pidfile: str | None
    log_file: str | None
    docker_tls_ca: str | None
    docker_tls_cert: str | None
    docker_tls_key: str | None
    master_ca: str | None
    time_format: str
    net_exclude: tuple[str, ...]
    jitter: bool
    docker_events: bool
    gateway: str | None
    gateway_cert: str | None
    gateway_key: str | None
    gateway_client_ca: str | None
    gateway_password_hash: Secret | None
    gateway_access: str
    gateway_optional: bool
    tunnel: str | None
    tunnel_listen: str | None
    tunnel_host_key: str | None
    tunnel_key: str | None
    config_file: str | None
    sources: Mapping[str, str]
    #: why a configured gateway does not run (``gateway_optional`` without credentials)
    gateway_off_reason: str | None

    @property
    def ttl(self) -> int:
        """Seconds the master keeps the node: twice the interval, as the original did."""
        return 2 * self.interval

    def require_master(self) -> str:
        if not self.master:
            where = self.config_file or "/etc/dm-agent.ini"
            raise ConfigError(
                f"master is not set: set 'master = host:port' in [{SECTION}] of {where}, "
                "or pass -m / DM_AGENT_MASTER"
            )
        return self.master


def _defaults() -> dict[str, Any]:
    values = {k.attr: k.convert(k.default) for k in KEYS}
    values = {name: (None if value == "" else value) for name, value in values.items()}
    extra: dict[str, Any] = {"config_file": None, "sources": MappingProxyType({}),
                             "gateway_off_reason": None}
    odd = set(Settings._fields) ^ (set(values) | set(extra))
    if odd:  # a key without a field, or the reverse: fails at import, in every test
        raise AssertionError(f"config.KEYS and Settings disagree on {sorted(odd)}")
    return {**values, **extra}


Settings.__new__.__defaults__ = tuple(_defaults()[name] for name in Settings._fields)
#: The settings when nothing is configured.
DEFAULTS = Settings(**_defaults())


def search_path(env: Mapping[str, str] | None = None, cwd: str | None = None) -> list[str]:
    """Config files looked for when -f is not given, first existing one wins."""
    env = os.environ if env is None else env
    home = env.get("HOME") or os.path.expanduser("~")
    xdg = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return [
        os.path.join(cwd or os.getcwd(), "dm-agent.ini"),
        os.path.join(xdg, "dm-agent.ini"),
        "/etc/dm-agent.ini",
    ]


def find_config(explicit: str | None, env: Mapping[str, str] | None = None,
                cwd: str | None = None) -> str | None:
    """-f made absolute against *cwd*, or the first file of the search path that exists."""
    if explicit:
        return os.path.normpath(os.path.join(cwd or os.getcwd(), explicit))
    for path in search_path(env, cwd):
        if os.path.exists(path):
            return path
    return None


def read_file(path: str) -> tuple[dict[str, str], list[str]]:
    """Read [main] of an INI file. Returns (values, warnings); raises ConfigError."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh, source=path)
    except FileNotFoundError:
        raise ConfigError(f"cannot read config file {path}: it does not exist") from None
    except PermissionError:
        raise ConfigError(
            f"cannot read config file {path}: permission denied "
            "(it is root:dm-agent 0640 when packaged; run as root or as the dm-agent group)"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"cannot read config file {path}: it is a directory") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"cannot read config file {path}: not UTF-8 text ({exc.reason})") from None
    except configparser.Error as exc:
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"cannot parse config file {path}: {msg}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    warnings: list[str] = []
    for section in parser.sections():
        if section != SECTION:
            warnings.append(f"{path}: section [{section}] is ignored (only [{SECTION}] is read)")
    if not parser.has_section(SECTION):
        warnings.append(f"{path}: no [{SECTION}] section, nothing read from it")
        return {}, warnings
    values: dict[str, str] = {}
    for key, value in parser.items(SECTION):
        if key not in BY_NAME:
            warnings.append(f"{path}: unknown key '{key}' in [{SECTION}] is ignored")
            continue
        values[key] = value
    return values, warnings


class Raw(NamedTuple):
    """One key's text as the precedence rule picks it, and where it came from."""

    text: str
    where: str


def raw_value(key: Key, cli: Mapping[str, str | None], env: Mapping[str, str],
              file_values: Mapping[str, str], path: str | None, base: str) -> Raw:
    """The precedence rule for one key: command line > ``DM_AGENT_<KEY>`` (then the key's
    aliases) > the file > the default. A relative path is made absolute against ``base``
    (command line, environment) or the file's directory."""
    origin = base
    given = cli.get(key.name)
    env_var = next((v for v in (ENV_PREFIX + key.name.upper(), *key.aliases) if v in env), None)
    if given is not None:
        text, where = given, "command line"
    elif env_var is not None:
        text, where = env[env_var], "environment " + env_var
    elif key.name in file_values and path is not None:
        text, where = file_values[key.name], f"{path} [{SECTION}] {key.name}"
        origin = os.path.dirname(path)
    else:
        text, where = key.default, "default"
    if key.path and text.strip() and not os.path.isabs(text.strip()):
        text = os.path.normpath(os.path.join(origin, text.strip()))
    return Raw(text, where)


def load(
    cli: Mapping[str, str | None],
    config_path: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> tuple[Settings, list[str]]:
    """Resolve every key by the precedence rule. Returns (settings, warnings).

    ``cli`` maps key names to the raw text given on the command line (or None).
    ``config_path`` is -f, or None for the search path. ``cwd`` is the directory the
    agent was started in (a daemon reloads from ``/``): relative paths from the command
    line and the environment are resolved against it, relative paths in the file against
    the file's directory.
    """
    env = os.environ if env is None else env
    base = cwd or os.getcwd()
    path = find_config(config_path, env, base)
    file_values: dict[str, str] = {}
    warnings: list[str] = []
    if path is not None:
        file_values, warnings = read_file(path)
    warnings += ignored_environment(env)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in KEYS:
        raw, where = raw_value(key, cli, env, file_values, path, base)
        try:
            value = key.convert(raw)
        except ValueError as exc:
            shown = "" if key.secret else f" = {redact_userinfo(raw.strip())!r}"
            raise ConfigError(f"{where}: invalid {key.name}{shown}: {exc}") from None
        values[key.attr] = value if value != "" else None
        sources[key.name] = where
    _resolve_secret(values, sources, env)
    _resolve_credential(values, sources, env, "gateway_password_hash", parse_password_hash)
    tls = [values[k] for k in ("docker_tls_cert", "docker_tls_key")]
    if any(tls) and not all(tls):
        raise ConfigError(
            f"{sources['docker_tls_cert']}: docker_tls_cert and docker_tls_key go together; "
            "set both or neither"
        )
    if values["docker"].startswith("https://") and not all(tls):
        raise ConfigError(
            f"{sources['docker']}: docker = {values['docker']!r} needs docker_tls_cert and "
            "docker_tls_key (and usually docker_tls_ca)"
        )
    values["gateway_off_reason"] = _check_gateway(values, sources)
    _check_tunnel(values, sources)
    return Settings(**values, config_file=path, sources=sources), warnings


def _check_gateway(values: dict[str, Any], sources: Mapping[str, str]) -> str | None:
    """Refuse a gateway that could not authenticate the master (docs/design.md §6), or
    whose certificate comes without its key. Returns why an optional gateway stays off,
    or None. What its credentials hold (the published default password, a certificate
    that cannot serve) is the gateway's own check, ``gateway.check``, made where the
    settings are loaded."""
    if not values["gateway"]:
        return None
    pair = [values[k] for k in ("gateway_cert", "gateway_key")]
    if any(pair) and not all(pair):
        key = "gateway_key" if pair[0] else "gateway_cert"
        raise ConfigError(f"{sources[key]}: gateway_cert and gateway_key go together; set "
                          "both, or neither for a certificate the agent issues itself")
    if not values["gateway_client_ca"] and not values["gateway_password_hash"]:
        reason = ("the gateway needs a way to authenticate the master: set "
                  "gateway_password_hash (dm-agent hash-password; the master's "
                  "dm.agent.client.password) or gateway_client_ca (mutual TLS)")
        if values["gateway_optional"]:
            values["gateway"] = None
            return reason
        raise ConfigError(f"{sources['gateway']}: gateway = {values['gateway']}: {reason}; "
                          "a gateway without authentication is root on this node for anyone")
    return None


def _check_tunnel(values: dict[str, Any], sources: Mapping[str, str]) -> None:
    """A tunnel needs where the relay listens, the relay's pinned host key, and the
    gateway it forwards to (docs/design.md §8). That ``tunnel_key`` is a key the agent can
    use is the tunnel's own check, ``tunnel.check``, made where the gateway's is."""
    if not values["tunnel"]:
        for name in ("tunnel_listen", "tunnel_host_key", "tunnel_key"):
            if values[name] and sources[name] != "default":
                raise ConfigError(f"{sources[name]}: {name} is set but tunnel is not; set "
                                  "tunnel = USER@RELAY[:PORT] (docs/tunnel.md), or remove it")
        return
    where = sources["tunnel"]
    for name, what in (("tunnel_listen", "the address on the relay that the master dials "
                                         "(ADDR:PORT, its permitlisten)"),
                       ("tunnel_host_key", "the relay's host public key, pinned (its "
                                           "/etc/ssh/ssh_host_ed25519_key.pub)")):
        if not values[name]:
            raise ConfigError(f"{where}: tunnel = {values['tunnel']} needs {name}: {what}")
    if not values["gateway"]:
        why = values["gateway_off_reason"] or "gateway is not set"
        raise ConfigError(f"{where}: tunnel = {values['tunnel']} forwards the master to "
                          f"the gateway, which is off: {why}; set gateway = "
                          "127.0.0.1:8771 and its credentials (docs/gateway.md)")


CREDENTIAL = "secret"


def _resolve_secret(values: dict[str, Any], sources: dict[str, str],
                    env: Mapping[str, str]) -> None:
    """Where the secret comes from: ``-s`` > ``DM_AGENT_SECRET`` > the systemd credential
    ``$CREDENTIALS_DIRECTORY/secret`` (``LoadCredential=secret:…``) > ``secret_file`` >
    ``secret`` in the config file. The credential and ``secret_file`` keep the secret out
    of the config file and of ``systemctl show``."""
    if sources["secret"].startswith(("command line", "environment")):
        return
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and os.path.isfile(os.path.join(creds, CREDENTIAL)):
        path = os.path.join(creds, CREDENTIAL)
        where = f"systemd credential {path}"
    elif values["secret_file"]:
        path = values["secret_file"]
        where = f"{sources['secret_file']}: secret_file {path}"
    else:
        return
    values["secret"] = read_secret_file(path, where)
    sources["secret"] = where


def _resolve_credential(values: dict[str, Any], sources: dict[str, str],
                        env: Mapping[str, str], name: str,
                        parse: Callable[[str], Secret | None]) -> None:
    """A sensitive key given as the systemd credential ``$CREDENTIALS_DIRECTORY/<name>``
    (``LoadCredential=<name>:…``): it wins over the file, not over the command line or
    ``DM_AGENT_<NAME>``, as the secret's credential does."""
    creds = env.get("CREDENTIALS_DIRECTORY")
    if sources[name].startswith(("command line", "environment")) or not creds:
        return
    path = os.path.join(creds, name)
    if os.path.isfile(path):
        where = f"systemd credential {path}"
        values[name] = read_secret_file(path, where, name, parse)
        sources[name] = where


def read_secret_file(path: str, where: str, name: str = "secret",
                     parse: Callable[[str], Secret | None] = parse_secret) -> Secret:
    """The secret (or another sensitive key) a file holds: one line, surrounding white
    space ignored, never echoed."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(65537)
    except OSError as exc:
        raise ConfigError(f"{where}: invalid {name}: cannot read {path}: "
                          f"{exc.strerror}") from None
    if len(data) > 65536:
        raise ConfigError(f"{where}: invalid {name}: {path} is larger than 64 KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: invalid {name}: {path} is not UTF-8 text "
                          "(value not shown)") from None
    try:
        secret = parse(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: invalid {name}: {exc}") from None
    if not secret:
        raise ConfigError(f"{where}: invalid {name}: {path} is empty")
    return secret


def render(settings: Settings, found: Mapping[str, str] | None = None) -> str:
    """The effective settings as INI text, the secret masked, each with its source.
    ``found`` holds values the program finds itself where a key is empty (the pidfile a
    daemon would really use), shown in their place."""
    found = found or {}
    lines = [f"# config file: {settings.config_file or '(none found)'}", f"[{SECTION}]"]
    for key in KEYS:
        value = getattr(settings, key.attr)
        if not value and key.name in found:
            value = found[key.name]
        if key.secret:
            text = SECRET_MASK if value else ""
        elif isinstance(value, bool):
            text = "yes" if value else "no"
        elif isinstance(value, tuple):
            text = ", ".join(value)
        elif value is None:
            text = ""
        else:
            text = str(value)
        source = settings.sources.get(key.name, "default")
        if not text and source == "default" and key.empty:
            source = f"default: {key.empty}"
        lines.append(f"{key.name} = {text}".rstrip() + f"  ; {source}")
    return "\n".join(lines) + "\n"
