"""Where the tests find the frozen program that ``make frozen`` built."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: the amd64 onedir (DM_FROZEN_DIR points at another PyInstaller onedir)
FROZEN = Path(os.environ.get("DM_FROZEN_DIR") or REPO / "build" / "frozen" / "dm-agent")


def require_frozen() -> Path:
    """The frozen program; the test fails (never skips) when it is not built."""
    program = FROZEN / "dm-agent"
    if not os.access(program, os.X_OK):
        pytest.fail(
            f"the frozen program is missing ({program}): build it first with `make frozen` "
            "(packaging/freeze.sh), or point DM_FROZEN_DIR at a PyInstaller onedir",
            pytrace=False,
        )
    return program
