"""Unit tests of what the Docker collector makes of Docker's answers (any answer)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dm_agent import net
from dm_agent.collectors import docker as dk
from dm_agent.collectors.jsonarray import decode_array
from dm_agent.errors import DockerError


def test_daemon_labels_split_at_first_equals() -> None:
    raw = ["zone=eu-1", "expr=a=b=c", "flag", "empty=", "ünï=cödé"]
    assert dk.parse_daemon_labels(raw) == {
        "zone": "eu-1", "expr": "a=b=c", "flag": "", "empty": "", "ünï": "cödé"}
    assert dk.parse_daemon_labels(None) == {}
    assert dk.parse_daemon_labels({"old": "map"}) == {"old": "map"}
    with pytest.raises(DockerError, match="Labels is a str"):
        dk.parse_daemon_labels("zone=eu-1")


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["/web1"], "web1"),
        (["/node-a/web1"], "web1"),
        (["/other/db", "/db"], "db"),  # legacy link alias listed first
        (["web1"], "web1"),
        ([], "4970ae0123ab"),
        (None, "4970ae0123ab"),
        ([None, 3], "4970ae0123ab"),
        (["//odd"], "odd"),
        (["/"], "4970ae0123ab"),
    ],
)
def test_container_name(names: Any, expected: str) -> None:
    assert dk.container_name(names, "node-a", "4970ae0123ab") == expected


def test_containers_null_labels_and_garbage_items() -> None:
    raw = [
        {"Id": "a" * 64, "Names": ["/one"], "Image": "nginx:1.25", "Labels": None},
        {"Id": "b" * 64, "Names": ["/two"], "Image": "busybox", "Labels": {"k": "v=w", "n": None}},
        "garbage",
        {"Names": ["/no-id"]},
        {"Id": "c" * 64, "Image": None, "Labels": []},
    ]
    out = dk.parse_containers(raw, "node")
    assert out == [
        {"id": "a" * 64, "name": "one", "image": "nginx:1.25", "labels": {}},
        {"id": "b" * 64, "name": "two", "image": "busybox", "labels": {"k": "v=w", "n": ""}},
        {"id": "c" * 64, "name": "c" * 12, "image": "", "labels": {}},
    ]
    with pytest.raises(DockerError, match="expected a list"):
        dk.parse_containers({"message": "oops"}, "node")


def test_info_needs_a_name() -> None:
    assert dk.parse_info({"Name": "n1", "Labels": ["a=b"]}) == ("n1", {"a": "b"})
    for bad in ({}, {"Name": ""}, {"Name": 7}, [], "x", None):
        with pytest.raises(DockerError):
            dk.parse_info(bad)


def test_tcp_address() -> None:
    assert net.tcp_address("tcp://10.0.0.1:2375") == "10.0.0.1:2375"
    assert net.tcp_address("https://h:2376") == "h:2376"
    assert net.tcp_address("unix:///var/run/docker.sock") is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
container_like = st.fixed_dictionaries(
    {},
    optional={"Id": json_values | st.text(min_size=1), "Names": json_values
              | st.lists(st.text(), max_size=3), "Image": json_values,
              "Labels": json_values | st.dictionaries(st.text(), st.text() | st.none())},
)


@settings(max_examples=300, deadline=None)
@given(info=json_values | st.fixed_dictionaries({"Name": st.text(), "Labels": json_values}),
       containers=json_values | st.lists(container_like | json_values, max_size=6))
def test_any_answer_parses_or_raises_docker_error(info: Any, containers: Any) -> None:
    try:
        name, labels = dk.parse_info(info)
        out = dk.parse_containers(containers, name)
    except DockerError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    for c in out:
        assert set(c) == {"id", "name", "image", "labels"}
        assert all(isinstance(c[k], str) for k in ("id", "name", "image"))
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in c["labels"].items())


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 3, 7, 64, 100000])
def test_decode_array_streams_any_chunking(size: int) -> None:
    doc = [{"Id": "a", "Names": ["/ü"], "Labels": {"k": "v=w"}}, 12, "s", [1, [2]], None,
           True, {"x": {"Id": 1}}, 3.5e10, {}]
    data = json.dumps(doc, ensure_ascii=False).encode()
    assert decode_array(chunked(data, size), lambda o: o) == doc
    assert decode_array(chunked(b"  [ ]  ", size), lambda o: o) == []
    assert decode_array(chunked(b'{"message": "x"}', size), lambda o: o) == {"message": "x"}
    for bad in (b"[1,", b"[1 2]", b"[1,]", b"[", b"[{", b"", b"nul"):
        with pytest.raises(ValueError):
            decode_array(chunked(bad, size), lambda o: o)


@settings(max_examples=300, deadline=None)
@given(doc=json_values, size=st.integers(1, 50))
def test_decode_array_equals_json_loads(doc: Any, size: int) -> None:
    data = json.dumps(doc).encode()
    assert decode_array(chunked(data, size), lambda o: o) == json.loads(data)
