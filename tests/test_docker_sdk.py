"""The API version negotiation, and the part of the Docker SDK the collector relies on
without a public call for it: these fail loudly when an SDK release changes them."""

from __future__ import annotations

import docker
import pytest
from docker.constants import DEFAULT_DOCKER_API_VERSION, MINIMUM_DOCKER_API_VERSION

from dm_agent.collectors.docker import negotiate
from dm_agent.errors import DockerError


@pytest.mark.parametrize(("server_min", "server_max", "want"), [
    ("1.12", "1.41", "1.41"),  # Docker 20.10: its newest
    ("1.24", "1.41", "1.41"),  # Podman 4.3 and 5
    ("1.24", "1.45", "1.45"),  # Docker 26
    ("1.44", "1.52", "1.45"),  # Docker 29: capped at the SDK's newest, above its minimum
    (None, "1.30", "1.30"),    # no MinAPIVersion
])
def test_negotiate_the_newest_common_version(server_min: str | None, server_max: str,
                                             want: str) -> None:
    assert negotiate(server_min, server_max, "1.24", "1.45") == want


def test_no_common_version_names_both_ranges() -> None:
    with pytest.raises(DockerError) as err:
        negotiate("1.46", "1.52", "1.24", "1.45")  # a future Engine, an old SDK
    assert "1.46-1.52" in str(err.value) and "1.24-1.45" in str(err.value)
    with pytest.raises(DockerError, match=r"1\.12-1\.20"):
        negotiate("1.12", "1.20", "1.24", "1.45")  # an Engine older than the SDK knows


def test_sdk_surface_the_collector_uses() -> None:
    """``api_get`` reads ``base_url``, ``api_version`` and ``timeout`` of an APIClient,
    which is a requests.Session; ``connect`` pins the version it negotiated."""
    import requests

    assert MINIMUM_DOCKER_API_VERSION and DEFAULT_DOCKER_API_VERSION
    client = docker.APIClient(base_url="unix:///nonexistent.sock", version="1.41", timeout=3)
    try:
        assert isinstance(client, requests.Session)
        assert client.api_version == "1.41"
        assert client.base_url == "http+docker://localhost"
        assert client.timeout == 3
    finally:
        client.close()
