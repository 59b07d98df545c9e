"""The container image's archives (``make image``), a local registry on loopback, and a
rootful Podman CLI with its own storage, for tests/test_image.py (docs/design.md §7).

``ensure_image`` is the cached step: it runs packaging/build-image.sh only when an
archive is missing or older than one of its inputs (the frozen programs, image/, the
build script), so `make check`, which builds the image before the suite, costs nothing
here, and a test run after a new freeze gets a fresh image (~15 s).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from .dockerd import DOCKER_CLI
from .gateway import free_port

REPO = Path(__file__).resolve().parents[2]
BUILD_IMAGE = REPO / "packaging" / "build-image.sh"
ARCHES = ("amd64", "arm64")


def version() -> str:
    for line in (REPO / "dm_agent" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__ = "):
            return line.split('"')[1]
    raise AssertionError("no __version__ in dm_agent/__init__.py")


@dataclass(frozen=True)
class ImageFiles:
    """What build-image.sh leaves in one output directory."""

    dist: Path
    version: str

    @property
    def oci(self) -> Path:
        return self.dist / f"dm-agent-{self.version}-image.oci.tar"

    def docker(self, arch: str) -> Path:
        return self.dist / f"dm-agent-{self.version}-image-{arch}.docker.tar"

    @property
    def digest(self) -> str:
        return (self.dist / f"dm-agent-{self.version}-image.digest").read_text().strip()

    @property
    def sbom(self) -> Path:
        return self.dist / f"dm-agent-{self.version}-image.cdx.json"

    @property
    def tag(self) -> str:
        """The name ``docker load`` gives the per-architecture archives."""
        return f"dm-agent:{self.version}"

    def all(self) -> list[Path]:
        return [self.oci, self.sbom, *(self.docker(a) for a in ARCHES),
                self.dist / f"dm-agent-{self.version}-image.digest"]


def _inputs() -> list[Path]:
    files = [BUILD_IMAGE, *(REPO / "packaging" / n for n in ("sbom_image.py", "zopfli_layer.py")),
             *sorted((REPO / "image").iterdir())]
    for frozen in ("frozen", "frozen-arm64"):
        program = REPO / "build" / frozen / "dm-agent" / "dm-agent"
        if not program.exists():
            pytest.fail(f"the frozen program is missing ({program}): build it first with "
                        "`make frozen`", pytrace=False)
        files.append(program)
    return files


def build(dist: Path, work: Path) -> ImageFiles:
    """Run packaging/build-image.sh into *dist* (both architectures)."""
    env = {**os.environ, "DM_IMAGE_DIST": str(dist), "DM_IMAGE_WORK": str(work)}
    result = subprocess.run([str(BUILD_IMAGE)], env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"build-image.sh failed ({result.returncode}):\n{result.stderr}")
    return ImageFiles(dist, version())


def source_date_epoch() -> int:
    """The build's SOURCE_DATE_EPOCH (packaging/build-env.sh): set, or the last commit's."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    out = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%ct"],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def created(archive: Path) -> int:
    """The image's created time, in seconds (build-image.sh: SOURCE_DATE_EPOCH)."""
    stamp = str(image_config(archive)["created"]).replace("Z", "+00:00")
    return int(datetime.fromisoformat(stamp).timestamp())


def ensure_image() -> ImageFiles:
    """The image in dist/, rebuilt when missing, older than its inputs, or of another
    SOURCE_DATE_EPOCH (a commit since: the same tree then builds other bytes)."""
    files = ImageFiles(REPO / "dist", version())
    newest_input = max(p.stat().st_mtime for p in _inputs())
    if all(p.exists() and p.stat().st_mtime >= newest_input for p in files.all()) \
            and created(files.docker("amd64")) == source_date_epoch():
        return files
    return build(files.dist, REPO / "build" / "image")


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(name)
    assert f is not None, name
    return f.read()


def image_config(archive: Path) -> dict[str, Any]:
    """The image config of a ``docker load`` archive (its manifest.json's Config)."""
    with tarfile.open(archive) as tar:
        manifest = json.loads(_member(tar, "manifest.json"))
        return json.loads(_member(tar, manifest[0]["Config"]))  # type: ignore[no-any-return]


def layer_members(archive: Path) -> dict[str, tarfile.TarInfo]:
    """The files of a ``docker load`` archive's single layer, by path (no leading ./)."""
    with tarfile.open(archive) as tar:
        manifest = json.loads(_member(tar, "manifest.json"))
        assert len(manifest[0]["Layers"]) == 1, "FROM scratch: one layer, ours"
        with tarfile.open(fileobj=io.BytesIO(_member(tar, manifest[0]["Layers"][0]))) as layer:
            return {m.name.removeprefix("./").rstrip("/"): m for m in layer.getmembers()}


def _end(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a helper server still running, SIGKILL it after 10 s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Registry:
    """Debian's ``docker-registry`` (the distribution registry) on 127.0.0.1, plain HTTP,
    its config and storage in a temporary directory."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="dmtest-registry-")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Registry:
        base = Path(self._tmp.name)
        config = base / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {base / 'data'}\n"
            f"http:\n  addr: {self.address}\n")
        log = open(base / "registry.log", "wb")  # (the child keeps it)
        self._proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                      stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise AssertionError("docker-registry did not answer: "
                                     + (base / "registry.log").read_text(errors="replace"))
            time.sleep(0.1)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _end(self._proc)
        self._tmp.cleanup()


class PodmanCli:
    """Rootful ``podman`` with a storage of its own (vfs, in a short /tmp directory:
    podman refuses a runroot over 50 characters), not the machine's; ``close()`` removes it."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="dmpod-", dir="/tmp"))
        self.args = ["podman", "--root", str(self.base / "root"),
                     "--runroot", str(self.base / "run"), "--storage-driver", "vfs",
                     "--cgroup-manager", "cgroupfs", "--events-backend", "file"]

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.args, *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def close(self) -> None:
        self("rmi", "--all", "--force")
        shutil.rmtree(self.base, ignore_errors=True)


class PodmanService:
    """``podman system service`` of a PodmanCli's storage on a unix socket in its
    directory: Podman's Docker-compatible API, what a Podman node's agent reads."""

    def __init__(self, podman: PodmanCli) -> None:
        self.podman = podman
        self.socket = podman.base / "podman.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = podman.base / "service.log"

    def _curl(self, path: str) -> bytes | None:
        proc = subprocess.run(["curl", "-sf", "--max-time", "5", "--unix-socket",
                               str(self.socket), f"http://podman{path}"],
                              capture_output=True, stdin=subprocess.DEVNULL)
        return proc.stdout if proc.returncode == 0 else None

    def get(self, path: str) -> Any:
        body = self._curl(path)
        assert body is not None, f"podman's API: GET {path} failed"
        return json.loads(body)

    def name(self) -> str:
        return str(self.get("/info")["Name"])

    def __enter__(self) -> PodmanService:
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen(
                [*self.podman.args, "system", "service", "--time=0", f"unix://{self.socket}"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while self._curl("/_ping") is None:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise AssertionError("podman system service did not answer: "
                                     + self._log.read_text(errors="replace"))
            time.sleep(0.1)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _end(self._proc)


def docker_cli(host: str) -> list[str]:
    """The docker CLI against *host*, with an empty config (not the machine's)."""
    cfg = tempfile.mkdtemp(prefix="dmtest-dockercfg-")
    return [DOCKER_CLI, "--config", cfg, "-H", host]


def tools_missing() -> list[str]:
    return [t for t in ("buildah", "skopeo", "umoci", "docker-registry", "podman")
            if shutil.which(t) is None]
