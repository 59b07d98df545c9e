"""The registration body, exactly as the master's NodeAgentData DTO reads it (DESIGN §1)."""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

from .collectors.docker import NodeInfo


def timestamp(fmt: str = "local", now: _dt.datetime | None = None) -> str:
    """``local``: ISO-8601 without offset (LocalDateTime); ``utc``: with a ``Z`` suffix."""
    if fmt == "utc":
        now = now or _dt.datetime.now(_dt.timezone.utc)
        now = now.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return now.isoformat(timespec="microseconds") + "Z"
    now = now or _dt.datetime.now()
    return now.replace(tzinfo=None).isoformat(timespec="microseconds")


def build(node: NodeInfo, address: str, system: dict[str, Any],
          time_format: str = "local", now: _dt.datetime | None = None) -> dict[str, Any]:
    return {
        "time": timestamp(time_format, now),
        "id": node.name,
        "name": node.name,
        "address": address,
        "labels": dict(node.labels),
        "containers": list(node.containers),
        "system": system,
    }


def encode(body: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (non-ASCII labels stay readable and short)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
