"""Settings: one table of keys, pure converters, one precedence rule.

Precedence is command line > ``DM_AGENT_<KEY>`` environment > config file > default.
Only the first config file found on the search path is read. Every invalid value
becomes a :class:`ConfigError` that names where it came from, the key, the value
(never the secret's) and what is expected.
"""

from __future__ import annotations

import configparser
import fnmatch
import os
import re
import stat
import urllib.parse
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from ..errors import ConfigError
from ..net import SECRET_MASK, USERINFO, redact_userinfo

SECTION = "main"
ENV_PREFIX = "DM_AGENT_"
DEFAULT_DOCKER = "unix:///var/run/docker.sock"


class Secret(str):
    """A string whose repr never shows its value."""

    def __repr__(self) -> str:
        return "Secret('" + SECRET_MASK + "')"


# --- converters: each takes the raw text and returns a value or raises ValueError


def _endpoint_hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port for {what}, got no port")
    host = host.strip("[]")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected a port number 1-65535 after ':', got {port!r}")
    return host, int(port)


def parse_docker(text: str) -> str:
    """Normalise a Docker endpoint: host:port, tcp://, http://, https://, unix://."""
    text = text.strip()
    if not text:
        raise ValueError("expected a Docker endpoint, got an empty value")
    if "://" not in text:
        _endpoint_hostport(text, "a plain TCP Docker endpoint")
        return "tcp://" + text
    scheme, _, rest = text.partition("://")
    scheme = scheme.lower()
    if scheme == "unix":
        if not rest.startswith("/"):
            raise ValueError("expected unix:///absolute/path/to/docker.sock")
        return "unix://" + rest
    if scheme in ("tcp", "http", "https"):
        _endpoint_hostport(rest.rstrip("/"), f"{scheme}://")
        return f"{scheme}://{rest.rstrip('/')}"
    raise ValueError(
        f"unknown scheme {scheme!r}: expected host:port, tcp://host:port, "
        "unix:///path or https://host:port"
    )


def parse_master(text: str) -> str | None:
    """Normalise the master endpoint to a base URL without a trailing slash.

    Empty means "not configured": the packaged config ships that way. Credentials in
    the URL are refused rather than masked in every message that names the master:
    the node authenticates with ``secret`` (X-Auth-Node), which is kept out of sight.
    """
    text = text.strip()
    if not text:
        return None
    if USERINFO.match(text):
        raise ValueError(
            "the master URL must not carry credentials (user:password@): the node "
            "authenticates with the 'secret' setting (X-Auth-Node header)"
        )
    if "://" not in text:
        _endpoint_hostport(text, "the master")
        return "http://" + text
    url = urllib.parse.urlsplit(text)
    if url.scheme.lower() not in ("http", "https"):
        raise ValueError(
            f"unknown scheme {url.scheme!r}: expected host:port, http://… or https://…"
        )
    if not url.hostname:
        raise ValueError("expected a host name in the master URL")
    try:
        _ = url.port
    except ValueError as exc:
        raise ValueError(f"bad port in the master URL: {exc}") from None
    if url.query or url.fragment:
        raise ValueError("the master URL must not carry a query or fragment")
    return text.rstrip("/")


def parse_interval(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"expected a whole number of seconds, got {text!r}") from None
    if value < 1:
        raise ValueError(f"expected at least 1 second, got {value}")
    if value > 86400:
        raise ValueError(f"expected at most 86400 seconds (a day), got {value}")
    return value


def parse_log_level(text: str) -> int:
    value = text.strip()
    if value not in ("0", "1", "2"):
        raise ValueError(f"expected 0 (WARNING), 1 (INFO) or 2 (DEBUG), got {text!r}")
    return int(value)


_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected yes/no (true/false, on/off, 1/0), got {text!r}")


def parse_secret(text: str) -> Secret:
    """The secret as it can travel in an HTTP header: Latin-1, no control characters.

    http.client encodes header values as Latin-1 and a control character would split
    or corrupt the header, so either would fail every round; refused here instead.
    The value itself is never echoed: not even in these errors.
    """
    value = text.strip()
    for ch in value:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            raise ValueError("the secret must not contain control characters (line breaks, "
                             "tabs, NUL…): it is sent in the X-Auth-Node HTTP header "
                             "(value not shown)")
        if code > 0xFF:
            raise ValueError("the secret must be Latin-1 text (plain ASCII is safest): it is "
                             "sent in the X-Auth-Node HTTP header, which cannot carry "
                             "other characters (value not shown)")
    return Secret(value)


def parse_optional_path(text: str) -> str | None:
    value = text.strip()
    return value or None


def parse_existing_file(text: str) -> str | None:
    value = text.strip()
    if not value:
        return None
    try:
        is_file = stat.S_ISREG(os.stat(value).st_mode)
    except FileNotFoundError:
        raise ValueError(f"expected an existing file, {value!r} does not exist") from None
    except PermissionError:
        raise ValueError(f"expected a readable file, {value!r} cannot be reached: permission "
                         "denied on a directory above it") from None
    except OSError as exc:
        raise ValueError(f"expected an existing file, {value!r}: {exc.strerror}") from None
    if not is_file:
        raise ValueError(f"expected a file, {value!r} is not a regular file")
    if not os.access(value, os.R_OK):
        raise ValueError(f"expected a readable file, {value!r} cannot be read")
    return value


def parse_address(text: str) -> str | None:
    value = text.strip()
    if not value:
        return None
    scheme, sep, rest = value.partition("://")
    if sep and scheme.lower() in ("http", "https") and rest and "/" not in rest.rstrip("/"):
        return f"{scheme.lower()}://{rest.rstrip('/')}"  # taken as it is by the master
    if any(ch.isspace() for ch in value) or "/" in value:
        raise ValueError(f"expected host, host:port or https://host:port, got {value!r}")
    return value


def parse_time_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("local", "utc"):
        raise ValueError(f"expected 'utc' (with Z) or 'local' (no offset), got {text!r}")
    return value


def parse_patterns(text: str) -> tuple[str, ...]:
    items = tuple(p.strip() for p in re.split(r"[,\s]+", text) if p.strip())
    for item in items:
        try:
            fnmatch.translate(item)
        except re.error as exc:  # pragma: no cover - translate() rarely fails
            raise ValueError(f"bad pattern {item!r}: {exc}") from None
    return items


def parse_listen(text: str) -> str | None:
    """The gateway's ``host:port`` to listen on; ``:port`` means every address. Empty: off."""
    value = text.strip()
    if not value:
        return None
    host, port = _endpoint_hostport(value if not value.startswith(":") else "0.0.0.0" + value,
                                    "the gateway")
    if any(ch.isspace() or ch == "/" for ch in host):
        raise ValueError(f"expected host:port (e.g. 0.0.0.0:8771), got {value!r}")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_BCRYPT = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")


def parse_password_hash(text: str) -> Secret | None:
    """A bcrypt hash (``$2a$``, ``$2b$`` or ``$2y$``), as the Java agent's
    ``dm.auth.adminPassword`` and ``dm-agent hash-password`` write it. Never echoed:
    with the hash, a password can be guessed offline."""
    value = text.strip()
    if not value:
        return None
    match = _BCRYPT.match(value)
    if not match:
        raise ValueError("expected a bcrypt hash: $2a$, $2b$ or $2y$, two cost digits, then "
                         "53 characters (make one with: dm-agent hash-password) (value not shown)")
    if not 4 <= int(match.group(1)) <= 31:
        raise ValueError("the bcrypt cost must be 04 to 31 (value not shown)")
    return Secret(value)


def parse_access(text: str) -> str:
    value = text.strip().lower()
    if value not in ("full", "read-only"):
        raise ValueError(f"expected 'full' or 'read-only', got {text!r}")
    return value


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
    Key("address", parse_address, ""),
    Key("pidfile", parse_optional_path, "", path=True),
    Key("log_file", parse_optional_path, "", path=True),
    Key("docker_tls_ca", parse_existing_file, "", path=True),
    Key("docker_tls_cert", parse_existing_file, "", path=True),
    Key("docker_tls_key", parse_existing_file, "", path=True),
    Key("master_ca", parse_existing_file, "", path=True),
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
)
BY_NAME = {k.name: k for k in KEYS}
#: Keys holding a path: made absolute before use, since a daemon runs in ``/``.
PATH_KEYS = frozenset(k.name for k in KEYS if k.path)


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


#: what an empty setting means, for --check-config: the effective value is found at run time
_EMPTY_MEANS = {
    "address": "default: the Docker TCP host:port, else the IP that routes to the master",
    "master_ca": "default: the system CA store",
}


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
        if not text and source == "default":
            source = _EMPTY_MEANS.get(key.name, source)
        lines.append(f"{key.name} = {text}".rstrip() + f"  ; {source}")
    return "\n".join(lines) + "\n"
