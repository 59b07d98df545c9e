"""The value converters of the settings: each takes a key's raw text (from the command line,
the environment, the file or the default) and returns the value, or raises ValueError
saying what is expected. Pure: nothing here knows where the text came from, which
``settings.load`` adds to the message (docs/design.md §3)."""

from __future__ import annotations

import fnmatch
import os
import re
import stat
import urllib.parse

from ..net import SECRET_MASK, USERINFO


class Secret(str):
    """A string whose repr never shows its value."""

    def __repr__(self) -> str:
        return "Secret('" + SECRET_MASK + "')"


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
