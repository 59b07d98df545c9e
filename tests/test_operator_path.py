"""The README's operator path, exactly as the README writes it, on a fresh Debian 12 node.

The shell blocks of the README's *Install* (Debian and Ubuntu), *Configure*, *Start* and
*Verify* sections are read from README.md and run in order, one command at a time, in a
booted Debian 12 root (``bookworm-operator``: the lifecycle's root plus curl). Only the
addresses change: the repository URL points at this test's loopback HTTP server, which
serves dist/repo as build-repo.sh made it (the same packages as the lifecycle tests), and
the master's example address at this test's strict master. Each step is checked, and the
journal, at the packaged default level, holds the start line and the first accepted
registration.

The node's Docker is a private real dockerd of this test, its socket bound at
/var/run/docker.sock (a node has Docker before it gets dm-agent).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import fleet, lifecycle, nspawn
from support.dockerd import Dockerd, populate
from support.lifecycle import INI, Node
from support.master import Master

pytestmark = pytest.mark.system

README = Path(__file__).resolve().parents[1] / "README.md"
#: the README's example addresses, and what this test puts in their place
EXAMPLE_REPO = "https://packages.example.com/dm-agent"
EXAMPLE_MASTER = "10.0.0.3:8761"
NODE_NAME = "dm-operator-node"
#: the sections of the operator's path, in order: (heading, code block language)
PATH = (("Debian and Ubuntu", "sh"), ("Configure", "ini"), ("Configure", "sh"),
        ("Start", "sh"), ("Verify", "sh"))


def section(text: str, heading: str) -> str:
    """The body of the README section titled *heading* (any level), up to the next heading
    of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(heading)}\b.*$", text, re.M)
    assert match, f"README.md has no section {heading!r}"
    level = len(match.group(1))
    rest = text[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def blocks(text: str, heading: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", section(text, heading), re.M | re.S)


def operator_path() -> dict[tuple[str, str], list[str]]:
    """Each section's blocks of *lang*, as the README has them: the path's steps."""
    text = README.read_text(encoding="utf-8")
    steps = {}
    for heading, lang in PATH:
        found = blocks(text, heading, lang)
        assert len(found) == 1, f"README {heading!r}: expected one {lang} block, got {found}"
        steps[(heading, lang)] = found[0].splitlines()
    return steps


def test_the_readme_path_is_what_this_test_runs() -> None:
    """The extraction itself: fails when the README's path changes shape."""
    steps = operator_path()
    install = steps[("Debian and Ubuntu", "sh")]
    assert any(EXAMPLE_REPO in line for line in install)
    assert install[-1].startswith("apt install")
    assert steps[("Configure", "ini")] == ["[main]", f"master = {EXAMPLE_MASTER}"]
    assert steps[("Verify", "sh")] == ["dm-agent status", "journalctl -u dm-agent"]


@pytest.fixture(scope="module")
def repo_url(pkgs: lifecycle.Packages) -> Iterator[str]:
    """dist/repo served over HTTP on loopback, which the booted root shares."""
    with fleet.serve(pkgs.repo) as url:
        yield url


@pytest.fixture(scope="module")
def pkgs() -> lifecycle.Packages:
    missing = lifecycle.missing_tools()
    if missing:
        pytest.fail(f"missing tools: apt-get install {' '.join(missing)}", pytrace=False)
    return lifecycle.build_packages()


@pytest.fixture(scope="module")
def node(pkgs: lifecycle.Packages) -> Iterator[Node]:
    dockerd = Dockerd(hostname=NODE_NAME)
    master = Master(expected_version=pkgs.version, expected_name=NODE_NAME)
    try:
        dockerd.start()
        populate(dockerd)
        master.start()
        binds = [(dockerd.socket_path, "/var/run/docker.sock")]
        with nspawn.boot("bookworm-operator", binds=binds) as box:
            yield Node(name="bookworm-operator", box=box, master=master, dockerd=dockerd,
                       secret="")
    finally:
        master.stop()
        dockerd.close()
    master.assert_valid()


def run_block(node: Node, lines: list[str], subst: dict[str, str]) -> list[str]:
    """Run each line (a complete command) as root in the node; their outputs."""
    outs = []
    for line in lines:
        for example, here in subst.items():
            line = line.replace(example, here)
        done = node.run(["bash", "-c", line], check=False, timeout=600)
        assert done.returncode == 0, f"{line!r} exited {done.returncode}:\n" \
            f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        outs.append(done.stdout)
    return outs


def test_operator_path_as_written(node: Node, pkgs: lifecycle.Packages, repo_url: str) -> None:
    steps = operator_path()
    subst = {EXAMPLE_REPO: repo_url, EXAMPLE_MASTER: node.master.address}

    # Install: the key, its fingerprint shown, the source line, apt update and install
    fingerprint = fleet.key_fingerprint(pkgs.keyring)
    outs = run_block(node, steps[("Debian and Ubuntu", "sh")], subst)
    assert fingerprint in outs[1].replace(" ", ""), outs[1]
    status = node.run(["dpkg-query", "-W", "-f", "${Status} ${Version}", "dm-agent"]).stdout
    assert status == f"install ok installed {pkgs.version}"
    node.give_docker_socket()  # the node's Docker socket, as Docker's package leaves it

    # Configure: the INI block is what the file holds after the shell block's edit
    run_block(node, steps[("Configure", "sh")][:-1], subst)
    ini = node.run(["cat", INI]).stdout
    for line in steps[("Configure", "ini")][1:]:
        assert f"\n{line.replace(EXAMPLE_MASTER, node.master.address)}\n" in ini, ini
    assert "\nlog_level = 1\n" in ini  # the packaged default level, untouched
    (check,) = run_block(node, steps[("Configure", "sh")][-1:], subst)
    assert f"master = http://{node.master.address}" in check

    # Start
    since, mark = time.monotonic(), node.cursor()
    run_block(node, steps[("Start", "sh")], subst)
    assert node.run(["systemctl", "is-active", "dm-agent"]).stdout.strip() == "active"
    node.wait_registration(since, timeout=30)

    # Verify: dm-agent status says registered (exit 0); the journal says so too
    verify = steps[("Verify", "sh")]
    deadline = time.monotonic() + 30
    while (said := node.run(["bash", "-c", verify[0]], check=False)).returncode != 0:
        assert time.monotonic() < deadline, said.stdout + said.stderr
        time.sleep(0.2)
    assert said.stdout.startswith("registered ") and node.master.url in said.stdout
    url = node.master.url
    deadline = time.monotonic() + 30
    while True:
        (journal,) = run_block(node, verify[1:], subst)
        if f"registered as {NODE_NAME} with {url} (ttl 120s)" in journal:
            break
        assert time.monotonic() < deadline, journal
        time.sleep(0.2)
    assert re.search(rf"started as daemon \(PID \d+, pidfile /run/dm-agent/dm-agent\.pid\): "
                     rf"master {re.escape(url)}, host \S+, interval 60s, gateway off", journal)
    # nothing a healthy start should not say: ExecCondition's check, the start, the
    # first registration, and no line for each registration after it
    node.wait_registration(since, timeout=75, count=2)  # the next round, within 60 s
    agent = [m for m in node.agent_lines(mark) if not m.startswith("dm-agent: configuration OK")]
    # the start's check says once what the next step is: the gateway (docs/gateway.md)
    notes = [m for m in agent if m.startswith("dm-agent: note: the master cannot manage")]
    assert len(notes) == 1, agent
    agent = [m for m in agent if m not in notes]
    # under CI load the test master's first answer can be late once: then the agent says
    # so and its recovery, and nothing else (tests/test_lifecycle.py's step 3 likewise)
    slow = lifecycle.late_answer_lines(agent, url)
    if slow:
        lifecycle.late_first_answer("operator path", node.master, since)
        assert len(slow) == 1 and any(m.startswith("registration recovered after")
                                      for m in agent), agent
        agent = [m for m in agent if m not in slow
                 and not m.startswith("registration recovered after")]
    assert [m.split(" ")[0] for m in agent] == ["started", "registered"], agent
