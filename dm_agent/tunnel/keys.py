"""The node's key for the relay (docs/design.md §8): ``tunnel_key`` when set, else an
ed25519 key the agent makes in its state directory on first use (0600), and the relay's
``authorized_keys`` line that lets it listen on its own port and nothing else."""

from __future__ import annotations

import os
import socket
from typing import Any, NamedTuple

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

#: Under the state directory (the gateway's self-issued certificate is beside it).
KEY_DIR = "tunnel"
KEY_NAME = "id_ed25519"


class NodeKey(NamedTuple):
    path: str
    #: ``ssh-ed25519 AAAA…`` (no comment)
    public: str
    #: made just now (the relay does not know it yet)
    created: bool


def default_path(state_dir: str) -> str:
    return os.path.join(state_dir, KEY_DIR, KEY_NAME)


#: The packaged unit's user, whose state directory root may write in first.
SERVICE_USER = "dm-agent"


def _owner_of(state_dir: str) -> tuple[int, int] | None:
    """The owner to give a key that root makes for the service (``dm-agent tunnel-key``
    before the first start): the state directory's, else the unit's user when it exists;
    None when there is nothing to change."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(state_dir)
    except FileNotFoundError:
        import pwd

        try:
            pw = pwd.getpwnam(SERVICE_USER)
        except KeyError:
            return None
        return pw.pw_uid, pw.pw_gid
    except OSError:
        return None
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def create(path: str) -> None:
    """A new ed25519 key at ``path``, 0600 from its first byte, in a 0700 directory;
    written beside and renamed, so a reader never sees half a key. An existing key wins."""
    directory = os.path.dirname(path)
    state_dir = os.path.dirname(directory)
    owner = _owner_of(state_dir)
    for made in (state_dir, directory):
        if not os.path.isdir(made):
            os.makedirs(made, mode=0o700, exist_ok=True)
            if owner is not None:
                os.chown(made, *owner)
    key = ed25519.Ed25519PrivateKey.generate()
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if owner is not None:
            os.chown(tmp, *owner)
        try:
            os.link(tmp, path)  # never over a key another process made meanwhile
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def public_line(path: str) -> str:
    """``TYPE BASE64`` of the private key at ``path``; ValueError saying what is wrong,
    never with the key's content."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(1 << 20)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    key: Any
    try:
        if b"BEGIN OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(f"{path} is protected by a passphrase; the agent needs a key "
                         "without one (keep it 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{path} is not a private key the agent can use (OpenSSH or PEM: "
                         "ed25519, ECDSA or RSA)") from None
    try:
        raw = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                            serialization.PublicFormat.OpenSSH)
    except ValueError:
        raise ValueError(f"{path}: this kind of key cannot be used over SSH") from None
    return str(raw.decode("ascii"))


def node_key(configured: str | None, state_dir: str, *, create_missing: bool = True) -> NodeKey:
    """The node's key: ``tunnel_key`` as it is, or the default one, made when missing."""
    path = configured or default_path(state_dir)
    made = False
    if configured is None and create_missing and not os.path.exists(path):
        create(path)
        made = True
    return NodeKey(path, public_line(path), made)


def authorized_line(public: str, listen: str, name: str | None = None) -> str:
    """The relay's ``authorized_keys`` line for this node: remote forwarding of its own
    ``ADDR:PORT``, nothing else (no shell, pty, agent, X11 or local forward)."""
    return f'restrict,port-forwarding,permitlisten="{listen}" {public} ' \
           f'{name or socket.gethostname()}'
