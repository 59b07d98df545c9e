"""Test harness: a real private dockerd, a tiny local image, a strict master.

Import it as ``support`` (``from support.master import Master``): pytest puts ``tests/``
on ``sys.path``, as it does for ``agentproc``; a script outside the suite (bench/) puts
``tests/`` there itself. One spelling, so there is one copy of each module.

- ``support.dockerd``: ``Dockerd``, ``populate``, ``create_containers``, TLS files
- ``support.image``: the ``dmtest/busybox:1`` image
- ``support.master``: ``Master`` and ``validate_payload``
- ``support.unprivileged``: ``pytest --unprivileged``, the fast tier run as a new user
  beside a root run (``make test``)
"""

from __future__ import annotations

from .dockerd import (
    API_VERSION,
    BulkResult,
    Dockerd,
    DockerdError,
    FixtureContainer,
    FixtureSet,
    TlsFiles,
    create_containers,
    make_tls_files,
    parse_labels,
    populate,
    remove_containers,
)
from .image import IMAGE, ensure_image, rootfs_tarball
from .master import MODES, Master, MasterTimeout, RecordedRequest, validate_payload

__all__ = [
    "API_VERSION",
    "IMAGE",
    "MODES",
    "BulkResult",
    "Dockerd",
    "DockerdError",
    "FixtureContainer",
    "FixtureSet",
    "Master",
    "MasterTimeout",
    "RecordedRequest",
    "TlsFiles",
    "create_containers",
    "ensure_image",
    "make_tls_files",
    "parse_labels",
    "populate",
    "remove_containers",
    "rootfs_tarball",
    "validate_payload",
]
