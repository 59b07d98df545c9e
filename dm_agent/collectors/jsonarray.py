"""A JSON array decoded element by element as its bytes arrive.

Docker's container list is the largest answer the agent reads (2 MB at 3,000
containers); decoding it as it streams in, with each element turned into what the
agent keeps by an ``object_hook``, means neither the body nor its text is ever held.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterable
from typing import Any


def decode_array(chunks: Iterable[bytes], hook: Callable[[dict[str, Any]], Any]) -> Any:
    """Decode a JSON array element by element as its bytes arrive, so neither the whole
    body nor its text is ever held (2 MB each at 3,000 containers). Anything that is not
    an array is decoded whole. Raises ValueError on malformed JSON."""
    decoder = json.JSONDecoder(object_hook=hook)
    utf8 = codecs.getincrementaldecoder("utf-8")()
    it = iter(chunks)
    buf, pos, eof = "", 0, False

    def more() -> bool:
        """Drop what was decoded, append the next chunk; False at the end."""
        nonlocal buf, pos, eof
        if eof:
            return False
        buf, pos = buf[pos:], 0
        for chunk in it:
            if chunk:
                buf += utf8.decode(chunk)
                return True
        buf += utf8.decode(b"", final=True)
        eof = True
        return False

    def skip_space() -> bool:
        """Move past white space; False when the input ends."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return True
            if not more():
                return False

    if not skip_space() or buf[pos] != "[":
        while more():
            pass
        return decoder.decode(buf)
    pos += 1
    out: list[Any] = []
    while True:
        if not skip_space():
            raise ValueError("JSON array ends early")
        if buf[pos] == "]" and not out:
            return out
        try:
            value, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if more():
                continue  # the element is not complete yet
            raise
        if buf[pos] not in "[{\"" and (end == len(buf) or buf[end] not in " \t\r\n,]") \
                and more():
            continue  # a bare number ("0" of "0.5") may go on in the next chunk
        out.append(value)
        pos = end
        if not skip_space():
            raise ValueError("JSON array ends early")
        if buf[pos] == "]":
            return out
        if buf[pos] != ",":
            raise ValueError(f"expected ',' or ']' in the array, got {buf[pos]!r}")
        pos += 1
