"""The program agrees with its documents: every key, flag, exit code, subcommand and
environment variable is in ``--help``, the synopses, the man page and
docs/configuration.md where it belongs; the fields and failure kinds of ``status --json``
are in the operator's guide as the code has them; its troubleshooting quotes what the code
prints, and every outage message has an entry; each figure a document quotes is the
generated one (docs/figures.json), the test counts the suite's; and every Markdown link
inside the repository resolves (files and #anchors). No root."""

from __future__ import annotations

import argparse
import ast
import re
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from agentproc import NO_DOCKER, run
from support.gateway import free_port

from dm_agent import cli, errors, net
from dm_agent.commands import hash_password, migrate, status, tunnel_key
from dm_agent.config import settings as config
from dm_agent.process import loop, runner
from dm_agent.process.signals import Waker
from dm_agent.process.state import StateWriter
from dm_agent.round.agent import Agent, Outcome

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import figures  # noqa: E402  (bench/figures.py: the one source of the quoted figures)

MAN = ROOT / "packaging" / "dm-agent.8"
REFERENCE = ROOT / "docs" / "configuration.md"
OPERATOR = ROOT / "docs" / "operator-guide.md"
INI = ROOT / "dm_agent" / "data" / "dm-agent.ini"
#: the agent's own exit codes (errors.py), and those of the subcommands, which return
#: literals (status.py's docstring and the man page's STATUS list them)
AGENT_CODES = sorted({errors.EX_OK, errors.EX_FAILURE, errors.EX_USAGE, errors.EX_TEMPFAIL,
                      errors.EX_CONFIG})
STATUS_CODES = [0, 1, 2, 3, 4]
#: directories that hold no document of the project (caches, builds, virtualenvs)
SKIP_DIRS = {".git", ".venv", "build", "dist", "node_modules", ".mypy_cache", ".ruff_cache",
             ".pytest_cache", ".hypothesis"}


def man_text() -> str:
    """The man page as words: roff's escaped hyphens and font changes undone."""
    text = MAN.read_text(encoding="utf-8")
    text = text.replace("\\-", "-").replace("\\(mu", "×")
    return re.sub(r"\\f[BIRP]|\\c", "", text)


def flags(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings]


@pytest.fixture(scope="module")
def help_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    proc = run(["--help"], tmp_path_factory.mktemp("help"))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def status_help(tmp_path_factory: pytest.TempPathFactory) -> str:
    proc = run(["status", "--help"], tmp_path_factory.mktemp("status-help"))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def reference() -> str:
    return REFERENCE.read_text(encoding="utf-8")


def missing(words: list[str], text: str, pattern: str = r"(?<![\w-]){}(?![\w-])") -> list[str]:
    return [w for w in words if not re.search(pattern.format(re.escape(w)), text)]


KEYS = [k.name for k in config.KEYS]


def test_every_key_is_documented(help_text: str, reference: str) -> None:
    # --help lists each key with its default; the man page and the reference describe it
    assert missing(KEYS, help_text) == []
    assert missing(KEYS, man_text()) == []
    assert missing(KEYS, reference, r"\| `{}` \|") == [], "a key without its row"


def test_help_shows_each_default(help_text: str) -> None:
    for key in config.KEYS:
        keys = help_text.split("Keys of [main]")[1]
        shown = re.search(rf"(?m)^  {key.name} = (.+)$", keys)
        assert shown, key.name
        assert key.default in shown.group(1) if key.default else shown.group(1), key.name
    assert "${XDG_CONFIG_HOME:-$HOME/.config}/dm-agent.ini" in help_text


def test_every_flag_is_documented(help_text: str, status_help: str, reference: str) -> None:
    agent_flags = flags(cli.parser())
    assert missing(agent_flags, help_text) == []
    assert missing(agent_flags, man_text()) == []
    assert missing(agent_flags, reference, "`{}`") == []
    for sub in (status.parser(), migrate.parser()):
        assert missing(flags(sub), man_text()) == []
        assert missing(flags(sub), reference) == []
    assert missing(flags(status.parser()), status_help) == []


def test_every_exit_code_is_documented(help_text: str, reference: str) -> None:
    man = man_text()
    for code in AGENT_CODES:
        assert re.search(rf"\b{code}\b", help_text.split("Exit codes:")[1]), code
        assert re.search(rf"^\.B {code}$", man, re.M), code
        assert re.search(rf"^\| {code} \|", reference, re.M), code
    for code in STATUS_CODES:
        assert re.search(rf"^\.B {code}$", man.split(".SH STATUS")[1], re.M), code
        assert re.search(rf"^\| {code} \|[^|]*\|[^|]*\w[^|]*\|", reference, re.M), code


def test_every_subcommand_is_documented(help_text: str, reference: str) -> None:
    man = man_text()
    for name in cli.COMMANDS:
        assert f"dm-agent {name}" in help_text, name
        assert f'.SY "dm-agent {name}"' in man, name
        assert re.search(rf"^\| `{name}` \|", reference, re.M), name


def synopsis_flags(parser: argparse.ArgumentParser) -> list[list[str]]:
    """Each option of ``parser`` as its spellings (a synopsis shows one of them)."""
    return [action.option_strings for action in parser._actions if action.option_strings]


def test_the_synopses_name_every_flag_and_subcommand(reference: str) -> None:
    """The reference's synopsis block and the man page's SYNOPSIS: --gateway and
    hash-password were missing from both."""
    synopsis = reference.split("## Command line")[1].split("| flag |")[0]
    man = man_text().split(".SH SYNOPSIS")[1].split(".SH DESCRIPTION")[0]
    subcommands = {"status": status.parser(), "migrate": migrate.parser(),
                   "hash-password": hash_password.parser(),
                   "tunnel-key": tunnel_key.parser()}
    assert set(subcommands) == set(cli.COMMANDS)
    for text in (synopsis, man):
        for spellings in synopsis_flags(cli.parser()):
            assert any(re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)
                       for f in spellings), spellings
        for name, sub in subcommands.items():
            line = next((ln for ln in text.split("dm-agent ")[1:] if ln.startswith(name)), "")
            if text is man:  # .SY "dm-agent NAME" then its .OP lines up to .YS
                line = man.split(f'.SY "dm-agent {name}"')[1].split(".YS")[0]
            assert line, name
            for spellings in synopsis_flags(sub):
                if "--help" not in spellings:
                    assert any(f in line for f in spellings), (name, spellings)


def environment_read() -> set[str]:
    """Every environment variable the code reads by name, the aliases of keys, and those
    it warns about (``net.IGNORED_ENVIRONMENT``)."""
    names: set[str] = set()
    for path in (ROOT / "dm_agent").rglob("*.py"):
        names.update(re.findall(r"(?:environ|env)(?:\.get\(|\[)\"([A-Za-z_]+)\"",
                                path.read_text(encoding="utf-8")))
    names.update(alias for key in config.KEYS for alias in key.aliases)
    names.update(net.IGNORED_ENVIRONMENT)
    return names - {"HOME"}  # everyone's


def test_every_environment_variable_is_documented(reference: str) -> None:
    env_table = reference.split("## Environment")[1].split("\n## ")[0]
    man_env = man_text().split(".SH ENVIRONMENT")[1].split(".SH FILES")[0]
    names = environment_read()
    assert {"STATE_DIRECTORY", "XDG_STATE_HOME", "dm_agent_notifier_server"} <= names
    assert missing(sorted(names), env_table, "`{}`") == []
    assert missing(sorted(names), man_env) == []


def credential_keys(tmp_path: Path) -> set[str]:
    """The keys the agent takes from ``$CREDENTIALS_DIRECTORY/<key>``, found by offering
    each key there in turn."""
    creds = tmp_path / "creds"
    creds.mkdir()
    ini = tmp_path / "d.ini"
    ini.write_text("[main]\nmaster = 127.0.0.1:9\n")
    found = set()
    for key in config.KEYS:
        for old in creds.iterdir():
            old.unlink()
        (creds / key.name).write_text("x\n")
        try:
            settings, _ = config.load({}, str(ini), {"CREDENTIALS_DIRECTORY": str(creds)})
        except errors.ConfigError as exc:
            if "systemd credential" in str(exc):
                found.add(key.name)
            continue
        if settings.sources[key.name].startswith("systemd credential"):
            found.add(key.name)
    return found


def test_every_credential_is_documented_with_what_the_unit_allows(
        tmp_path: Path, reference: str) -> None:
    """The reference named only the secret; the packaged ini called the hash "better as
    the systemd credential", which skips the start under the packaged unit, whose
    ExecCondition= check gets no credentials (docs/gateway.md). Every credential the
    code reads is named in the reference and the man page; every one but the secret
    (which the check does not need) is said there and in the ini to belong in the file."""
    keys = credential_keys(tmp_path)
    assert "secret" in keys and "gateway_password_hash" in keys
    row = next(ln for ln in reference.splitlines() if ln.startswith("| `CREDENTIALS_DIRECTORY`"))
    man = man_text().split(".B CREDENTIALS_DIRECTORY")[1].split(".TP")[0]
    unit = (ROOT / "systemd" / "dm-agent.service").read_text()
    assert "ExecCondition=/usr/bin/dm-agent --check-config" in unit
    ini = INI.read_text()
    for key in sorted(keys):
        assert f"`{key}`" in row and key in man, key
        if key != "secret":
            comment = ini.split(f"#{key} =")[0].rsplit("\n\n", 1)[-1]
            assert "ExecCondition" in comment and "Better as" not in comment, comment
            assert "ExecCondition" in row


# --- status --json: its fields and the failure kinds -----------------------------------

def table_rows(text: str, caption: str) -> dict[str, str]:
    """The table after ``caption``: each name in backticks in a row's first column, and
    that row."""
    rows: dict[str, str] = {}
    lines = text.split(caption, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    for line in lines[start + 2:]:  # after the header and its rule
        if not line.startswith("|"):
            break
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            rows[name] = line
    return rows


def keys_under(value: Any) -> set[str]:
    """Every key of the dicts in ``value``, at any depth (through lists too)."""
    if isinstance(value, dict):
        return set(value).union(*(keys_under(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(keys_under(v) for v in value))
    return set()


def tls_get(port: int, password: str) -> int:
    """One HTTPS request to the gateway with a Basic password; its status code."""
    import base64

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    token = base64.b64encode(f"admin:{password}".encode()).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw) as tls:
        tls.sendall(f"GET /_ping HTTP/1.1\r\nHost: n\r\nAuthorization: Basic {token}\r\n"
                    "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


@pytest.fixture(scope="module")
def real_state(tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(the state file, status --json) of a real agent with its real services: the
    gateway listening with a self-issued certificate, one failed login, a round that
    succeeded and one that failed."""
    import bcrypt

    tmp = tmp_path_factory.mktemp("state")
    port = free_port()
    hashed = bcrypt.hashpw(b"docs-password", bcrypt.gensalt(4)).decode()
    ini = tmp / "dm-agent.ini"
    ini.write_text(f"[main]\nmaster = 127.0.0.1:9\ndocker = {NO_DOCKER}\n"
                   f"gateway = 127.0.0.1:{port}\ngateway_password_hash = {hashed}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STATE_DIRECTORY", str(tmp / "state"))  # the self-issued certificate
        settings, _ = config.load({}, str(ini), {})
        agent = Agent(settings, dry_run=True)
        services = runner.build_services(agent, loop.Nudges(Waker()))
        services.start()
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if tls_get(port, "wrong") == 401:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "the gateway did not answer"
                time.sleep(0.1)
            writer = StateWriter(str(tmp / "dm-agent.state.json"), services=services)
            writer.round_done(agent, Outcome(agent.build_body(agent.parts), None), 0.1)
            writer.round_done(agent, Outcome(None, ("http", "master answered HTTP 500")), 0.1)
            now = time.time()
            state = writer.snapshot(agent, now)
        finally:
            services.stop()
            agent.close()
    res = status.Result(status.REGISTERED, "registered", "m", "p", "s", 1, state)
    yield state, status.to_json(res, now)


def test_status_json_fields_are_the_documented_ones(
        real_state: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """Both ways: every field the code writes has its row (address, unmanaged and the
    gateway object had none), and every row is a field the code writes; each field of a
    nested object is named in its row."""
    state, outer = real_state
    guide = OPERATOR.read_text(encoding="utf-8")
    json_rows = table_rows(guide, "**`--json`** prints one object")
    state_rows = table_rows(guide, "The state file (`state`")
    assert sorted(set(outer) ^ set(json_rows)) == []
    assert sorted(set(state) ^ set(state_rows)) == []
    assert state["gateway"]["auth_failures"]["recent"], "no failed login to describe"
    for key, value in state.items():
        assert missing(sorted(keys_under(value)), state_rows[key], "`{}`") == [], key


def test_the_failure_kinds_are_the_codes() -> None:
    """The kinds the state file's last_failure can carry (errors.FailureKind: MasterKind,
    RoundKind and the internal: prefix), each in the guide's row: it listed six of nine."""
    guide = OPERATOR.read_text(encoding="utf-8")
    row = table_rows(guide, "The state file (`state`")["last_failure"]
    kinds = [*get_args(errors.MasterKind), *get_args(errors.RoundKind),
             errors.INTERNAL_KIND + "<Name>"]
    assert missing(kinds, row, "`{}`") == []


# --- troubleshooting against the messages the code prints -------------------------------

def literal_parts(node: ast.AST) -> list[str]:
    """The literal text of a message expression: a string, an f-string's constant parts,
    the left side of ``"…" + …``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values
                if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return literal_parts(node.left)
    return []


def code_strings() -> list[str]:
    """Every literal string of the package, f-strings' constant parts included."""
    out = []
    for path in (ROOT / "dm_agent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Constant, ast.JoinedStr)):
                out += [" ".join(p.split()) for p in literal_parts(node)]
    return [p for p in out if len(p) >= 6]


def outage_messages() -> list[str]:
    """The words of each message a Docker or master outage begins with: the literal
    parts of every DockerError and ReportError message (those of 10 characters and
    more, else its longest)."""
    found = []
    for name in ("collectors/docker.py", "round/reporter.py"):
        tree = ast.parse((ROOT / "dm_agent" / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("DockerError", "ReportError")):
                continue
            args = [*node.args, *(k.value for k in node.keywords if k.arg == "message")]
            parts = [" ".join(p.split()) for p in literal_parts(args[0])]
            found += [p for p in parts if len(p) >= 10] or [max(parts, key=len)]
    return found


def troubleshooting() -> tuple[str, list[str]]:
    """The troubleshooting section (white space collapsed) and its headings."""
    text = OPERATOR.read_text(encoding="utf-8").split("## Troubleshooting")[1]
    text = text.split("\n## ")[0]
    headings = re.findall(r"^### (.+)$", text, re.M)
    return " ".join(text.split()), headings


#: headings that quote no message of the agent: systemd's own status, and a pointer
NOT_THE_AGENTS = {"226/NAMESPACE"}


def test_troubleshooting_headings_quote_what_the_code_prints() -> None:
    """A heading is found by the words of the message; reworded in the code, it would
    not be found any more. Each quoted phrase (… for what varies) must share its words
    with a literal of the code."""
    strings = code_strings()
    _, headings = troubleshooting()
    unmatched = []
    for heading in headings:
        for phrase in re.findall(r"`([^`]+)`", heading):
            if phrase in NOT_THE_AGENTS:
                continue
            frags = [f.strip() for f in phrase.split("…") if len(f.strip()) >= 6]
            if not any(f in s or s in f for f in frags for s in strings):
                unmatched.append(phrase)
    assert unmatched == []
    assert any("Docker at … failed: …" in h for h in headings)


def test_every_outage_message_has_a_troubleshooting_entry() -> None:
    """What a dead dockerd under a running agent prints (`Docker at … failed: …`) had no
    entry: each message an outage of Docker or the master begins with is findable there."""
    text, _ = troubleshooting()
    messages = outage_messages()
    assert len(messages) >= 15
    assert [m for m in messages if m not in text] == []


# --- figures ----------------------------------------------------------------------------

def test_every_quoted_figure_is_the_generated_one() -> None:
    figs = figures.load()
    wrong, quoted, bare = [], 0, []
    for doc in figures.documents():
        text = doc.read_text(encoding="utf-8")
        for key, shown in figures.QUOTE.findall(text):
            quoted += 1
            if key not in figs or figs[key]["text"] != shown:
                wrong.append(f"{doc.relative_to(ROOT)}: {key} = {shown!r}, "
                             f"docs/figures.json: {figs.get(key, {}).get('text')!r}")
        # a count of the tests outside a quote goes stale unseen (562 did)
        bare += [f"{doc.relative_to(ROOT)}: {m}" for m in
                 re.findall(r"\b\d[\d,]* (?:tests|passed)\b", figures.QUOTE.sub("", text))]
    assert quoted >= 10
    assert wrong == [], "python bench/figures.py docs rewrites them"
    assert bare == []


def test_the_test_counts_are_the_suites() -> None:
    """The counts docs/figures.json holds, against a collection of the suite now."""
    recorded = {k: int(v["text"]) for k, v in figures.load().items() if k.startswith("tests.")}
    assert recorded == figures.counts(), "run make figures"


# --- links -------------------------------------------------------------------------

def documents() -> list[Path]:
    found = []
    for path in ROOT.rglob("*.md"):
        if not SKIP_DIRS.intersection(path.relative_to(ROOT).parts):
            found.append(path)
    return sorted(found)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*]|\[([^]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"#{1,6} (.+)", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # code is not a link
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_markdown_links_resolve() -> None:
    broken = []
    docs = documents()
    assert ROOT / "README.md" in docs and ROOT / "docs" / "design.md" in docs
    for doc in docs:
        for target in links(doc):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_slug_follows_github() -> None:
    assert slug("Status: `dm-agent status`") == "status-dm-agent-status"
    assert slug("Ansible: the `dm_agent` role") == "ansible-the-dm_agent-role"
    assert slug("1. Wire protocol (the master's side is fixed: match it exactly)") == (
        "1-wire-protocol-the-masters-side-is-fixed-match-it-exactly")
