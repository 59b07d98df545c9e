"""A real OpenSSH ``sshd`` as the tunnel's relay (docs/tunnel.md), with its own config
file, host key and ``authorized_keys``, run in a network namespace of the test's own.

The relay's user exists only for this sshd: it runs in a private mount namespace whose
``/etc/passwd`` and ``/etc/group`` are copies with that user added, so this host gains no
account. Its files live in a directory under /run (sshd's StrictModes refuses
``authorized_keys`` under a world-writable /tmp). What makes it a relay is the block
docs/tunnel.md gives operators, read from there, with this test's paths and shorter
``ClientAlive*`` when asked.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

SSHD = "/usr/sbin/sshd"
USER = "dm-relay"
UID = 64123

DOC = Path(__file__).resolve().parents[2] / "docs" / "tunnel.md"

#: This relay's own lines: where it listens, its files, and no PAM (its user exists in
#: its mount namespace only). What makes it a relay comes from docs/tunnel.md.
GLOBAL = """\
Port {port}
ListenAddress {listen}
HostKey {dir}/ssh_host_ed25519_key
PidFile {dir}/sshd.pid
PubkeyAuthentication yes
PermitRootLogin no
UsePAM no
AllowUsers {user}
LogLevel VERBOSE
"""


def documented_config() -> str:
    """The relay's configuration as docs/tunnel.md writes it out for operators (its first
    fenced block): the tests run exactly what the operators are told to."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## The relay's side", 1)[1]
    block = section.split("```", 2)[1]
    return "\n".join(line.strip() and line[3:] if line.startswith("   ") else line
                     for line in block.splitlines()[1:]).strip() + "\n"


def keygen(path: Path, comment: str = "") -> str:
    """An ed25519 key pair at ``path`` (and ``path.pub``); returns the public line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                    "-f", str(path)], check=True, capture_output=True, timeout=30,
                   stdin=subprocess.DEVNULL)
    return Path(f"{path}.pub").read_text().strip()


class Relay:
    """sshd in namespace ``netns`` on ``listen``:``port``. ``authorize()`` writes a
    node's line; ``restart()`` kills every process of it (the listener and the sessions,
    as a reboot of the relay would) and starts it again."""

    def __init__(self, netns: str, listen: str, *, port: int = 22, alive_interval: int = 15,
                 alive_count: int = 3, max_startups: str | None = None) -> None:
        self.netns, self.listen, self.port = netns, listen, port
        self.dir = Path(tempfile.mkdtemp(prefix="dmt-relay-", dir="/run"))
        os.chmod(self.dir, 0o755)
        self.host_key = keygen(self.dir / "ssh_host_ed25519_key", "relay")
        (self.dir / "authorized_keys").write_text("")
        os.chmod(self.dir / "authorized_keys", 0o644)
        self.config = self.dir / "sshd_config"
        relay = documented_config().replace(
            "/etc/ssh/dm-relay/authorized_keys", str(self.dir / "authorized_keys"))
        relay = re.sub(r"ClientAliveInterval \d+", f"ClientAliveInterval {alive_interval}", relay)
        relay = re.sub(r"ClientAliveCountMax \d+", f"ClientAliveCountMax {alive_count}", relay)
        if max_startups:
            relay = re.sub(r"MaxStartups \S+", f"MaxStartups {max_startups}", relay)
        self.config.write_text(GLOBAL.format(port=port, listen=listen, dir=self.dir, user=USER)
                               + relay)
        for name, line in (("passwd", f"{USER}:x:{UID}:{UID}:dm-agent relay:/nonexistent:"
                                      "/usr/sbin/nologin\n"),
                           ("group", f"{USER}:x:{UID}:\n")):
            text = Path(f"/etc/{name}").read_text()
            (self.dir / name).write_text(text + line)
        self.log = self.dir / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation

    @property
    def host_key_file(self) -> Path:
        return self.dir / "ssh_host_ed25519_key.pub"

    def authorize(self, lines: Sequence[str]) -> None:
        """The whole ``authorized_keys`` table (sshd reads it at each login)."""
        (self.dir / "authorized_keys").write_text("".join(f"{ln}\n" for ln in lines))

    def start(self) -> Relay:
        check = subprocess.run([SSHD, "-t", "-f", str(self.config)], capture_output=True,
                               text=True, timeout=30, stdin=subprocess.DEVNULL)
        if check.returncode != 0:
            raise AssertionError(f"sshd -t: {check.stderr}")
        script = (f"mount --bind {self.dir}/passwd /etc/passwd && "
                  f"mount --bind {self.dir}/group /etc/group && "
                  f"exec {SSHD} -D -e -f {self.config}")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation",
                 "private", "sh", "-c", script], stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, start_new_session=True)
        self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.listens(self.port):
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"sshd exited {self.proc.returncode}: {self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"sshd not listening after {timeout}s: {self.logs()}")
            time.sleep(0.05)

    def listens(self, port: int, host: str | None = None) -> bool:
        """Whether something listens on ``host``:``port`` in the relay's namespace."""
        out = subprocess.run(["ip", "netns", "exec", self.netns, "ss", "-Hltn",
                              f"sport = :{port}"], capture_output=True, text=True,
                             timeout=30, stdin=subprocess.DEVNULL).stdout
        return any(host is None or f"{host}:{port}" in line for line in out.splitlines())

    def pids(self) -> list[int]:
        """The relay's processes: sshd's, in its namespace (which may hold others: a
        dockerd, in the image's tests)."""
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True,
                             text=True, timeout=30, stdin=subprocess.DEVNULL).stdout
        mine = []
        for pid in out.split():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith("sshd") or (self.proc is not None and int(pid) == self.proc.pid):
                mine.append(int(pid))
        return mine

    def kill(self) -> None:
        """Every sshd process of the relay (the listener and its sessions), at once."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        self.kill()
        self.start()

    def logs(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
