"""The program agrees with its documents: every key, flag, exit code and subcommand is in
``--help``, the man page and docs/configuration.md where it belongs, and every Markdown
link inside the repository resolves (files and #anchors). Fast, no root."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from agentproc import run

from dm_agent import cli, errors
from dm_agent.commands import migrate, status
from dm_agent.config import settings as config

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "packaging" / "dm-agent.8"
REFERENCE = ROOT / "docs" / "configuration.md"
#: the agent's own exit codes (errors.py), and those of the subcommands, which return
#: literals (status.py's docstring and the man page's STATUS list them)
AGENT_CODES = sorted({errors.EX_OK, errors.EX_FAILURE, errors.EX_USAGE, errors.EX_TEMPFAIL,
                      errors.EX_CONFIG})
STATUS_CODES = [0, 1, 3, 4]
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
