"""Run foreign-architecture (arm64) programs on this host through qemu-user and binfmt_misc.

This machine (and CI's) does not mount ``binfmt_misc`` at boot, so the kernel knows none
of the interpreters qemu-user-static registers. The build needs the same thing, so both
use one implementation, ``ensure_binfmt`` in packaging/binfmt.sh: it mounts binfmt_misc,
enables qemu's handler and refuses one without the F (fix-binary) flag, without which no
arm64 program would run inside a root.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "packaging" / "binfmt.sh"

#: Debian architecture -> qemu's binfmt handler for it (the only one the build knows).
HANDLERS = {"arm64": "qemu-aarch64"}


class BinfmtError(RuntimeError):
    """The kernel cannot run programs of that architecture here."""


def ensure(arch: str) -> Path:
    """Make the kernel run *arch* programs through qemu-user; return the handler's file."""
    if arch not in HANDLERS:
        raise BinfmtError(f"no qemu handler known for {arch!r}: expected one of "
                          f"{', '.join(HANDLERS)}")
    script = f'log() {{ :; }}; die() {{ echo "$*" >&2; exit 1; }}; . "{SCRIPT}"; ensure_binfmt'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise BinfmtError(result.stderr.strip() or f"ensure_binfmt failed ({result.returncode})")
    return Path("/proc/sys/fs/binfmt_misc") / HANDLERS[arch]
