"""``dm-agent migrate``: take a node over from the original agent's own ``install``.

That command left three things: the script at ``/usr/local/bin/<name>.py`` (whose
``default_value`` dict at the top holds the defaults the master substituted: docker,
master, timeout, secret), the unit ``/etc/systemd/system/<name>.service``
(``Type=simple``, ``ExecStart=<script> -v``, an optional ``User=``) and
``/etc/<name>.ini`` with every line but ``[main]`` commented out. Without a takeover,
both agents register the node after ``apt install dm-agent``.

The old settings are read, never run: the script is parsed (``ast``) and only its
``default_value`` literal evaluated (``ast.literal_eval``). Precedence is the original
agent's own: ``ExecStart`` flags > its ini > ``default_value``. They are written into
``/etc/dm-agent.ini`` only while that has no ``master`` (the packaged state), and
validated as ``--check-config`` would first; then the old unit is stopped and disabled,
its files left in place, and ``dm-agent.service`` started.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import NamedTuple

from .. import gateway
from ..config import settings as config
from ..errors import EX_FAILURE, EX_OK, AgentError, ConfigError, UsageError
from ..net import SECRET_MASK
from .parser import Parser, parse_command

UNIT_DIR = "/etc/systemd/system"
SCRIPT_DIR = "/usr/local/bin"
NEW_INI = "/etc/dm-agent.ini"
NEW_UNIT = "dm-agent.service"
GROUP = "dm-agent"
#: keys the original agent had, in the order they are written
KEYS = ("master", "docker", "timeout", "secret", "log_level")
MASK = SECRET_MASK

DESCRIPTION = """\
Take this node over from the original DockMaster agent installed by its `install`
command: read its settings (the ExecStart flags of /etc/systemd/system/<name>.service,
/etc/<name>.ini, the default_value dict of /usr/local/bin/<name>.py, in that order of
precedence), write them into /etc/dm-agent.ini while that has no master set, stop and
disable the old unit (its files are left in place), and start dm-agent.service."""

EPILOG = """\
Exit codes: 0 done (or nothing to do), 1 failure, 64 usage, 78 the old settings are
not valid for dm-agent (nothing changed).
"""


class OldAgent(NamedTuple):
    """The original agent's unit, as its install command left it."""

    name: str
    unit: str
    script: str
    ini: str
    user: str | None
    exec_start: list[str]


class Setting(NamedTuple):
    key: str
    value: str
    source: str


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="dm-agent migrate", description=DESCRIPTION, epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan, change nothing")
    p.add_argument("--name", help="the old agent's name (<name>.service), when there are several")
    return p


def _unit_values(path: str) -> dict[str, str]:
    """ExecStart= and User= of the unit's [Service] (the last assignment wins)."""
    values: dict[str, str] = {}
    section = ""
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().replace("\\\n", " ").splitlines()
    for line in lines:
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def find(unit_dir: str = UNIT_DIR, script_dir: str = SCRIPT_DIR, etc: str = "/etc"
         ) -> list[OldAgent]:
    """Every unit in ``unit_dir`` whose ExecStart runs ``script_dir/<its name>.py``."""
    found = []
    try:
        names = sorted(os.listdir(unit_dir))
    except FileNotFoundError:
        return []
    for entry in names:
        path = os.path.join(unit_dir, entry)
        if not entry.endswith(".service") or not os.path.isfile(path) or \
                os.path.islink(path):
            continue
        name = entry[: -len(".service")]
        try:
            values = _unit_values(path)
            argv = shlex.split(values.get("ExecStart", "").lstrip("-@+!:"))
        except (OSError, ValueError):
            continue
        script = os.path.join(script_dir, name + ".py")
        if argv and argv[0] == script:
            found.append(OldAgent(name, path, script, os.path.join(etc, name + ".ini"),
                                  values.get("User") or None, argv))
    return found


def default_value(script: str) -> dict[str, object]:
    """The script's top-level ``default_value`` dict, parsed, never executed."""
    try:
        with open(script, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {script}: {exc.strerror}") from None
    try:
        tree = ast.parse(text, filename=script)
    except SyntaxError as exc:
        raise ConfigError(f"{script}: not Python this program can parse ({exc.msg}, line "
                          f"{exc.lineno}); its default_value was not read") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "default_value" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                raise ConfigError(f"{script} line {node.lineno}: default_value is not a "
                                  "literal dict; it was not evaluated") from None
            if not isinstance(value, dict):
                raise ConfigError(f"{script} line {node.lineno}: default_value is not a dict")
            return value
    return {}


def _flags(argv: Sequence[str]) -> tuple[dict[str, str], str | None, list[str]]:
    """The original's flags on ExecStart: (settings, -f, what was not understood)."""
    p = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    p.add_argument("-d", "--docker")
    p.add_argument("-m", "--master")
    p.add_argument("-t", "--timeout")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-f", "--config")
    try:
        args, rest = p.parse_known_args(list(argv))
    except argparse.ArgumentError as exc:
        return {}, None, [str(exc)]
    values = {k: getattr(args, k) for k in ("docker", "master", "timeout")
              if getattr(args, k) is not None}
    if args.verbose:
        values["log_level"] = str(min(args.verbose, 2))
    return values, args.config, rest


def read_settings(old: OldAgent) -> tuple[list[Setting], list[str]]:
    """The old agent's effective settings and notes on what was not taken over."""
    notes: list[str] = []
    flags, ini, rest = _flags(old.exec_start[1:])
    if rest:
        notes.append(f"ExecStart of {old.unit}: not taken over: {' '.join(rest)}")
    ini = ini or old.ini
    from_ini: dict[str, str] = {}
    if os.path.exists(ini):
        parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
        try:
            with open(ini, encoding="utf-8") as fh:
                parser.read_file(fh, source=ini)
        except (OSError, UnicodeDecodeError, configparser.Error) as exc:
            raise ConfigError(f"cannot read {ini}: {str(exc).splitlines()[0]}") from None
        if parser.has_section("main"):
            for key, value in parser.items("main"):
                if key in KEYS and value.strip():
                    from_ini[key] = value.strip()
                elif key not in KEYS:
                    notes.append(f"{ini} [main] {key}: not a setting dm-agent has, left")
    else:
        notes.append(f"{ini} does not exist; settings from the unit and the script only")
    defaults = {str(k): v for k, v in default_value(old.script).items()
                if v is not None and str(v).strip() != ""}
    settings = []
    for key in KEYS:
        if key in flags:
            settings.append(Setting(key, flags[key], f"ExecStart of {old.unit}"))
        elif key in from_ini:
            settings.append(Setting(key, from_ini[key], f"{ini} [main] {key}"))
        elif key in defaults:
            settings.append(Setting(key, str(defaults[key]).strip(),
                                    f"default_value of {old.script}"))
    for key in sorted(set(defaults) - set(KEYS)):
        notes.append(f"default_value of {old.script}: {key!r} is not a setting dm-agent "
                     "has, left")
    return settings, notes


def _show(s: Setting) -> str:
    return f"{s.key} = {MASK if s.key == 'secret' else s.value}"


def _is_configured(path: str) -> tuple[bool, dict[str, str]]:
    try:
        values, _ = config.read_file(path)
    except ConfigError as exc:
        if "does not exist" in str(exc):
            return False, {}
        raise
    return bool(values.get("master", "").strip()), values


def new_text(current: str, settings: Sequence[Setting], origin: str) -> str:
    """``current`` with the settings appended to its [main] section."""
    block = [f"\n# --- taken over from {origin} by dm-agent migrate ---"]
    block += [f"{s.key} = {s.value}" for s in settings]
    lines = current.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == "[main]"), None)
    if start is None:
        return current.rstrip("\n") + "\n\n[main]" + "\n".join(block) + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")),
               len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    out = lines[:end] + block + lines[end:]
    return "\n".join(out) + "\n"


def _group_id() -> int:
    import grp

    try:
        return grp.getgrnam(GROUP).gr_gid
    except KeyError:
        return 0


def write_config(path: str, text: str) -> None:
    """Replace ``path`` atomically, keeping its mode and owner (0640 root:dm-agent for a
    new one): it holds the secret, so it is never readable by others, not for a moment."""
    try:
        st = os.stat(path)
        mode, uid, gid = st.st_mode & 0o7777, st.st_uid, st.st_gid
    except FileNotFoundError:
        mode, uid, gid = 0o640, 0, _group_id()
    fd, tmp = tempfile.mkstemp(prefix=".dm-agent.ini.", dir=os.path.dirname(path) or ".")
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
        raise


def _validate(text: str, where: str) -> None:
    """What --check-config would say of ``text``, before it replaces anything."""
    with tempfile.NamedTemporaryFile("w", suffix=".ini", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        try:
            settings, _ = config.load({}, fh.name, env={})
            gateway.check(settings)
            settings.require_master()
        except ConfigError as exc:
            raise ConfigError(f"the old settings are not valid for dm-agent, nothing was "
                              f"changed: {str(exc).replace(fh.name, where)}") from None


def systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120)


def _unit_state(unit: str) -> tuple[str, str]:
    active = systemctl("is-active", unit).stdout.strip() or "unknown"
    enabled = systemctl("is-enabled", unit).stdout.strip() or "unknown"
    return active, enabled


def run(args: argparse.Namespace, out: list[str]) -> int:
    """Do (or with --dry-run, plan) the takeover; what it did goes into ``out``."""
    olds = find()
    if args.name:
        olds = [o for o in olds if o.name == args.name]
    if not olds:
        what = f"{args.name}.service" if args.name else "no unit"
        out.append(f"nothing to do: {what} in {UNIT_DIR} runs {SCRIPT_DIR}/<name>.py "
                   "(the original agent's install)")
        return EX_OK
    if len(olds) > 1:
        raise UsageError("several units of the original agent: "
                         + ", ".join(o.name for o in olds) + "; choose one with --name")
    old = olds[0]
    say = "would " if args.dry_run else ""
    out.append(f"found the original agent: {old.unit} (ExecStart={shlex.join(old.exec_start)}"
               f"{', User=' + old.user if old.user else ''})")
    settings, notes = read_settings(old)
    configured, existing = _is_configured(NEW_INI)
    if configured:
        out.append(f"left {NEW_INI} as it is: it is configured already "
                   f"(master = {existing.get('master', '').strip()})")
        written = False
    else:
        kept = [s for s in settings if existing.get(s.key, "").strip()]
        todo = [s for s in settings if not existing.get(s.key, "").strip()]
        for s in kept:
            out.append(f"kept {s.key} of {NEW_INI} over {_show(s)} from {s.source}")
        try:
            with open(NEW_INI, encoding="utf-8") as fh:
                current = fh.read()
        except FileNotFoundError:
            current = "[main]\n"
        text = new_text(current, todo, old.unit)
        _validate(text, NEW_INI)
        for s in todo:
            out.append(f"{say}write {_show(s)} into {NEW_INI} (from {s.source})")
        if not args.dry_run:
            write_config(NEW_INI, text)
        written = True
    out.extend(f"note: {n}" for n in notes)
    active, enabled = _unit_state(old.name + ".service")
    unit = old.name + ".service"
    if args.dry_run:
        out.append(f"would stop and disable {unit} (now {active}, {enabled})")
        out.append(f"would {'restart' if written else 'start'} {NEW_UNIT}")
    else:
        done = systemctl("disable", "--now", unit)
        if done.returncode != 0:
            raise AgentError(f"systemctl disable --now {unit} failed: "
                             f"{done.stderr.strip() or done.stdout.strip()}")
        out.append(f"stopped and disabled {unit} (was {active}, {enabled})")
        started = systemctl("restart" if written else "start", NEW_UNIT)
        if started.returncode != 0:
            raise AgentError(f"{unit} is stopped, but {NEW_UNIT} did not start: "
                             f"{started.stderr.strip()}; see journalctl -u {NEW_UNIT}")
        out.append(f"{'restarted' if written else 'started'} {NEW_UNIT}; check it with: "
                   "dm-agent status")
    left = [old.unit, old.script] + ([old.ini] if os.path.exists(old.ini) else [])
    out.append(f"{'would leave' if args.dry_run else 'left'} in place: {', '.join(left)} "
               f"(remove them once dm-agent runs: rm {' '.join(left)}; "
               "systemctl daemon-reload)")
    return EX_OK


def main(argv: Sequence[str]) -> int:
    args = parse_command(parser(), argv)
    if isinstance(args, int):
        return args
    out: list[str] = []
    error = None
    try:
        if os.geteuid() != 0 and not args.dry_run:
            raise AgentError("must run as root: it writes /etc/dm-agent.ini and stops units")
        code = run(args, out)
    except AgentError as exc:
        code, error = exc.exit_code, str(exc)
    except OSError as exc:
        code, error = EX_FAILURE, str(exc)
    for line in out:  # what was done (or planned) before any failure
        print(line)
    if error is not None:
        print(f"dm-agent migrate: {error}", file=sys.stderr)
    return code
