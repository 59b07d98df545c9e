"""Whether the master accepts a node name: the path segment of the registration.

Both master generations read ``{name}`` with Guava's ``InternetDomainName.from`` and
refuse the node when it throws. This is the same rule, so the agent can say once, at
ERROR, what to change, instead of failing every round with the master's bare refusal.
"""

from __future__ import annotations

import re

MAX_LENGTH = 253
MAX_PARTS = 127
MAX_PART_LENGTH = 63
# Guava keeps non-ASCII characters as they are and checks only the ASCII ones.
_BAD_ASCII = re.compile(r"[\x00-\x7f]")
_PART_CHAR = re.compile(r"[A-Za-z0-9_-]")
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


def problem(name: str) -> str | None:
    """Why the master would refuse ``name`` as a node name, or None when it accepts it."""
    text = name.translate(_DOTS)
    if text.endswith("."):
        text = text[:-1]
    if len(text) > MAX_LENGTH:
        return f"it is {len(text)} characters long, the most is {MAX_LENGTH}"
    parts = text.split(".")
    if len(parts) > MAX_PARTS:
        return f"it has {len(parts)} dot-separated labels, the most is {MAX_PARTS}"
    for i, part in enumerate(parts):
        if not part:
            return "it has an empty label (two dots in a row, or a leading dot)"
        if len(part) > MAX_PART_LENGTH:
            return f"label {part!r} is {len(part)} characters long, the most is 63"
        bad = sorted({c for c in part if _BAD_ASCII.match(c) and not _PART_CHAR.match(c)})
        if bad:
            return f"label {part!r} has {''.join(bad)!r}: only letters, digits, '-' and '_'"
        if part[0] in "-_" or part[-1] in "-_":
            return f"label {part!r} starts or ends with '-' or '_'"
        if i == len(parts) - 1 and part[0].isascii() and part[0].isdigit():
            return f"the last label {part!r} starts with a digit (it would read as an IP address)"
    return None
