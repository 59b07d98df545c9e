"""Unit tests of the registration body and its time formats."""

from __future__ import annotations

import datetime as dt
import json

from dm_agent.collectors.docker import NodeInfo
from dm_agent.round import payload


def test_local_time_has_no_offset_and_parses_as_local_datetime() -> None:
    now = dt.datetime(2016, 8, 10, 15, 3, 5, 0)
    text = payload.timestamp("local", now)
    assert text == "2016-08-10T15:03:05.000000"
    assert dt.datetime.fromisoformat(text).tzinfo is None


def test_utc_time_has_z_and_is_the_default() -> None:
    now = dt.datetime(2016, 8, 10, 17, 3, 5, 559807, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert payload.timestamp("utc", now) == "2016-08-10T15:03:05.559807Z"
    assert payload.timestamp(now=now) == "2016-08-10T15:03:05.559807Z"


def test_body_fields_and_encoding() -> None:
    node = NodeInfo("docker-exp", {"zone": "eu-1"},
                    [{"id": "4970ae", "name": "web1", "image": "nginx", "labels": {"ü": "é"}}])
    system = {"cpuLoad": 12.5, "memory": {"total": 1, "available": 1, "used": 0},
              "disks": {}, "net": {}}
    body = payload.build(node, "172.31.0.12:2375", system)
    assert body["id"] == body["name"] == "docker-exp"
    assert body["address"] == "172.31.0.12:2375"
    assert list(body) == ["time", "id", "name", "address", "labels", "containers", "system"]
    raw = payload.Encoder().encode(body)
    assert json.loads(raw.decode("utf-8")) == body
    assert "ü".encode() in raw  # UTF-8, not \\u escapes


def test_encoder_equals_plain_json_and_reuses_the_container_list() -> None:
    containers = [{"id": "a", "name": "ü \"q\"", "image": "i", "labels": {"k": "v=w"}}]
    node = NodeInfo("n", {"l": "ö"}, containers)
    system = {"cpuLoad": 1.5, "memory": {}, "disks": {}, "net": {}}
    enc = payload.Encoder()
    first = payload.build(node, "a:1", system)
    assert json.loads(enc.encode(first)) == first
    # what the master reads: compact, no spaces after the separators
    assert enc.encode(first) == json.dumps(first, ensure_ascii=False,
                                           separators=(",", ":")).encode()
    # the same list object: its bytes are reused even if (wrongly) mutated in place
    containers.append({"id": "b", "name": "b", "image": "i", "labels": {}})
    second = payload.build(node, "a:1", system)
    assert len(json.loads(enc.encode(second))["containers"]) == 1
    # a new list object (what a re-read gives) is encoded afresh
    third = payload.build(NodeInfo("n", {}, list(containers)), "a:1", system)
    assert len(json.loads(enc.encode(third))["containers"]) == 2
