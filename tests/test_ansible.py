"""The Ansible role (deploy/ansible/roles/dm_agent) rolled out by real ``ansible-playbook``
to two booted nodes at once, Debian 11 and Debian 13.

Each node is a throwaway overlay of the ``<release>-ansible`` flavour of the cached
roots (tests/support/roots.py: python3 for Ansible's modules, an ssh server, sudo; the agent
itself needs no Python) booted under systemd-nspawn, with a dockerd of its own bound at
/var/run/docker.sock. The controller reaches them over ssh, as an unprivileged user who
becomes root with sudo, with the nodes' host keys checked: what operators run. The
example playbook and ansible.cfg in deploy/ansible are run as shipped; the inventory
points the role at the signed repository that build-repo.sh made (dist/repo, served
over loopback HTTP), its key pinned by fingerprint, and at one strict master for both.

In order, each step needing the ones before:

1. ``--check`` on nodes without dm-agent: succeeds and installs nothing;
2. the rollout: both nodes register with the master (secret accepted), the file is
   0640 root:dm-agent, and no secret appears in the play's output (``-v --diff``); on
   the Debian 11 node, laid out as the original agent's ``install`` leaves one
   (``dm_agent_migrate: true``), the old unit is stopped and disabled, its files left;
3. the second run reports ``changed=0`` on both;
4. ``--check --diff`` with a new timeout predicts the change and makes none;
5. a new ``timeout`` for one host reloads that host only (same process) and the master
   sees its new ttl; the other host's stays;
6. a new pinned version, published in the same signed repository: both hosts upgrade
   and the agent is restarted on it, registered; the run after is ``changed=0``;
7. a wrong secret for one host fails the play on that host with ``dm-agent status``'s
   message; the other host is untouched;
8. the gateway on the good host through the role's variables: a certificate from a
   cluster CA, the key and the hash; the node registers its https address and curl
   reaches Docker through it, trusting only that CA (the other host gets its right
   secret back in the same play);
9. the tunnel: the Debian 13 node is also the relay (group ``dm_agent_relay``, role
   dm_agent_relay on its own sshd), the Debian 11 node's gateway is reached through it
   at an address of the relay's that is not loopback; the node registers that address,
   a second run changes nothing, and the relay's check fails, naming the node, when the
   node's agent is stopped.

Needs root, systemd-container, debootstrap (cold roots), docker.io, openssh-client,
gnupg, reprepro, and ansible-core (setup.cfg's test extra).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import fleet, lifecycle, nspawn
from support.dockerd import Dockerd
from support.fleet import Controller, ManagedNode, PlayResult
from support.lifecycle import INI, UNIT
from support.master import Master

pytestmark = pytest.mark.system

RELEASES = ("bullseye", "trixie")
TIMEOUT = 1  # the interval of the rollout: ttl 2
OLD = "node-agent"  # the original agent's unit on the first node
OLD_FILES = (f"/etc/systemd/system/{OLD}.service", f"/usr/local/bin/{OLD}.py", f"/etc/{OLD}.ini")


class Fleet:
    """The two nodes, the master, the controller, and which steps passed."""

    def __init__(self, nodes: list[ManagedNode], master: Master, controller: Controller,
                 secret: str, pkgs: lifecycle.Packages, published: Path) -> None:
        self.nodes = nodes
        self.master = master
        self.controller = controller
        self.secret = secret
        self.pkgs = pkgs
        #: the directory served as the repository: apt/ is a symlink to what is published
        self.published = published
        self.passed: set[str] = set()

    def needs(self, *steps: str) -> None:
        missing = [s for s in steps if s not in self.passed]
        if missing:
            pytest.fail(f"needs step(s) {', '.join(missing)}, which did not pass", pytrace=False)

    def node(self, name: str) -> ManagedNode:
        return next(n for n in self.nodes if n.name == name)

    def registrations(self, node: ManagedNode, since: float) -> list[Any]:
        return [r for r in self.master.requests
                if r.time >= since and r.node_name == node.docker_name]


@pytest.fixture(scope="module")
def fleet_() -> Iterator[Fleet]:
    missing = lifecycle.missing_tools()
    if missing:
        pytest.fail(f"missing tools: apt-get install {' '.join(missing)}", pytrace=False)
    pkgs = lifecycle.build_packages()
    secret = "s3cr3t-" + secrets.token_hex(12)
    master = Master(secret=secret, expected_version=pkgs.version).start()
    with contextlib.ExitStack() as stack:
        stack.callback(master.stop)
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dm-ansible.")))
        published = work / "published"
        published.mkdir()
        (published / "apt").symlink_to(pkgs.repo / "apt")
        shutil.copy(pkgs.keyring_asc, published / "dm-agent-archive-keyring.asc")
        repo_url = stack.enter_context(fleet.serve(published))
        nodes = []
        for release in RELEASES:
            dockerd = Dockerd(hostname=f"dm-ansible-{release}")
            stack.callback(dockerd.close)
            dockerd.start()
            box = stack.enter_context(nspawn.boot(
                f"{release}-ansible", binds=[(dockerd.socket_path, "/var/run/docker.sock")]))
            nodes.append(ManagedNode(name=release, box=box, dockerd=dockerd))
        controller = Controller(work, nodes, {
            "dm_agent_repo_url": repo_url,
            "dm_agent_repo_key_fingerprint": fleet.key_fingerprint(pkgs.keyring_asc),
            "dm_agent_version": pkgs.version,
            "dm_agent_master": master.address,
            "dm_agent_secret": secret,
            "dm_agent_timeout": TIMEOUT,
            "dm_agent_settings": {"log_level": 1, "jitter": False},
            "dm_agent_verify_delay": 1,
            "dm_agent_migrate": True,
        })
        for node in nodes:
            node.give_docker_socket()
            node.start_sshd(controller.public_key)
        lay_out_original_agent(nodes[0], master)
        yield Fleet(nodes, master, controller, secret, pkgs, published)
    master.assert_valid()


def test_check_mode_on_fresh_nodes(fleet_: Fleet) -> None:
    """1. --check before anything is installed: it succeeds and changes nothing."""
    result = fleet_.controller.play("--check", "--diff")
    assert result.returncode == 0, result.output[-6000:]
    for node in fleet_.nodes:
        assert result.recap[node.name]["failed"] == 0, result.output[-6000:]
        assert result.recap[node.name]["changed"] > 0  # it says what it would do
        assert node.run(["sh", "-c", "command -v dm-agent"], check=False).returncode != 0
        assert node.run(["test", "-e", "/etc/apt/sources.list.d/dm-agent.list"],
                        check=False).returncode != 0
    assert fleet_.secret not in result.output
    fleet_.passed.add("check-fresh")


def test_rollout_registers_both(fleet_: Fleet) -> None:
    """2. The rollout to both nodes at once: each registers with the master."""
    since = time.monotonic()
    result = fleet_.controller.play("-v", "--diff")
    print(f"\nfirst run, {len(fleet_.nodes)} nodes: {result.seconds:.1f} s")
    for node in fleet_.nodes:
        print(fleet.recap_line(result, node.name))
    assert result.returncode == 0, result.output[-8000:]
    assert fleet_.secret not in result.output
    old = fleet_.nodes[0]
    assert f"stopped and disabled {OLD}.service" in result.output, result.output[-8000:]
    assert old.run(["systemctl", "is-active", f"{OLD}.service"], check=False
                   ).stdout.strip() == "inactive"
    assert old.run(["systemctl", "is-enabled", f"{OLD}.service"], check=False
                   ).stdout.strip() == "disabled"
    for path in OLD_FILES:
        assert old.run(["test", "-f", path], check=False).returncode == 0, f"{path} is gone"
    assert OLD_SECRET not in result.output
    for node in fleet_.nodes:
        assert result.recap[node.name]["failed"] == 0
        regs = [r for r in fleet_.registrations(node, since) if r.status == 200]
        assert regs, f"{node.name}: no accepted registration"
        assert all(r.auth_ok for r in regs)
        assert regs[-1].query.get("ttl") == [str(2 * TIMEOUT)]
        assert node.run(["stat", "-c", "%a %U:%G", INI]).stdout.strip() == "640 root:dm-agent"
        assert node.run(["systemctl", "is-enabled", UNIT]).stdout.strip() == "enabled"
        status = node.run(["dm-agent", "status"], check=False)
        assert status.returncode == 0, status.stdout
        assert status.stdout.startswith("registered "), status.stdout
        assert fleet_.secret not in status.stdout
    fleet_.passed.add("rollout")


def test_second_run_changes_nothing(fleet_: Fleet) -> None:
    """3. Idempotent: the second run reports changed=0 on every host."""
    fleet_.needs("rollout")
    pids = {n.name: main_pid(n) for n in fleet_.nodes}
    result = fleet_.controller.play()
    print(f"\nsecond run: {result.seconds:.1f} s")
    for node in fleet_.nodes:
        print(fleet.recap_line(result, node.name))
    assert result.returncode == 0, result.output[-6000:]
    for node in fleet_.nodes:
        assert result.recap[node.name]["changed"] == 0, result.output[-6000:]
        assert result.recap[node.name]["failed"] == 0
        assert main_pid(node) == pids[node.name]
    fleet_.passed.add("idempotent")


def test_check_mode_predicts_without_changing(fleet_: Fleet) -> None:
    """4. --check --diff with a new timeout: the change is predicted, none is made, and
    the file's diff (it holds the secret) is not shown."""
    fleet_.needs("idempotent")
    node = fleet_.nodes[0]
    before = node.run(["sha256sum", INI]).stdout
    fleet_.controller.host_vars[node.name] = {"dm_agent_timeout": 3}
    since = time.monotonic()
    try:
        result = fleet_.controller.play("--check", "--diff")
    finally:
        fleet_.controller.host_vars[node.name] = {}
    assert result.returncode == 0, result.output[-6000:]
    assert result.recap[node.name]["changed"] >= 1, result.output[-6000:]
    assert result.recap[fleet_.nodes[1].name]["changed"] == 0, result.output[-6000:]
    assert node.run(["sha256sum", INI]).stdout == before
    assert not [r for r in fleet_.registrations(node, since) if r.query.get("ttl") == ["6"]]
    assert fleet_.secret not in result.output
    fleet_.passed.add("check")


def test_timeout_change_reloads_only_that_host(fleet_: Fleet) -> None:
    """5. A new timeout for one host: that host's agent is reloaded (same process) and
    the master sees ttl 4 from it; the other host is not touched."""
    fleet_.needs("idempotent")
    changed, other = fleet_.nodes
    pids = {n.name: main_pid(n) for n in fleet_.nodes}
    fleet_.controller.host_vars[changed.name] = {"dm_agent_timeout": 2}
    since = time.monotonic()
    result = fleet_.controller.play()
    assert result.returncode == 0, result.output[-6000:]
    # the file and its handler (a reload), nothing else
    assert result.recap[changed.name]["changed"] == 2, result.output[-6000:]
    assert re.search(rf"RUNNING HANDLER \[dm_agent : Reload dm-agent\].*\nchanged: "
                     rf"\[{changed.name}\]", result.output), result.output[-6000:]
    assert result.recap[other.name]["changed"] == 0, result.output[-6000:]
    assert main_pid(changed) == pids[changed.name]  # a reload, not a restart
    assert main_pid(other) == pids[other.name]
    ttls = {r.query.get("ttl", [""])[0] for r in fleet_.registrations(changed, since)
            if r.status == 200}
    assert "4" in ttls, ttls
    other_ttls = {r.query.get("ttl", [""])[0] for r in fleet_.registrations(other, since)}
    assert other_ttls == {"2"}, other_ttls
    assert "(ttl 4 s)" in changed.run(["dm-agent", "status"]).stdout
    fleet_.passed.add("timeout")


def test_pinned_upgrade_restarts(fleet_: Fleet) -> None:
    """6. A new version pinned and published: both upgrade, the agent restarts on it."""
    fleet_.needs("idempotent")
    pids = {n.name: main_pid(n) for n in fleet_.nodes}
    ini = {n.name: n.run(["sha256sum", INI]).stdout for n in fleet_.nodes}
    next_version = f"{fleet_.pkgs.version}+next1"
    with lifecycle.publish_next_version(fleet_.pkgs, next_version) as apt_dir:
        shutil.copytree(apt_dir, fleet_.published / "apt-next")
    (fleet_.published / "apt.new").symlink_to(fleet_.published / "apt-next")
    (fleet_.published / "apt.new").replace(fleet_.published / "apt")
    fleet_.controller.group_vars["dm_agent_version"] = next_version
    since = time.monotonic()
    result = fleet_.controller.play()
    print(f"\nupgrade to {next_version}: {result.seconds:.1f} s")
    assert result.returncode == 0, result.output[-6000:]
    assert re.search(r"RUNNING HANDLER \[dm_agent : Restart dm-agent after an upgrade\]"
                     r".*\n(changed: \[\w+\]\n){2}", result.output), result.output[-6000:]
    for node in fleet_.nodes:
        assert result.recap[node.name]["changed"] == 2, result.output[-6000:]  # package, restart
        assert node.run(["dpkg-query", "-W", "-f", "${Version}", "dm-agent"]).stdout == \
            next_version
        assert main_pid(node) != pids[node.name]
        assert node.run(["sha256sum", INI]).stdout == ini[node.name]
        assert [r for r in fleet_.registrations(node, since) if r.status == 200]
    again = fleet_.controller.play()
    for node in fleet_.nodes:
        assert again.recap[node.name]["changed"] == 0, again.output[-6000:]
    fleet_.passed.add("upgrade")


def test_wrong_secret_fails_that_host(fleet_: Fleet) -> None:
    """7. A wrong secret for one host: the play fails on that host, with the status
    message (the master refused the secret); the other host stays as it was."""
    fleet_.needs("idempotent")
    good, bad = fleet_.nodes
    wrong = "wrong-" + secrets.token_hex(8)
    fleet_.controller.host_vars[bad.name] = {"dm_agent_secret": wrong}
    since = time.monotonic()
    result = fleet_.controller.play("-v", "--diff")
    assert result.returncode != 0, result.output[-6000:]
    assert result.recap[bad.name]["failed"] == 1, result.output[-6000:]
    assert result.recap[good.name]["failed"] == 0, result.output[-6000:]
    message = failure_message(result, bad.name)
    assert "dm-agent is not registered (dm-agent status exited 1)" in message, message
    assert "failing:" in message and "unauthorized" in message, message
    assert fleet_.secret not in result.output and wrong not in result.output
    refused = [r for r in fleet_.registrations(bad, since) if r.status == 401]
    assert refused, "the master saw no request with the wrong secret"
    assert bad.run(["dm-agent", "status"], check=False).returncode == 1
    print(f"\nwrong secret on {bad.name}: {message}")
    fleet_.passed.add("wrong-secret")


def test_gateway_through_the_role(fleet_: Fleet, tmp_path: Path) -> None:
    """8. The gateway for the good host: its certificate from a cluster CA, its key and the
    password hash as role variables. After the play the node registers its https
    address, and curl, trusting only the cluster CA, reaches Docker through the gateway
    with the master's password; the key is 0640 root:dm-agent and shows in no output."""
    import bcrypt
    from support.dockerd import make_tls_files

    fleet_.needs("idempotent")
    good, other = fleet_.nodes
    fleet_.controller.host_vars[other.name] = {}  # its right secret again (after step 7)
    ca = make_tls_files(tmp_path / "cluster", hosts=("127.0.0.1",))
    with socket.socket() as probe:  # the nodes share the host's network
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    password = "cluster-" + secrets.token_hex(8)
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    key_text = ca.server_key.read_text()
    fleet_.controller.host_vars[good.name] = {
        "dm_agent_gateway": f"127.0.0.1:{port}",
        "dm_agent_gateway_password_hash": hashed,
        "dm_agent_gateway_cert": ca.server_cert.read_text(),
        "dm_agent_gateway_key": key_text,
    }
    since = time.monotonic()
    result = fleet_.controller.play("-v", "--diff")
    assert result.returncode == 0, result.output[-6000:]
    mode = good.run(["stat", "-c", "%a %U:%G", "/etc/dm-agent/gateway/gateway.key"]).stdout
    assert mode.strip() == "640 root:dm-agent"
    body = key_text.splitlines()[1]
    assert body not in result.output and hashed not in result.output and password not in \
        result.output
    last = [r for r in fleet_.registrations(good, since) if r.status == 200][-1]
    address = last.json["address"]
    assert address.startswith("https://") and address.endswith(f":{port}"), address
    out = subprocess.run(["curl", "-sS", "--cacert", str(ca.ca), "-u", f"admin:{password}",
                          f"https://127.0.0.1:{port}/version"], capture_output=True, text=True,
                         timeout=30)
    assert '"ApiVersion"' in out.stdout, out.stdout + out.stderr
    assert f"gateway: listening on 127.0.0.1:{port}" in good.run(["dm-agent", "status"]).stdout
    fleet_.passed.add("gateway")


def test_tunnel_through_the_relay_role(fleet_: Fleet) -> None:
    """9. The tunnel through the roles: the relay (the Debian 13 node's own sshd) gets
    the Match block and its table of nodes from the inventory, the Debian 11 node's key
    read on the node; the node registers the relay's address, its gateway answers there
    with the master's password; the second run is changed=0 on both; the relay's check
    fails naming the node when the node's agent is stopped."""
    import bcrypt
    from support.netns import Netns

    fleet_.needs("gateway")
    node, relay = fleet_.nodes
    password = "tunnel-" + secrets.token_hex(8)
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    with Netns() as net, socket.socket() as probe:  # an address of this host's, not loopback
        probe.bind((net.host_ip, 0))
        listen = f"{net.host_ip}:{probe.getsockname()[1]}"
        probe.close()
        fleet_.controller.host_vars[node.name].update({
            "dm_agent_gateway_password_hash": hashed,
            "dm_agent_tunnel": f"dm-relay@127.0.0.1:{relay.ssh_port}",
            "dm_agent_tunnel_listen": listen,
            "dm_agent_tunnel_host_key": relay.host_key})
        fleet_.controller.groups["dm_agent_relay"] = [relay.name]
        fleet_.controller.group_vars["dm_agent_relay_verify_delay"] = 1
        since = time.monotonic()
        result = fleet_.controller.play("-v", "--diff")
        assert result.returncode == 0, result.output[-8000:]
        assert hashed not in result.output and password not in result.output
        table = relay.run(["cat", "/etc/ssh/dm-relay/authorized_keys"]).stdout
        public = node.run(["dm-agent", "tunnel-key", "--json"]).stdout
        assert (f'restrict,port-forwarding,permitlisten="{listen}" '
                f'{json.loads(public)["public"]} {node.name}') in table
        assert node.run(["stat", "-c", "%a %U", "/var/lib/dm-agent/tunnel/id_ed25519"]
                        ).stdout.strip() == "600 dm-agent"
        last = [r for r in fleet_.registrations(node, since) if r.status == 200][-1]
        assert last.json["address"] == f"https://{listen}"
        out = subprocess.run(["curl", "-sSk", "-u", f"admin:{password}",
                              f"https://{listen}/version"], capture_output=True, text=True,
                             timeout=30)
        assert '"ApiVersion"' in out.stdout, out.stdout + out.stderr
        deadline = time.monotonic() + 30  # the state file is written after each round
        while "tunnel: up since" not in (status := node.run(["dm-agent", "status"]).stdout):
            if time.monotonic() > deadline:
                journal = node.run(["journalctl", "-u", UNIT, "--no-pager", "-n", "40"]).stdout
                sshd = relay.run(["journalctl", "-u", "ssh", "--no-pager", "-n", "40"]).stdout
                pytest.fail(f"status: {status}\nthe node's journal:\n{journal}\n"
                            f"the relay's sshd:\n{sshd}")
            time.sleep(0.5)

        again = fleet_.controller.play()
        for n in fleet_.nodes:
            assert again.recap[n.name]["changed"] == 0, again.output[-6000:]

        node.run(["systemctl", "stop", UNIT])
        try:
            fleet_.controller.group_vars["dm_agent_relay_verify_retries"] = 2
            failed = fleet_.controller.play("--limit", relay.name)
        finally:
            fleet_.controller.group_vars.pop("dm_agent_relay_verify_retries")
            node.run(["systemctl", "start", UNIT])
        assert failed.returncode != 0 and failed.recap[relay.name]["failed"] == 1, \
            failed.output[-6000:]
        assert f"the master's address of {node.name}, https://{listen}, does not answer" \
            in failed.output, failed.output[-6000:]
    fleet_.passed.add("tunnel")


# --- helpers ------------------------------------------------------------------------------

OLD_SECRET = "old-s3cr3t-" + secrets.token_hex(8)


def lay_out_original_agent(node: ManagedNode, master: Master) -> None:
    """The node as the original agent's ``install`` leaves it: its unit (Type=simple,
    ExecStart=<script> -v), /etc/<name>.ini with every line but [main] commented out, and
    the script with the master's ``default_value`` dict at its top. The script is a
    stand-in written here, which only sleeps: what matters to the role is that the unit
    runs until ``dm-agent migrate`` stops it."""
    default_value = {"docker": "unix:///var/run/docker.sock", "master": master.address,
                     "timeout": 10, "secret": OLD_SECRET}
    node.box.write(OLD_FILES[1], (
        "#!/usr/bin/python3\n"
        f'"""Stand-in for the original agent (tests/test_ansible.py): it only sleeps."""\n'
        f"default_value = {default_value!r}\n"
        "import time\n\nwhile True:\n    time.sleep(60)\n"), mode=0o755)
    node.box.write(OLD_FILES[2], "[main]\n#master = 127.0.0.1:8761\n#timeout = 10\n#secret =\n",
                   mode=0o644)
    node.box.write(OLD_FILES[0], (
        "[Unit]\nDescription=the original node agent\n\n[Service]\nType=simple\n"
        f"ExecStart={OLD_FILES[1]} -v\n\n[Install]\nWantedBy=multi-user.target\n"))
    node.run(["systemctl", "daemon-reload"])
    node.run(["systemctl", "enable", "--now", f"{OLD}.service"])
    assert node.run(["systemctl", "is-active", f"{OLD}.service"]).stdout.strip() == "active"



def main_pid(node: ManagedNode) -> int:
    return int(node.run(["systemctl", "show", UNIT, "--property=MainPID", "--value"]
                        ).stdout.strip())


def failure_message(result: PlayResult, host: str) -> str:
    """The msg of the failed task of *host* (``fatal: [host]: FAILED! => {... "msg": ...}``)."""
    m = re.search(rf'^fatal: \[{re.escape(host)}\]: FAILED! =>.*?"msg": "((?:[^"\\]|\\.)*)"',
                  result.output, re.M | re.S)
    return m.group(1) if m else result.output[-4000:]
