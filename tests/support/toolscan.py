"""Which programs the build and the tests run, and which Debian package each comes from.

A fresh machine has only what Debian's required packages and `.ci/deps` install (and
python3, which `.ci/run` ensures). A tool that happens to be on the machine where a
change was made, but that no line of `.ci/deps` names, makes `make check` fail on the
next fresh machine (issue 26: the host's `strip` reads x86-64 only; it passed where
binutils-multiarch had been installed by hand). So every program a script or a test
runs must come from a package `.ci/deps` names, or from a package of priority
`required`, which every Debian system has.

What is read, as text (nothing is run):
- the shell scripts (packaging/*.sh, .ci/*, the postinst, debian/rules): the first word
  of every simple command, outside comments, quotes without a command substitution,
  heredoc bodies and array literals (those name packages of a root, not programs run
  here); the script's own functions are left out;
- the Python files of tests/, bench/ and packaging/: a list or tuple literal of two or
  more items whose first item is a program's name (or absolute path), the shape of an
  argv, and ``shutil.which("NAME")``.

A word is a program when ``shutil.which`` finds it on this machine, on the PATH plus the
sbin directories, as root's PATH has them (the build runs as root; an unprivileged user,
who runs this test in the fast tier, has no sbin on its PATH); what it does not
find is a function, a word of prose, or a program run inside a booted root (which has
its own packages). That is why the test runs after `.ci/deps`: on a machine where a
named package is missing, its programs are not found here, and the build fails loudly
on its own.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

#: shell words that are not programs: keywords and builtins (bash's `help` lists them)
_BASH_HELP = """
if then else elif fi for while until do done case esac in function select time
return local declare typeset export readonly set unset shift exit echo printf read cd
pwd trap eval exec source true false test wait kill command type hash builtin let
getopts mapfile readarray pushd popd dirs shopt ulimit umask alias unalias break
continue jobs disown enable help caller compgen complete fc bg fg history logout suspend
"""
SHELL_WORDS = frozenset(_BASH_HELP.split())

_WORD = re.compile(r"[a-z][a-z0-9_.+-]*|/(?:usr/)?s?bin/[a-z][a-z0-9_.+-]*")
# where a new simple command starts
_SPLIT = re.compile(r"\$\(|&&|\|\||[;|&(){}`!]|\b(?:then|do|else|elif|if|while|until|"
                    r"exec|time|xargs|nice|env|timeout|setpriv|runuser|unshare|flock)\b")
_FUNC = re.compile(r"^\s*(?:function\s+)?([A-Za-z_][\w-]*)\s*\(\)\s*\{?", re.M)
_HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
_ARRAY_OPEN = re.compile(r"^\s*(?:local\s+|declare\s+-a\s+)?\w+(?:\+)?=\(")


@dataclass
class Found:
    """Where each program word was seen: word -> ["file:line", ...]."""

    places: dict[str, list[str]] = field(default_factory=dict)

    def add(self, word: str, place: str) -> None:
        self.places.setdefault(word, []).append(place)


def _strip_quotes(line: str) -> str:
    """Single-quoted text and double-quoted text without a command substitution go: what
    they hold is data, not a command (a "$(cmd)" keeps its command)."""
    line = re.sub(r"'[^']*'", "''", line)
    return re.sub(r'"([^"$]|\$(?!\())*"', '""', line)


def scan_shell(path: Path, name: str, found: Found) -> None:
    text = path.read_text()
    functions = set(_FUNC.findall(text))
    heredoc: str | None = None
    in_array = False
    for number, raw in enumerate(text.splitlines(), 1):
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        if in_array:
            in_array = ")" not in raw.split("#", 1)[0]
            continue
        code = raw.split("#", 1)[0].rstrip()
        if _ARRAY_OPEN.match(code) and ")" not in code:
            in_array = True
            continue
        marker = _HEREDOC.search(raw)
        if marker:
            heredoc = marker.group(1)
        line = _strip_quotes(raw)
        line = re.sub(r"(^|\s)#.*", "", line)
        line = re.sub(r"\b\w+=\([^)]*\)", "", line)  # a one-line array literal
        for part in _SPLIT.split(line):
            words = part.split()
            while words and re.match(r"^\w+\+?=", words[0]):
                words.pop(0)
            if not words:
                continue
            word = words[0]
            if _WORD.fullmatch(word) and word not in SHELL_WORDS and word not in functions:
                found.add(word, f"{name}:{number}")


def scan_python(path: Path, name: str, found: Found) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple)) and len(node.elts) > 1:
            first = node.elts[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str) \
                    and _WORD.fullmatch(first.value):
                found.add(first.value, f"{name}:{node.lineno}")
        elif isinstance(node, ast.Call) and node.args \
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "which":
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(arg.value, f"{name}:{node.lineno}")


def scan_tree(root: Path) -> Found:
    found = Found()
    shell = [*root.glob("packaging/*.sh"), *root.glob(".ci/*"), root / "debian/rules",
             *root.glob("debian/*.postinst")]
    for path in sorted(p for p in shell if p.is_file()):
        scan_shell(path, str(path.relative_to(root)), found)
    for folder in ("tests", "bench", "packaging"):
        for path in sorted((root / folder).rglob("*.py")):
            scan_python(path, str(path.relative_to(root)), found)
    return found


def ci_deps_packages(deps: Path) -> set[str]:
    """The package names of `.ci/deps`'s ``packages=( … )`` array."""
    names: set[str] = set()
    inside = False
    for line in deps.read_text().splitlines():
        if line.strip() == "packages=(":
            inside = True
            continue
        if inside and line.strip() == ")":
            break
        if inside:
            names.update(line.split("#", 1)[0].split())
    if not names:
        raise ValueError(f"{deps}: no packages=( … ) array found")
    return names


def _spellings(path: str) -> list[str]:
    """The names dpkg may know a file by: as found, resolved, and across usrmerge
    (/bin/x is /usr/bin/x)."""
    names: list[str] = []
    for p in (path, os.path.realpath(path)):
        names += [p, p.removeprefix("/usr") if p.startswith("/usr/") else "/usr" + p]
    return list(dict.fromkeys(names))


#: the sbin directories of root's PATH, searched after the PATH (see the module's doc)
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def which(word: str) -> str | None:
    """``shutil.which`` as root finds a program, whoever asks."""
    return shutil.which(word, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def owners(programs: Iterable[str]) -> dict[str, str | None]:
    """program -> the Debian package that installed the file it resolves to; "" when no
    package did (installed by hand); None when this machine has no such program. One
    dpkg-query for all of them."""
    paths = {w: which(w) for w in programs}
    spelled: dict[str, list[str]] = {}
    for word, path in paths.items():
        for name in _spellings(path) if path else ():
            spelled.setdefault(name, []).append(word)
    proc = subprocess.run(["dpkg-query", "-S", *spelled], capture_output=True, text=True)
    found: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("diversion "):
            continue
        packages, _, file = line.partition(": ")
        for word in spelled.get(file.strip(), ()):
            found.setdefault(word, packages.split(",")[0].split(":")[0].strip())
    return {w: (found.get(w, "") if p else None) for w, p in paths.items()}


def priorities(packages: Iterable[str]) -> dict[str, str]:
    names = sorted(set(packages))
    if not names:
        return {}
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Priority}\n", *names],
                          capture_output=True, text=True)
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


@dataclass
class Verdict:
    named: dict[str, str] = field(default_factory=dict)        # program -> package
    required: dict[str, str] = field(default_factory=dict)     # program -> package
    unnamed: dict[str, str] = field(default_factory=dict)      # program -> package
    outside: dict[str, str] = field(default_factory=dict)      # program -> its path


def judge(found: Found, packages: set[str], exempt: Iterable[str] = ()) -> Verdict:
    """Sort every program found: from a package `.ci/deps` names, from a required
    package, from another package (a missing line in `.ci/deps`), or from no package at
    all (installed by hand: nothing on a fresh machine has it)."""
    verdict = Verdict()
    by_word = owners(w for w in found.places if w not in set(exempt))
    priority = priorities(p for p in by_word.values() if p)
    for word, package in sorted(by_word.items()):
        if package is None:
            continue  # not on this machine: a function, prose, or run inside a root
        if package == "":
            verdict.outside[word] = str(which(word))
        elif package in packages:
            verdict.named[word] = package
        elif priority.get(package) == "required":
            verdict.required[word] = package
        else:
            verdict.unnamed[word] = package
    return verdict
