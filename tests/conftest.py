"""Fixtures for the whole suite: a real private dockerd and a strict master.

- ``dockerd`` (session): a private dockerd with ``SESSION_LABELS``, Docker ``Name``
  ``SESSION_NODE_NAME``, a unix socket and a plain TCP listener on 127.0.0.1, populated
  with the fixture containers.  If a test stops or kills it, it is started again after
  that test (its running containers have ``restart=always`` and come back).
- ``docker_fixture_set`` (session): what ``populate()`` created on it.
- ``tls_dockerd`` (session, started on first use): TLS-only TCP with a throwaway CA.
- ``dockerd_factory``: ``make(**Dockerd kwargs)`` for private, throwaway instances
  (fault tests that crash or break dockerd, or add/remove containers, use these: the
  session dockerd's containers are shared by every test and must stay as populated).
- ``master`` / ``master_factory``: a strict master per test.  After the test, any
  request that broke the contract fails the test, unless it set ``allow_invalid``.
  ``master`` expects the secret of ``master_secret`` (none; a module overrides it).

- ``other_user``: the ids of another user (nobody), for tests that hand a file to it or
  run a program as it; it needs root.

Nothing is skipped: if dockerd cannot start, these fixtures error loudly.

**Markers from what a test uses.** A test that uses ``dockerd``, ``dockerd_factory`` or
``tls_dockerd`` (itself or through another fixture) is marked ``docker``, and one that
uses ``other_user`` is marked ``root``, whatever its module says: a marker cannot claim
less than the test needs, so the fast tier never selects a test that needs root or
Docker. ``pytest --tier NAME`` selects a tier (``TIERS``, docs/developer-guide.md), and
``--unprivileged`` (root only) runs the fast tier's share of the selection as a new
unprivileged user, beside the rest (tests/support/unprivileged.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from agentproc import NOBODY
from support import unprivileged
from support.dockerd import Dockerd, FixtureSet, populate
from support.master import GENERATIONS, Master

#: daemon labels of the session dockerd: a value with '=', unicode, an empty value
SESSION_LABELS: dict[str, str] = {
    "zone": "eu-1",
    "dm.query": "a=b=c",
    "régiön": "Zürich ✓ 日本",
    "empty": "",
}
#: Docker's Name of the session dockerd (a space and a non-ASCII letter: it must be
#: percent-encoded in the registration path)
SESSION_NODE_NAME = "dm-test-node-ü"  # a domain name to the master (Guava lets non-ASCII pass)

_session: list[Dockerd] = []

#: each tier by the markers it leaves out: ``pytest --tier NAME`` (the Makefile's
#: ``check-fast`` and ``unit``), and what ``--unprivileged`` runs as another user
TIERS: dict[str, tuple[str, ...]] = {
    "fast": ("docker", "root", "system", "packages"),
    "unit": ("docker", "root", "system", "packages", "paced"),
}
#: the marker that a test using one of these fixtures gets, directly or through others
FIXTURE_MARKERS: dict[str, frozenset[str]] = {
    "docker": frozenset({"dockerd", "dockerd_factory", "tls_dockerd"}),
    "root": frozenset({"other_user"}),
}
def tier_expression(tier: str) -> str:
    """The ``-m`` expression of ``tier``, e.g. ``not docker and not root and …``."""
    return " and ".join(f"not {marker}" for marker in TIERS[tier])


def in_tier(item: pytest.Item, tier: str) -> bool:
    return not any(item.get_closest_marker(marker) for marker in TIERS[tier])


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dm-agent")
    group.addoption("--tier", choices=sorted(TIERS),
                    help="run one tier: " + "; ".join(f"{name}: -m '{tier_expression(name)}'"
                                                     for name in TIERS))
    unprivileged.addoption(group)


def pytest_configure(config: pytest.Config) -> None:
    tier = config.getoption("tier")
    if tier:
        expr = tier_expression(tier)
        given = config.option.markexpr
        config.option.markexpr = f"({given}) and ({expr})" if given else expr
    unprivileged.configure(config, lambda item: in_tier(item, "fast"))


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark a test by the fixtures it uses (before ``-m`` selects)."""
    names = set(item.fixturenames)
    for marker, fixtures in FIXTURE_MARKERS.items():
        if names & fixtures and not item.get_closest_marker(marker):
            item.add_marker(marker)


def agent_version() -> str | None:
    """dm_agent.__version__, or None while the package does not import."""
    try:
        from dm_agent import __version__
    except Exception:
        return None
    return str(__version__)


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise RuntimeError(f"{what} needs root; run the tests as root")


@pytest.fixture(scope="session")
def dockerd() -> Iterator[Dockerd]:
    _require_root("the dockerd fixture")
    d = Dockerd(labels=SESSION_LABELS, tcp=True, hostname=SESSION_NODE_NAME)
    try:
        d.start()
        populate(d)
    except BaseException:
        d.close()
        raise
    _session.append(d)
    try:
        yield d
    finally:
        _session.remove(d)
        d.close()


@pytest.fixture(autouse=True)
def _session_dockerd_stays_up() -> Iterator[None]:
    yield
    for d in _session:  # only when a test already started it
        if not d.running:
            d.start()


@pytest.fixture
def other_user() -> tuple[int, int]:
    """(uid, gid) of a user the test's process is not: to chown files to, or to run a
    program as with setpriv (``as_user``). Root only: an unprivileged process can do
    neither, so the test is marked ``root``."""
    _require_root("the other_user fixture (chown to another user, setpriv)")
    return NOBODY, NOBODY


@pytest.fixture(scope="session")
def docker_fixture_set(dockerd: Dockerd) -> FixtureSet:
    assert dockerd.fixture_set is not None
    return dockerd.fixture_set


@pytest.fixture(scope="session")
def tls_dockerd() -> Iterator[Dockerd]:
    _require_root("the tls_dockerd fixture")
    d = Dockerd(labels={"transport": "tls", "dm.query": "x=y"}, tls=True)
    try:
        d.start()
        populate(d)
        yield d
    finally:
        d.close()


@pytest.fixture
def dockerd_factory() -> Iterator[Callable[..., Dockerd]]:
    _require_root("the dockerd_factory fixture")
    made: list[Dockerd] = []

    def make(**kwargs: Any) -> Dockerd:
        d = Dockerd(**kwargs)
        made.append(d)
        return d.start()

    yield make
    errors = []
    for d in reversed(made):
        try:
            d.close()
        except Exception as e:  # close the others anyway
            errors.append(e)
    if errors:
        raise errors[0]


def _finish(m: Master) -> None:
    m.stop()
    if not m.allow_invalid:
        m.assert_valid()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test with the ``master`` fixture runs against both master generations
    (``master-v1``, ``master-v2``), but those that boot a systemd root (``system``):
    their subject is the service, and a boot costs seconds."""
    if "master" in metafunc.fixturenames:
        both = metafunc.definition.get_closest_marker("system") is None
        metafunc.parametrize("master", GENERATIONS if both else ("v1",), indirect=True,
                             ids=lambda g: f"master-{g}")


@pytest.fixture
def master_secret() -> str | None:
    """The secret the ``master`` fixture expects: none; a module overrides this fixture
    to give its own."""
    return None


@pytest.fixture
def master(request: pytest.FixtureRequest, master_secret: str | None) -> Iterator[Master]:
    m = Master(expected_version=agent_version(), generation=request.param,
               secret=master_secret).start()
    yield m
    _finish(m)


@pytest.fixture
def master_factory() -> Iterator[Callable[..., Master]]:
    made: list[Master] = []

    def make(**kwargs: Any) -> Master:
        kwargs.setdefault("expected_version", agent_version())
        m = Master(**kwargs)
        made.append(m)
        return m.start()

    yield make
    for m in made:
        m.stop()
    for m in made:
        if not m.allow_invalid:
            m.assert_valid()
