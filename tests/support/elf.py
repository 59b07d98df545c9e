"""The few fields of an ELF header the package tests read (no tool needed for them)."""

from __future__ import annotations

import struct
from pathlib import Path

#: e_machine of the two architectures built
EM_X86_64 = 62
EM_AARCH64 = 183


def elf_header(path: Path) -> tuple[int, int, int] | None:
    """(EI_CLASS, EI_DATA, e_machine) of an ELF file, None when *path* is not one:
    (2, 1, 62) is 64-bit little-endian x86_64, (2, 1, 183) aarch64."""
    with open(path, "rb") as fh:
        head = fh.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return head[4], head[5], struct.unpack_from("<H", head, 18)[0]


def is_elf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"\x7fELF"


def elf_machine(path: Path) -> int | None:
    """e_machine of an ELF file (little-endian), None when *path* is not one."""
    header = elf_header(path)
    return None if header is None else header[2]
