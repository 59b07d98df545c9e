"""Run foreign-architecture (arm64) programs on this host through qemu-user and binfmt_misc.

Debian's ``qemu-user-static`` registers its interpreters with binfmt-support, but this
machine (and CI's) does not mount ``binfmt_misc`` at boot, so the kernel knows none of
them. ``ensure()`` mounts it and enables qemu's handler, idempotently, and checks that the
handler carries the F (fix-binary) flag: with it the kernel opens the static interpreter
once, on the host, so it also runs inside a chroot or a booted nspawn root that has no
``/usr/libexec/qemu-binfmt`` of its own. Without F every arm64 program in a root fails
with "No such file or directory".
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

BINFMT = Path("/proc/sys/fs/binfmt_misc")

#: Debian architecture -> binfmt-support's name of qemu's handler for it.
HANDLERS = {"arm64": "qemu-aarch64"}


class BinfmtError(RuntimeError):
    """The kernel cannot run programs of that architecture here."""


def ensure(arch: str) -> Path:
    """Make the kernel run *arch* programs through qemu-user; return the handler's file.

    Cheap when it is already so: one mount check and one read.
    """
    try:
        name = HANDLERS[arch]
    except KeyError:
        raise BinfmtError(f"no qemu handler known for {arch!r}: expected one of "
                          f"{', '.join(HANDLERS)}") from None
    if not (BINFMT / "status").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
    handler = BINFMT / name
    if not _enabled(handler):
        if shutil.which("update-binfmts") is None:
            raise BinfmtError("update-binfmts is missing: apt-get install binfmt-support")
        if not Path("/usr/share/binfmts", name).exists():
            raise BinfmtError(f"{name} is not registered: apt-get install qemu-user-static")
        _run(["update-binfmts", "--enable", name])
        if not _enabled(handler):
            raise BinfmtError(f"{handler} is not enabled after update-binfmts --enable {name}")
    flags = flags_of(handler)
    if "F" not in flags:
        raise BinfmtError(f"{handler} has flags {flags!r}, without F (fix-binary): its "
                          "interpreter would not be found inside a root")
    return handler


def flags_of(handler: Path) -> str:
    """The handler's flags (``flags: PF`` in its file), '' when it has none."""
    for line in handler.read_text().splitlines():
        if line.startswith("flags:"):
            return line.split(":", 1)[1].strip()
    return ""


def _enabled(handler: Path) -> bool:
    try:
        return handler.read_text().splitlines()[0] == "enabled"
    except (OSError, IndexError):
        return False


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise BinfmtError(f"{' '.join(cmd)} failed ({result.returncode}): "
                          f"{result.stderr.strip() or result.stdout.strip()}")
