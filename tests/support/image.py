"""A tiny local image, ``dmtest/busybox:1``, built from Debian's busybox-static.

There is no registry here.  The rootfs holds ``/bin/busybox`` and a few applet symlinks
(``sh``, ``sleep``, ``true``...) and is imported with ``POST /images/create?fromSrc=-``.
The busybox binary is, in order of preference: the installed ``busybox`` when it is
statically linked (the busybox-static package), the busybox-static .deb in apt's cache,
or one fetched with ``apt-get download busybox-static`` — both unpacked with ``dpkg -x``.
The rootfs tarball is built once per process (per cache directory) and reused.
"""

from __future__ import annotations

import glob
import io
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .dockerd import Dockerd

__all__ = ["APPLETS", "IMAGE", "busybox_binary", "ensure_image", "rootfs_tarball"]

IMAGE = "dmtest/busybox:1"
APPLETS = ("sh", "sleep", "true", "false", "cat", "echo", "ls", "env", "hostname")

_lock = threading.Lock()
_tarballs: dict[Path, Path] = {}
_default_cache: Path | None = None


def _is_static_elf(path: Path) -> bool:
    """A 64-bit little-endian ELF executable without a PT_INTERP program header."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return False
            phoff = struct.unpack_from("<Q", head, 0x20)[0]
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(
        struct.unpack_from("<I", table, i * phentsize)[0] != 3  # PT_INTERP
        for i in range(phnum)
    )


def _from_deb(deb: Path, cache_dir: Path) -> Path:
    out = cache_dir / "busybox-static"
    subprocess.run(["dpkg", "-x", str(deb), str(out)], check=True, capture_output=True)
    for candidate in (out / "bin" / "busybox", out / "usr" / "bin" / "busybox"):
        if _is_static_elf(candidate):
            return candidate
    raise RuntimeError(f"{deb} holds no static busybox")


def busybox_binary(cache_dir: Path) -> Path:
    """Find or fetch a statically linked busybox (see the module docstring)."""
    for name in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox") or ""):
        if name and _is_static_elf(Path(name)):
            return Path(name).resolve()
    debs = sorted(glob.glob("/var/cache/apt/archives/busybox-static_*.deb"))
    if debs:
        return _from_deb(Path(debs[-1]), cache_dir)
    dl = cache_dir / "deb"
    dl.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["apt-get", "download", "busybox-static"], cwd=dl, capture_output=True, text=True
    )
    debs = sorted(glob.glob(str(dl / "busybox-static_*.deb")))
    if proc.returncode != 0 or not debs:
        raise RuntimeError(
            "no static busybox: install Debian's busybox-static package "
            f"(apt-get download said: {proc.stderr.strip()})"
        )
    return _from_deb(Path(debs[-1]), cache_dir)


def _cache_dir_default() -> Path:
    global _default_cache
    if _default_cache is None:
        env = os.environ.get("DM_TEST_CACHE_DIR")
        if env:
            _default_cache = Path(env)
            _default_cache.mkdir(parents=True, exist_ok=True)
        else:
            _default_cache = Path(tempfile.mkdtemp(prefix="dmtest-cache-"))
            import atexit

            atexit.register(shutil.rmtree, _default_cache, True)
    return _default_cache


def rootfs_tarball(cache_dir: Path | None = None) -> Path:
    """The rootfs tarball (built on first call, then cached)."""
    cache_dir = cache_dir or _cache_dir_default()
    with _lock:
        if cache_dir in _tarballs and _tarballs[cache_dir].exists():
            return _tarballs[cache_dir]
        cache_dir.mkdir(parents=True, exist_ok=True)
        busybox = busybox_binary(cache_dir)
        target = cache_dir / "dmtest-busybox-rootfs.tar"
        tmp = target.with_suffix(".tmp")

        def dir_entry(name: str, mode: int = 0o755) -> tarfile.TarInfo:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode = tarfile.DIRTYPE, mode
            return ti

        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for d in ("bin", "etc", "tmp", "proc", "sys", "dev"):
                tar.addfile(dir_entry(d, 0o1777 if d == "tmp" else 0o755))
            data = busybox.read_bytes()
            ti = tarfile.TarInfo("bin/busybox")
            ti.size, ti.mode = len(data), 0o755
            tar.addfile(ti, io.BytesIO(data))
            for applet in APPLETS:
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
            passwd = b"root:x:0:0:root:/:/bin/sh\n"
            ti = tarfile.TarInfo("etc/passwd")
            ti.size, ti.mode = len(passwd), 0o644
            tar.addfile(ti, io.BytesIO(passwd))
        tmp.replace(target)
        _tarballs[cache_dir] = target
        return target


def ensure_image(dockerd: Dockerd, ref: str = IMAGE, cache_dir: Path | None = None) -> str:
    """Import the busybox rootfs as ``ref`` unless it exists; return the image ID."""
    from .dockerd import DockerdError

    try:
        return str(dockerd.api(f"/images/{ref}/json")["Id"])
    except DockerdError as e:
        if "404" not in str(e):
            raise
    repo, _, tag = ref.rpartition(":")
    if not repo or "/" in tag:
        repo, tag = ref, "latest"
    data = rootfs_tarball(cache_dir).read_bytes()
    dockerd.api(
        "/images/create",
        "POST",
        data,
        params={"fromSrc": "-", "repo": repo, "tag": tag},
        expect_json=False,
        timeout=120,
    )
    return str(dockerd.api(f"/images/{ref}/json")["Id"])
