"""Helpers of tests/test_ansible.py: booted nodes that Ansible reaches over ssh, the signed
repository served over HTTP, and ``ansible-playbook`` runs with their recap.

- ``serve(directory)``: a loopback HTTP server for dist/repo/ (what a node's apt reads
  from ``https://packages.example.com/dm-agent`` in production).
- ``ManagedNode``: a booted root of a ``<release>-ansible`` flavour (tests/support/roots.py:
  python3, python3-apt, openssh-server, sudo) with its own dockerd, whose sshd listens on
  a port of its own on 127.0.0.1 (the container shares the host's network) and lets
  the user ``ops`` in with the test's key; ``ops`` becomes root with sudo, as an operator
  on a server does.
- ``Controller``: the test's ssh key and known_hosts (the nodes' real host keys, checked
  strictly), the inventory, and ``play()``, which runs deploy/ansible/playbook.yml with
  deploy/ansible/ansible.cfg and returns the output and the PLAY RECAP per host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .dockerd import Dockerd
from .lifecycle import REPO
from .nspawn import BootedRoot

DEPLOY = REPO / "deploy/ansible"
PLAYBOOK = DEPLOY / "playbook.yml"
USER = "ops"
_RECAP = re.compile(r"^(\S+)\s*:\s*((?:\w+=\d+\s*)+)$", re.M)


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve *directory* on 127.0.0.1 (a free port) for the ``with`` block; yield its URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the node's sshd binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def key_fingerprint(keyring: Path) -> str:
    """The primary key's fingerprint of *keyring*, as ``gpg --show-keys`` lists it."""
    with tempfile.TemporaryDirectory(prefix="dm-gnupg.") as home:
        out = subprocess.run(
            ["gpg", "--batch", "--homedir", home, "--with-colons", "--show-keys", str(keyring)],
            capture_output=True, text=True, check=True).stdout
    found = re.findall(r"^pub:.*\nfpr:+([0-9A-F]{40}):", out, re.M)
    assert len(found) == 1, out
    return found[0]


@dataclasses.dataclass
class ManagedNode:
    """One booted node: its root, its dockerd (Docker ``Name`` = *name*) and its sshd."""

    name: str
    box: BootedRoot
    dockerd: Dockerd
    ssh_port: int = 0
    host_key: str = ""

    @property
    def docker_name(self) -> str:
        """Docker's ``Name`` of the node's dockerd: the name it registers under."""
        return str(self.dockerd.hostname)

    def run(self, cmd: list[str] | str, *, check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.box.run(cmd, check=check, timeout=timeout)

    def give_docker_socket(self) -> None:
        """The node's Docker: its socket root:docker 0660, ``docker`` a system group made
        before the agent is installed, as Docker's package makes it on a real server."""
        self.run(["groupadd", "--system", "docker"])
        gid = int(self.run(["getent", "group", "docker"]).stdout.split(":")[2])
        os.chown(self.dockerd.socket_path, 0, gid)
        os.chmod(self.dockerd.socket_path, 0o660)

    def start_sshd(self, authorized_key: str) -> None:
        """The user ``ops`` (sudo without a password, the test key) and sshd on a port of
        its own on 127.0.0.1; remembers the node's host key for known_hosts."""
        self.ssh_port = free_port()
        self.run(["useradd", "--create-home", "--shell", "/bin/bash", USER])
        self.box.write(f"/etc/sudoers.d/{USER}", f"{USER} ALL=(ALL) NOPASSWD: ALL\n",
                       mode=0o440)
        home = f"/home/{USER}"
        self.box.write(f"{home}/.ssh/authorized_keys", authorized_key, mode=0o600)
        self.run(["chown", "-R", f"{USER}:{USER}", f"{home}/.ssh"])
        self.run(["chmod", "700", f"{home}/.ssh"])
        # Debian's sshd_config includes sshd_config.d/ first: these values win.
        self.box.write("/etc/ssh/sshd_config.d/dm-test.conf",
                       f"Port {self.ssh_port}\nListenAddress 127.0.0.1\n"
                       "PasswordAuthentication no\nPermitRootLogin no\n")
        self.run(["systemctl", "unmask", "ssh.service", "ssh.socket"])
        self.run(["systemctl", "start", "ssh.service"])
        self.host_key = " ".join(self.box.read("/etc/ssh/ssh_host_ed25519_key.pub").split()[:2])
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.ssh_port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: sshd does not listen on {self.ssh_port}")
            time.sleep(0.1)


@dataclasses.dataclass
class PlayResult:
    returncode: int
    output: str
    seconds: float
    recap: dict[str, dict[str, int]]


class Controller:
    """The Ansible side: key, known_hosts, inventory (group ``dm_agent``), host_vars."""

    def __init__(self, workdir: Path, nodes: list[ManagedNode], group_vars: dict[str, Any]):
        self.workdir = workdir
        self.nodes = nodes
        self.group_vars = group_vars
        self.host_vars: dict[str, dict[str, Any]] = {n.name: {} for n in nodes}
        #: other inventory groups, by name: the nodes in each (the tunnel's relays)
        self.groups: dict[str, list[str]] = {}
        self.key = workdir / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dm-ansible-test",
                        "-f", str(self.key)], check=True)
        self.known_hosts = workdir / "known_hosts"

    @property
    def public_key(self) -> str:
        return self.key.with_suffix(".pub").read_text()

    def write_inventory(self) -> Path:
        self.known_hosts.write_text("".join(f"[127.0.0.1]:{n.ssh_port} {n.host_key}\n"
                                            for n in self.nodes))
        ssh_args = (f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes "
                    "-o IdentitiesOnly=yes")
        hosts = {n.name: {"ansible_host": "127.0.0.1", "ansible_port": n.ssh_port,
                          **self.host_vars[n.name]} for n in self.nodes}
        inventory = {"dm_agent": {"hosts": hosts, "vars": {
            "ansible_user": USER,
            "ansible_ssh_private_key_file": str(self.key),
            "ansible_ssh_common_args": ssh_args,
            **self.group_vars,
        }}}
        for group, members in self.groups.items():
            inventory[group] = {"hosts": {name: None for name in members}}
        path = self.workdir / "inventory.yml"
        path.write_text(yaml.safe_dump(inventory, sort_keys=False))
        return path

    def play(self, *args: str, timeout: float = 900.0) -> PlayResult:
        """``ansible-playbook -i inventory playbook.yml ARGS`` with the shipped
        ansible.cfg; its ~/.ansible and ssh control sockets in the test's directory."""
        inventory = self.write_inventory()
        env = {**os.environ,
               "ANSIBLE_CONFIG": str(DEPLOY / "ansible.cfg"),
               "ANSIBLE_HOME": str(self.workdir / "ansible-home"),
               "ANSIBLE_LOCAL_TEMP": str(self.workdir / "ansible-tmp"),
               "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.workdir / "cp")}
        cmd = [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(inventory),
               str(PLAYBOOK), *args]
        started = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                           stdin=subprocess.DEVNULL, cwd=self.workdir)
        seconds = time.monotonic() - started
        output = p.stdout + p.stderr
        recap_text = output.rpartition("PLAY RECAP")[2]
        recap = {host: {k: int(v) for k, v in (f.split("=") for f in fields.split())}
                 for host, fields in _RECAP.findall(recap_text)}
        return PlayResult(p.returncode, output, seconds, recap)


def recap_line(result: PlayResult, host: str) -> str:
    """The host's PLAY RECAP line as ansible-playbook printed it."""
    m = re.search(rf"^{re.escape(host)}\s*:.*$", result.output.rpartition("PLAY RECAP")[2],
                  re.M)
    return m.group(0) if m else f"{host}: no recap line"
