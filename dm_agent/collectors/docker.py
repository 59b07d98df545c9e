"""Docker collector: the node's name and labels and every container, two requests a round.

The low-level ``docker.APIClient`` is created lazily on the first round, speaking the
newest API version both the Engine and the SDK know (``negotiate``), so an old or new
Engine, Docker or Podman, both work. Whatever Docker answers, the parsing below either
returns plain JSON-able data or raises :class:`DockerError` — never anything else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from ..errors import DockerError
from .jsonarray import decode_array

_API_RE = re.compile(r"^\d+\.\d+$")


def _vkey(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


class DockerTLS(NamedTuple):
    ca: str | None
    cert: str
    key: str


class NodeInfo(NamedTuple):
    """What Docker says about the node; ``containers`` are payload-ready dicts."""

    name: str
    labels: dict[str, str]
    containers: list[dict[str, Any]]


def parse_daemon_labels(raw: Any) -> dict[str, str]:
    """Docker's ``Labels`` of /info: a list of ``key=value``, split at the first ``=``."""
    if raw is None:
        return {}
    if isinstance(raw, Mapping):  # very old engines answered a map
        return {str(k): _text(v) for k, v in raw.items()}
    if not isinstance(raw, list):
        raise DockerError(f"Docker /info Labels is a {type(raw).__name__}, expected a list")
    labels: dict[str, str] = {}
    for item in raw:
        if not isinstance(item, str):
            continue
        key, _, value = item.partition("=")
        labels[key] = value
    return labels


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def container_labels(raw: Any, shared: dict[str, str] | None = None) -> dict[str, str]:
    """Labels as str → str. With ``shared``, equal strings are one object across all the
    containers of a list (label keys, compose project names, image names repeat a lot)."""
    if not isinstance(raw, Mapping):
        return {}
    if shared is None:
        return {_text(k): _text(v) for k, v in raw.items()}
    share = shared.setdefault
    return {share(k, k): share(v, v) for k, v in ((_text(k), _text(v)) for k, v in raw.items())}


def container_name(names: Any, node: str, fallback: str) -> str:
    """The container's own name: ``Names`` without ``/`` and without a ``/node/`` prefix.

    With legacy links Docker lists aliases such as ``/web/db`` too; the primary name is
    the one with a single leading slash, so it is preferred over ``Names[0]``.
    """
    if not isinstance(names, list):
        return fallback
    texts = [n for n in names if isinstance(n, str) and n]
    if not texts:
        return fallback
    primary = next((n for n in texts if "/" not in n[1:]), texts[0])
    name = primary.lstrip("/")
    prefix = node + "/"
    if node and name.startswith(prefix) and len(name) > len(prefix):
        name = name[len(prefix):].lstrip("/")
    return name or fallback


def parse_containers(raw: Any, node: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise DockerError(
            f"Docker /containers/json answered a {type(raw).__name__}, expected a list"
        )
    out: list[dict[str, Any]] = []
    for item in raw:
        if isinstance(item, _Entry):
            out.append(item)
        elif isinstance(item, Mapping) and (entry := container_entry(item, node)) is not None:
            out.append(entry)
    return out


def parse_info(raw: Any) -> tuple[str, dict[str, str]]:
    if not isinstance(raw, Mapping):
        raise DockerError(f"Docker /info answered a {type(raw).__name__}, expected an object")
    name = raw.get("Name")
    if not isinstance(name, str) or not name.strip():
        raise DockerError("Docker /info has no Name")
    return name, parse_daemon_labels(raw.get("Labels"))


def negotiate(server_min: str | None, server_max: str, sdk_min: str, sdk_max: str) -> str:
    """The API version to speak: the newest both sides know, never below the server's
    minimum (Docker 29 refuses anything below 1.44) nor above the SDK's maximum.
    Raises DockerError, naming both ranges, when they do not overlap."""
    low = max(_vkey(sdk_min), _vkey(server_min)) if server_min else _vkey(sdk_min)
    high = min(_vkey(sdk_max), _vkey(server_max))
    if low > high:
        server = f"{server_min or '?'}-{server_max}"
        raise DockerError(
            f"Docker speaks API {server} and this agent's Docker SDK {sdk_min}-{sdk_max}: "
            "no common version; upgrade dm-agent (newer Engine) or the Engine (older one)")
    return ".".join(str(p) for p in high)


def connect(endpoint: str, tls: DockerTLS | None = None, timeout: float | None = 10.0) -> Any:
    """A low-level ``APIClient`` speaking the version ``negotiate`` picks. Raises DockerError.

    The SDK's own ``version="auto"`` takes the server's newest version as it is, even
    one above what the SDK knows, and ignores the server's minimum; so the versions are
    read with an unversioned ``GET /version`` and the client is made again, pinned."""
    import docker
    from docker.constants import DEFAULT_DOCKER_API_VERSION as SDK_MAX
    from docker.constants import MINIMUM_DOCKER_API_VERSION as SDK_MIN

    from ..net import system_ca_bundle

    tls_config: Any = False
    if tls is not None:
        tls_config = docker.tls.TLSConfig(
            client_cert=(tls.cert, tls.key),
            ca_cert=tls.ca,
            verify=tls.ca or system_ca_bundle(),
        )

    def client_at(version: str) -> Any:
        # A fixed version constructs without connecting.
        client = docker.APIClient(base_url=endpoint, version=version, timeout=timeout,
                                  tls=tls_config, user_agent="dm-agent")
        # requests lets REQUESTS_CA_BUNDLE and proxies from the environment override
        # the CA configured here: the node's Docker must be reached as configured.
        client.trust_env = False
        return client

    try:
        probe = client_at(SDK_MIN)
    except Exception as exc:
        raise DockerError(f"bad Docker endpoint {endpoint}: {_reason(exc)}",
                          "endpoint") from None
    try:
        server = probe.version(api_version=False)
    except Exception as exc:
        raise DockerError(f"cannot reach Docker at {endpoint}: {_reason(exc)}",
                          failure_kind(exc)) from None
    finally:
        probe.close()
    api = server.get("ApiVersion") if isinstance(server, Mapping) else None
    if not isinstance(api, str) or not _API_RE.match(api):
        raise DockerError(f"Docker at {endpoint} sent no usable ApiVersion")
    low = server.get("MinAPIVersion")
    version = negotiate(low if isinstance(low, str) and _API_RE.match(low) else None,
                        api, SDK_MIN, SDK_MAX)
    return client_at(version)


def api_get(client: Any, path: str, params: Mapping[str, Any]) -> Any:
    """A streamed ``GET`` of a versioned API path, answered as a ``requests.Response``
    whose HTTP errors are raised. The SDK has no public call for a raw streamed request,
    so this is built from what it does make public: the client is a ``requests.Session``
    with ``base_url``, ``api_version`` and ``timeout`` (``tests/test_docker_sdk.py`` fails
    if an SDK release changes them)."""
    response = client.get(f"{client.base_url}/v{client.api_version}{path}", params=params,
                          stream=True, timeout=client.timeout)
    try:
        response.raise_for_status()
    except Exception:
        response.close()
        raise
    return response


class _Entry(dict):  # type: ignore[type-arg]
    """A container already in payload form (made while decoding, see ``list_containers``)."""


def container_entry(item: Mapping[str, Any], node: str,
                    shared: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The payload's view of one container of /containers/json, None when it has no Id."""
    cid = item.get("Id")
    if not isinstance(cid, str) or not cid:
        return None
    image = _text(item.get("Image"))
    if shared is not None:
        image = shared.setdefault(image, image)
    name = container_name(item.get("Names"), node, cid[:12].lstrip("/"))
    return _Entry(id=cid, name=name, image=image,
                  labels=container_labels(item.get("Labels"), shared))


def decode_containers(chunks: Iterable[bytes], node: str) -> Any:
    """The body of /containers/json, each container turned into its payload entry as it
    is decoded, so Docker's network, mount and config details (most of the ~650 bytes a
    container) are freed at once instead of living until the whole list is read: a third
    of the memory at 3,000 containers. Raises ValueError on malformed JSON."""
    shared: dict[str, str] = {}

    def hook(obj: dict[str, Any]) -> Any:
        # Only a container has a list under "Names" (label values are strings).
        if "Id" in obj and isinstance(obj.get("Names"), list):
            return container_entry(obj, node, shared)
        return obj

    return decode_array(chunks, hook)


def list_containers(client: Any, node: str) -> Any:
    """``GET /containers/json?all=1``, decoded lean. Raises on HTTP errors."""
    # The SDK's containers() makes the same request but decodes every field.
    response = api_get(client, "/containers/json", {"all": 1})
    try:
        return decode_containers(response.iter_content(CHUNK), node)
    finally:
        response.close()


CHUNK = 64 * 1024


class DockerCollector:
    """Reads /info and /containers/json?all=1 from one Docker endpoint.

    ``collect(relist=False)`` keeps the container list of the previous round: the agent
    asks for that only while Docker's event stream says nothing has changed.
    ``reinfo=False`` keeps the name and labels of the previous ``/info`` likewise: it is
    the slowest call on Podman 4 (0.9 s, against 10 ms on Docker), which would otherwise
    delay every registration a container event triggers.
    """

    def __init__(self, endpoint: str, tls: DockerTLS | None = None, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self.tls = tls
        self.timeout = timeout
        self._client: Any = None
        self._containers: list[dict[str, Any]] | None = None
        self._info: tuple[str, dict[str, str]] | None = None

    def close(self) -> None:
        self._containers = None
        self._info = None
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken client must not matter
                pass

    def collect(self, relist: bool = True, reinfo: bool = True) -> NodeInfo:
        """One round: node name, daemon labels, every container. Raises DockerError.

        The returned ``containers`` list is the same object as long as it was not
        re-read, so callers can cache what they derive from it."""
        if self._client is None:
            self._client = connect(self.endpoint, self.tls, self.timeout)
        try:
            if reinfo or self._info is None:
                self._info = None
                self._info = parse_info(self._client.info())
            name, labels = self._info
            if relist or self._containers is None:
                self._containers = None
                self._containers = parse_containers(list_containers(self._client, name), name)
        except DockerError:
            raise
        except Exception as exc:
            self.close()  # renegotiate next round (the Engine may have been upgraded)
            raise DockerError(f"Docker at {self.endpoint} failed: {_reason(exc)}",
                              failure_kind(exc)) from None
        return NodeInfo(name=name, labels=labels, containers=self._containers)


def failure_kind(exc: BaseException) -> str:
    """The flood-control kind of what the SDK raised (see DockerError)."""
    import requests
    from docker.errors import APIError

    if isinstance(exc, (APIError, requests.exceptions.HTTPError)):
        return "api"
    if isinstance(exc, requests.exceptions.SSLError):
        return "tls"
    if isinstance(exc, (requests.exceptions.Timeout, TimeoutError)) or "timed out" in str(exc):
        return "timeout"
    if isinstance(exc, (requests.exceptions.ConnectionError, OSError)):
        return "connection"
    return "answer"


def _reason(exc: BaseException) -> str:
    """A one-line reason without the long urllib3 wrapping."""
    text = str(exc) or type(exc).__name__
    for marker in ("Connection refused", "No such file or directory", "Permission denied",
                   "timed out", "Name or service not known", "certificate verify failed"):
        if marker in text:
            return marker
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."
