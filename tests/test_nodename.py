"""The agent's node-name rule agrees with the test master's model of Guava's."""

from __future__ import annotations

import pytest
from support.master import name_problem

from dm_agent.round import nodename

NAMES = [
    "node-1", "node_1.example.com.", "a" * 63, "3com.com", "knoten-ü", "dm-test-node-ü",
    "a" * 64, ".".join(["a" * 50] * 5) + ".abcd", "10.0.0.1", "node.1x", "-node", "node_",
    "a..b", ".a", "node:1", "no de", "a/b", "", "x" * 300,
]


@pytest.mark.parametrize("name", NAMES)
def test_agent_and_master_agree(name: str) -> None:
    assert (nodename.problem(name) is None) is (name_problem(name) is None)


def test_the_reason_names_what_to_change() -> None:
    assert "starts with a digit" in (nodename.problem("10.0.0.1") or "")
    assert "'no de'" in (nodename.problem("no de") or "")
    assert "63" in (nodename.problem("a" * 64) or "")
