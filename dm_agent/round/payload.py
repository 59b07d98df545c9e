"""The registration body, exactly as the master's NodeAgentData DTO reads it (docs/design.md §1)."""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

from ..collectors.docker import NodeInfo


def timestamp(fmt: str = "utc", now: _dt.datetime | None = None) -> str:
    """``utc``: ISO-8601 with a ``Z`` suffix, which a ``ZonedDateTime`` reads and a
    ``LocalDateTime`` reads with the ``Z`` dropped; ``local``: without offset (only a
    ``LocalDateTime`` reads it)."""
    if fmt == "utc":
        now = now or _dt.datetime.now(_dt.timezone.utc)
        now = now.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return now.isoformat(timespec="microseconds") + "Z"
    now = now or _dt.datetime.now()
    return now.replace(tzinfo=None).isoformat(timespec="microseconds")


def build(node: NodeInfo, address: str, system: dict[str, Any],
          time_format: str = "utc", now: _dt.datetime | None = None) -> dict[str, Any]:
    return {
        "time": timestamp(time_format, now),
        "id": node.name,
        "name": node.name,
        "address": address,
        "labels": node.labels,
        "containers": node.containers,
        "system": system,
    }


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class Encoder:
    """Compact UTF-8 JSON of a body (non-ASCII labels stay readable and short).

    The container list is most of a body (~150 bytes a container) and rarely changes:
    its encoding is kept while the collector hands over the same list object."""

    def __init__(self) -> None:
        self._containers: Any = None
        self._containers_json = b"[]"

    def encode(self, body: dict[str, Any]) -> bytes:
        containers = body["containers"]
        if containers is not self._containers:
            self._containers_json = _dumps(containers)
            self._containers = containers
        parts = [b'"' + key.encode() + b'":' + (self._containers_json if key == "containers"
                                                 else _dumps(value))
                 for key, value in body.items()]
        return b"{" + b",".join(parts) + b"}"
