"""A booted node running the original agent, taken over with ``dm-agent migrate``, and
``dm-agent status`` under the packaged unit. One boot of the cached Debian 12 root.

The node is laid out as the original agent's ``install`` command leaves it: the script
at ``/usr/local/bin/node-agent.py`` (a ``default_value`` dict at its top, as the master
serves it), ``/etc/systemd/system/node-agent.service`` (``Type=simple``,
``ExecStart=<script> -v``) and ``/etc/node-agent.ini`` (every line but ``[main]``
commented out; the operator has uncommented ``timeout``). The root has no Python, so
the script is a stand-in written here: a bash program that registers as the original
does (same path, ttl = 2 x timeout, X-Auth-Node) and is also a Python file whose only
statement besides a string is that dict — it is not the original's code.

Steps, in order (a step that needs a failed one fails at once):

1. the old agent registers, alone;
2. ``apt install dm-agent`` from the signed repository: the postinst names ``dm-agent
   migrate``; dm-agent is skipped (not configured) and ``dm-agent status`` says 3;
3. ``dm-agent migrate --dry-run`` prints the plan and changes nothing;
4. ``dm-agent migrate``: /etc/dm-agent.ini gets the old settings (0640 root:dm-agent),
   the old unit is stopped and disabled, its files stay, and one registration stream
   remains: dm-agent's, with the old ttl, secret and Docker;
5. ``dm-agent status`` under the unit: 0 for root and a dm-agent member, 4 for anyone
   else with the permission they lack; 1 while the master refuses; 1 for a SIGSTOPped
   agent once its state is older than the ttl; 3 once stopped.
"""

from __future__ import annotations

import ast
import json
import os
import secrets
import time
from collections.abc import Iterator

import pytest
from support import lifecycle, nspawn
from support.dockerd import Dockerd, populate
from support.lifecycle import INI, UNIT, Node
from support.master import Master
from test_lifecycle import install_deb

pytestmark = pytest.mark.system

NODE_NAME = "dm-migrate-node"
OLD = "node-agent"
OLD_UNIT = f"/etc/systemd/system/{OLD}.service"
OLD_SCRIPT = f"/usr/local/bin/{OLD}.py"
OLD_INI = f"/etc/{OLD}.ini"
OLD_TIMEOUT = 3  # from the old ini, over default_value's 10
STATE = "/run/dm-agent/dm-agent.state.json"
STANDIN_UA = "node-agent-standin"


def standin_script(master: Master, dockerd: Dockerd, secret: str) -> str:
    """The stand-in: bash registering every OLD_TIMEOUT s, and a default_value dict."""
    assert dockerd.tcp_address
    host, port = master.address.split(":")
    body = ('{"time":"\'"$(date +%Y-%m-%dT%H:%M:%S)"\'","id":"' + NODE_NAME + '","name":"'
            + NODE_NAME + '","address":"127.0.0.1","labels":{},"containers":[],'
            '"system":{"cpuLoad":0.0,"memory":{"total":1,"available":1,"used":0},'
            '"disks":{},"net":{}}}')
    default_value = {"docker": dockerd.tcp_address, "master": master.address,
                     "timeout": 10, "secret": secret}
    text = f"""#!/bin/bash
''':'
# Stand-in for the original agent (tests/test_fleet_unit.py), in bash: this root has no
# Python. Its settings are the ones the original would use here: the timeout from
# {OLD_INI}, the rest from default_value below.
while :; do
  body='{body}'
  if exec 3<>/dev/tcp/{host}/{port}; then
    head='POST /discovery/nodes/{NODE_NAME}?ttl={2 * OLD_TIMEOUT} HTTP/1.0\\r\\n'
    head="$head"'Host: {host}:{port}\\r\\nUser-Agent: {STANDIN_UA}\\r\\n'
    head="$head"'X-Auth-Node: {secret}\\r\\nContent-Type: application/json\\r\\n'
    printf "$head"'Content-Length: %s\\r\\n\\r\\n%s' "${{#body}}" "$body" >&3
    cat <&3 >/dev/null
    exec 3<&-
  fi
  sleep {OLD_TIMEOUT}
done
exit 0
'''
default_value = {default_value!r}
"""
    tree = ast.parse(text)  # it is a Python file too, as migrate will read it
    assert [type(n).__name__ for n in tree.body] == ["Expr", "Assign"]
    return text


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    missing = lifecycle.missing_tools()
    if missing:
        pytest.fail(f"missing tools: apt-get install {' '.join(missing)}", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("these tests need root (dockerd, systemd-nspawn)", pytrace=False)
    secret = "old-s3cr3t-" + secrets.token_hex(8)
    # The stand-in's requests are not dm-agent's (User-Agent, figures): recorded, not
    # refused; dm-agent's own are checked request by request below.
    master = Master(secret=secret, expected_name=NODE_NAME, reject_invalid=False)
    master.allow_invalid = True
    dockerd = Dockerd(hostname=NODE_NAME, tcp=True)
    try:
        dockerd.start()
        populate(dockerd)
        master.start()
        with nspawn.boot("bookworm") as box:
            n = Node(name="bookworm", box=box, master=master, dockerd=dockerd, secret=secret)
            yield n
    finally:
        master.stop()
        dockerd.close()


@pytest.fixture(scope="module")
def pkgs() -> lifecycle.Packages:
    try:
        return lifecycle.build_packages()
    except lifecycle.LifecycleError as e:
        pytest.fail(str(e), pytrace=False)


def streams(node: Node, since: float) -> dict[str, list[float]]:
    """Arrival times of the registrations since ``since``, by User-Agent."""
    out: dict[str, list[float]] = {}
    for r in node.registrations_since(since):
        out.setdefault((r.header("User-Agent") or "").split("/")[0], []).append(r.time)
    return out


def status(node: Node, *args: str, user: str | None = None) -> tuple[int, str]:
    cmd = ["dm-agent", "status", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *cmd]
    done = node.run(cmd, check=False)
    return done.returncode, done.stdout + done.stderr


def wait_status(node: Node, code: int, timeout: float = 30.0) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        got = status(node)
        if got[0] == code or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_old_agent_registers(node: Node) -> None:
    with node.step("old"):
        node.box.write(OLD_SCRIPT, standin_script(node.master, node.dockerd, node.secret),
                       mode=0o755)
        node.box.write(OLD_INI, "[main]\n#docker = 172.31.0.12:2375\n"
                       "#master = 172.31.0.3:8762\n"
                       f"timeout = {OLD_TIMEOUT}\n#log_level = 2\n", mode=0o644)
        node.box.write(OLD_UNIT, f"[Unit]\nDescription={OLD}\nAfter=docker.service\n\n"
                       f"[Service]\nType=simple\nExecStart={OLD_SCRIPT} -v\n\n"
                       "[Install]\nWantedBy=multi-user.target\n")
        node.run(["systemctl", "daemon-reload"])
        node.run(["systemctl", "enable", "--now", f"{OLD}.service"])
        since = time.monotonic()
        got = node.wait_registration(since, ttl=2 * OLD_TIMEOUT, count=2, timeout=20)
        assert {r.header("User-Agent") for r in got} == {STANDIN_UA}


def test_install_names_migrate(node: Node, pkgs: lifecycle.Packages) -> None:
    with node.step("install", needs=["old"]):
        out = install_deb(node, pkgs)
        assert (f"dm-agent: the original agent runs here as {OLD}.service; take over its "
                "settings and stop it with: dm-agent migrate") in out, out
        node.wait_state({"ActiveState": "inactive"})  # skipped: master not set
        code, said = status(node)
        assert code == 3, said
        assert said.startswith("not running: no pidfile /run/dm-agent/dm-agent.pid"), said


def test_migrate_dry_run_changes_nothing(node: Node) -> None:
    with node.step("dry-run", needs=["install"]):
        before = node.run(["sha256sum", INI]).stdout
        done = node.run(["dm-agent", "migrate", "--dry-run"])
        out = done.stdout
        assert f"found the original agent: {OLD_UNIT} (ExecStart={OLD_SCRIPT} -v)" in out, out
        assert f"would write master = {node.master.address} into {INI} (from default_value " \
            f"of {OLD_SCRIPT})" in out, out
        assert f"would write timeout = {OLD_TIMEOUT} into {INI} (from {OLD_INI} [main] " \
            "timeout)" in out, out
        assert "would write secret = ******** into" in out, out
        # the packaged file sets log_level = 1 (INFO) already: kept, as any key it sets
        assert f"kept log_level of {INI} over log_level = 1 from ExecStart of" in out, out
        assert f"would stop and disable {OLD}.service (now active, enabled)" in out, out
        assert node.secret not in done.stdout + done.stderr
        assert node.run(["sha256sum", INI]).stdout == before
        assert node.run(["systemctl", "is-active", f"{OLD}.service"]).stdout.strip() == "active"


def test_migrate_takes_over_one_stream_remains(node: Node) -> None:
    with node.step("migrate", needs=["dry-run"]):
        done = node.run(["dm-agent", "migrate"], timeout=180)
        out = done.stdout
        print(out.replace(node.secret, "<secret>"))
        migrated = time.monotonic()
        assert node.secret not in out + done.stderr
        assert f"stopped and disabled {OLD}.service (was active, enabled)" in out, out
        assert f"restarted {UNIT}; check it with: dm-agent status" in out, out
        assert f"left in place: {OLD_UNIT}, {OLD_SCRIPT}, {OLD_INI}" in out, out
        assert node.stat(INI) == "640 root:dm-agent"
        ini = node.run(["cat", INI]).stdout
        for line in (f"master = {node.master.address}", f"docker = {node.dockerd.tcp_address}",
                     f"timeout = {OLD_TIMEOUT}", f"secret = {node.secret}", "log_level = 1"):
            assert f"\n{line}\n" in ini, ini
        for path in (OLD_UNIT, OLD_SCRIPT, OLD_INI):
            assert node.exists(path), path
        old = node.run(["systemctl", "is-active", f"{OLD}.service"], check=False).stdout.strip()
        assert old == "inactive"
        enabled = node.run(["systemctl", "is-enabled", f"{OLD}.service"], check=False)
        assert enabled.stdout.strip() == "disabled"
        # one stream: after a settling interval, three intervals of dm-agent's alone
        time.sleep(OLD_TIMEOUT + 1)
        since = time.monotonic()
        got = node.wait_registration(since, ttl=2 * OLD_TIMEOUT, count=3, timeout=30)
        time.sleep(OLD_TIMEOUT)
        seen = streams(node, since)
        assert list(seen) == ["dm-agent"], seen
        for r in node.registrations_since(since):
            assert r.status == 200 and r.errors == [], (r.status, r.errors)
            assert r.query == {"ttl": [str(2 * OLD_TIMEOUT)]}
            assert r.header("X-Auth-Node") == node.secret
        containers = {c["id"] for c in got[-1].json["containers"]}
        assert containers == {c["id"] for c in lifecycle.docker_containers(node.dockerd)}
        assert containers  # read over the old docker = host:port
        every = streams(node, 0.0)
        last_old = max(every[STANDIN_UA])
        assert last_old < migrated
        print(f"takeover: {min(every['dm-agent']) - last_old:.2f} s from the old agent's last "
              "registration to dm-agent's first")
        # a second run changes nothing it has done already
        again = node.run(["dm-agent", "migrate"], timeout=180).stdout
        assert f"left {INI} as it is: it is configured already" in again, again
        assert f"stopped and disabled {OLD}.service (was inactive, disabled)" in again, again


def test_status_under_the_unit(node: Node) -> None:
    with node.step("status", needs=["migrate"]):
        assert node.stat("/run/dm-agent") == "750 dm-agent:dm-agent"  # RuntimeDirectoryMode
        assert node.stat(STATE) == "640 dm-agent:dm-agent"
        assert node.secret not in node.run(["cat", STATE]).stdout
        code, said = wait_status(node, 0)
        assert code == 0, said
        assert said.startswith("registered ") and \
            f" s ago with http://{node.master.address} (ttl {2 * OLD_TIMEOUT} s), " in said, said
        assert "containers, events connected since " in said, said
        js = json.loads(node.run(["dm-agent", "status", "--json"]).stdout)
        assert js["status"] == "registered" and js["pid"] == node.main_pid()
        assert js["state"]["master"] == f"http://{node.master.address}"
        # a member of dm-agent may ask; anyone else is told what they lack
        node.run(["useradd", "--groups", "dm-agent", "alice"])
        node.run(["useradd", "bob"])
        code, said = status(node, user="alice")
        assert code == 0 and said.startswith("registered "), said
        code, said = status(node, user="bob")
        assert code == 4, said
        assert said.startswith("permission denied: cannot read /run/dm-agent/dm-agent.pid: "
                               "/run/dm-agent (drwxr-x--- dm-agent:dm-agent) is readable by "
                               "root and the dm-agent group only; you are bob"), said
        # the master refuses: failing, with the last error
        node.master.set_mode("unauthorized")
        code, said = wait_status(node, 1)
        assert code == 1 and said.startswith("failing: "), said
        assert "\nlast error (" in said and "unauthorized" in said, said
        node.master.set_mode("ok")
        assert wait_status(node, 0)[0] == 0
        # hung: SIGSTOPped, it answers nothing; the state's age says it
        pid = node.main_pid()
        node.run(f"kill -STOP {pid}")  # the shell's kill: procps is not in the root
        try:
            code, said = wait_status(node, 1)
            assert code == 1, said
            assert said.startswith(f"not answering: PID {pid} last wrote its state "), said
        finally:
            node.run(f"kill -CONT {pid}")
        assert wait_status(node, 0)[0] == 0
        node.run(["systemctl", "stop", UNIT])
        code, said = status(node)
        assert code == 3 and said.startswith("not running: "), said
