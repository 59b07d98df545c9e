"""Print the bill of materials of a frozen dm-agent onedir: CycloneDX 1.5 JSON.

Run by packaging/freeze.sh inside the build root, with the build venv's Python, right
after PyInstaller: it reads the payload itself, and finds where each of its files came
from in the root that built it.

- Every file of the payload belongs to exactly one component, and its sha256 is listed
  under that component (nested components of type "file", named by their path in the
  onedir). A bundled library must be byte-identical to the file it was copied from, which
  names its component: CPython or OpenSSL (built in the root from the tarballs pinned in
  packaging/build-env.sh, whose URL and sha256 are given), a Debian 11 package (dpkg's
  database: package, version, source package), or a Python distribution (its RECORD).
- Every Python distribution whose modules are in the executable's archive (PyInstaller's
  PYZ, read with PyInstaller's own reader) is a component with the version and the
  wheel's sha256 from packaging/requirements.lock.

A file or module it cannot attribute, a library that differs from its source, or a
distribution that the lock does not pin stops it: an incomplete bill is worse than none.
The output is a function of the payload and the root (timestamp: SOURCE_DATE_EPOCH;
serial number: derived from the executable's hash), so it is reproducible.

Usage: python sbom.py ONEDIR > dm-agent.cdx.json
Environment: VERSION, SOURCE_DATE_EPOCH, PREFIX, PY_VERSION, PY_URL, PY_SHA256,
             OSSL_VERSION, OSSL_URL, OSSL_SHA256 (freeze.sh sets them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
import urllib.parse
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from PyInstaller.archive.readers import CArchiveReader

ENV = os.environ
PREFIX = Path(ENV["PREFIX"])
PY_LIB = PREFIX / "python/lib"
OSSL_LIB = PREFIX / "openssl/lib"
SITE = Path(sysconfig.get_paths()["purelib"])
SRC = Path(ENV.get("DM_AGENT_SRC", "/src"))
LOCK = SRC / "packaging/requirements.lock"
WHEELHOUSE = PREFIX / "wheelhouse"
# (the root's own multiarch directories: x86_64-linux-gnu or aarch64-linux-gnu)
MULTIARCH = f"{platform.machine()}-linux-gnu"
SYSTEM_LIBDIRS = [Path(d) for d in (f"/lib/{MULTIARCH}", f"/usr/lib/{MULTIARCH}",
                                    "/lib64", "/usr/lib64", "/lib", "/usr/lib")]
DEBIAN_ARCHIVE = "https://deb.debian.org/debian"
# Licences of the Debian source packages a payload may take libraries from (Debian's
# copyright files are not all machine-readable). A library of a package missing here
# stops the build: add it with the licence from /usr/share/doc/<package>/copyright.
DEBIAN_LICENCES = {
    "zlib": "Zlib",
    "bzip2": "bzip2-1.0.6",
    "xz-utils": "LicenseRef-public-domain",  # liblzma: "put in the public domain"
    "libffi": "MIT",
    "util-linux": "BSD-3-Clause",  # libuuid
    "expat": "MIT",
    "libxcrypt": "LGPL-2.1-or-later",
    "gcc-10": "GPL-3.0-or-later WITH GCC-exception-3.1",  # libgcc_s
    "mpdecimal": "BSD-2-Clause",
}
# Python distributions whose metadata names no SPDX licence. PyInstaller: what is bundled
# of it is its bootloader (GPL-2.0+ with its exception) and run-time modules (Apache-2.0),
# as its COPYING.txt says.
PYTHON_LICENCES = {
    "pyinstaller": "GPL-2.0-or-later WITH Bootloader-exception AND Apache-2.0",
}


def die(msg: str) -> None:
    raise SystemExit(f"sbom.py: {msg}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def norm(name: str) -> str:
    """A distribution's name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def licence(expr: str) -> list[dict[str, Any]]:
    if re.fullmatch(r"[A-Za-z0-9.+-]+", expr) and not expr.startswith("LicenseRef-"):
        return [{"license": {"id": expr}}]
    if expr == "LicenseRef-public-domain":
        return [{"license": {"name": "public domain"}}]
    return [{"expression": expr}]


def read_lock() -> dict[str, tuple[str, set[str]]]:
    """name -> (version, sha256 hashes) from requirements.lock."""
    pins: dict[str, tuple[str, set[str]]] = {}
    name = ""
    for line in LOCK.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line):
            name = norm(m.group(1))
            pins[name] = (m.group(2), set())
        elif name and (m := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            pins[name][1].add(m.group(1))
    return pins


def python_licence(dist: metadata.Distribution) -> str:
    md = dist.metadata
    if norm(dist.name) in PYTHON_LICENCES:
        return PYTHON_LICENCES[norm(dist.name)]
    if expr := md.get("License-Expression"):
        return expr
    field = (md.get("License") or "").strip()
    if field != "UNKNOWN" and re.fullmatch(r"[A-Za-z0-9.+-]+( (AND|OR|WITH) [A-Za-z0-9.+-]+)*",
                                           field):
        return field
    classifiers = {c.rsplit(" :: ", 1)[-1] for c in md.get_all("Classifier") or []
                   if c.startswith("License :: ")}
    known = {"MIT License": "MIT", "Apache Software License": "Apache-2.0",
             "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0"}
    found = sorted(known[c] for c in classifiers if c in known)
    if len(found) == 1:
        return found[0]
    die(f"no SPDX licence for the Python distribution {dist.name} (License-Expression, "
        f"License: {field[:60]!r}, classifiers {sorted(classifiers)})")
    return ""


class Bom:
    def __init__(self, onedir: Path) -> None:
        self.onedir = onedir
        self.components: dict[str, dict[str, Any]] = {}
        self.files: dict[str, list[dict[str, Any]]] = {}
        self.imports: dict[str, set[str]] = {}
        self.pins = read_lock()
        self.site_owner: dict[Path, metadata.Distribution] = {}
        for dist in metadata.distributions(path=[str(SITE)]):
            for f in dist.files or []:
                self.site_owner[Path(os.path.normpath(SITE / f))] = dist

    # --- components ------------------------------------------------------------------

    def add(self, ref: str, comp: dict[str, Any]) -> str:
        self.components.setdefault(ref, {"bom-ref": ref, **comp})
        self.files.setdefault(ref, [])
        return ref

    def built(self, name: str, version: str, url: str, tarball_sha: str, lic: str,
              cpe: str) -> str:
        tarball = PREFIX / "src" / url.rsplit("/", 1)[-1]
        if sha256(tarball) != tarball_sha:
            die(f"{tarball}, from which {name} was built, is not the pinned {url}")
        return self.add(name, {
            "type": "library", "name": name, "version": version, "licenses": licence(lic),
            "purl": f"pkg:generic/{name}@{version}?download_url={urllib.parse.quote(url, safe='')}",
            "cpe": cpe,
            "description": f"compiled from source in the Debian 11 build root ({PREFIX})",
            "externalReferences": [{"type": "distribution", "url": url,
                                    "hashes": [{"alg": "SHA-256", "content": tarball_sha}]}],
        })

    def debian(self, path: Path) -> str:
        owner = ""
        tried = {path, path.resolve()}
        for p in list(tried):
            s = str(p)
            tried.add(Path(s[4:] if s.startswith("/usr/") else "/usr" + s))
        for p in sorted(tried):
            q = subprocess.run(["dpkg-query", "-S", str(p)], capture_output=True, text=True)
            if q.returncode == 0:
                owner = q.stdout.split(":", 1)[0]
                break
        if not owner:
            die(f"{path} belongs to no Debian package (tried {sorted(map(str, tried))})")
        fields = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${source:Package}\t"
             "${source:Version}\t${Architecture}", owner],
            capture_output=True, text=True, check=True).stdout.split("\t")
        pkg, version, src, src_version, arch = fields
        if src not in DEBIAN_LICENCES:
            die(f"{path} is from the Debian source package {src}, which has no licence in "
                f"DEBIAN_LICENCES of {__file__}")
        comp: dict[str, Any] = {
            "type": "library", "name": pkg, "version": version, "publisher": "Debian",
            "licenses": licence(DEBIAN_LICENCES[src]),
            "purl": f"pkg:deb/debian/{pkg}@{urllib.parse.quote(version, safe='')}"
                    f"?arch={arch}&distro=debian-11",
            "properties": [{"name": "dm-agent:debian:source", "value": f"{src} {src_version}"}],
            "externalReferences": [{
                "type": "distribution", "comment": "the Debian source package",
                "url": f"https://snapshot.debian.org/package/{src}/"
                       f"{urllib.parse.quote(src_version, safe='')}/"}],
        }
        if deb := self.apt_index(pkg, version):
            comp["externalReferences"].append(deb)
        return self.add(f"deb:{pkg}", comp)

    @staticmethod
    def apt_index(pkg: str, version: str) -> dict[str, Any] | None:
        """The .deb's URL and sha256, from the root's apt indexes, when they have it."""
        for index in sorted(Path("/var/lib/apt/lists").glob("*_Packages")):
            for stanza in index.read_text(errors="replace").split("\n\n"):
                f = dict(re.findall(r"^([A-Za-z0-9-]+): (.*)$", stanza, re.M))
                if f.get("Package") == pkg and f.get("Version") == version and "SHA256" in f:
                    base = DEBIAN_ARCHIVE + ("-security" if "security" in index.name else "")
                    return {"type": "distribution", "comment": "the binary package",
                            "url": f"{base}/{f['Filename']}",
                            "hashes": [{"alg": "SHA-256", "content": f["SHA256"]}]}
        return None

    def python(self, dist: metadata.Distribution) -> str:
        name = norm(dist.name)
        if name not in self.pins:
            die(f"the Python distribution {dist.name} is bundled but not pinned in {LOCK}")
        pinned, hashes = self.pins[name]
        if dist.version != pinned:
            die(f"{dist.name} {dist.version} is installed, the lock pins {pinned}")
        wheels = [w for w in WHEELHOUSE.glob("*.whl")
                  if norm(w.name.split("-")[0]) == name and w.name.split("-")[1] == pinned]
        wheel_hashes = sorted({sha256(w) for w in wheels} & hashes)
        if not wheel_hashes:
            die(f"no wheel of {dist.name} {pinned} in {WHEELHOUSE} with a hash of the lock")
        return self.add(f"pypi:{name}", {
            "type": "library", "name": name, "version": pinned,
            "licenses": licence(python_licence(dist)),
            "purl": f"pkg:pypi/{name}@{pinned}",
            "hashes": [{"alg": "SHA-256", "content": h} for h in wheel_hashes],
            "externalReferences": [{"type": "distribution",
                                    "url": f"https://pypi.org/project/{name}/{pinned}/"}],
        })

    # --- files -----------------------------------------------------------------------

    def owner_of(self, rel: str) -> str:
        if rel == "_internal/base_library.zip":  # CPython's standard library, compiled
            return "cpython"
        if not rel.startswith("_internal/"):
            die(f"{rel}: unexpected file outside _internal/")
        sub = rel.removeprefix("_internal/")
        bundled = self.onedir / rel
        if sub.startswith("dm_agent/"):
            src = SRC / sub
            if src.is_file() and sha256(src) == sha256(bundled):
                return "dm-agent"
        candidates = [(PY_LIB / sub, "cpython"), (OSSL_LIB / sub, "openssl"),
                      (SITE / sub, "site")]
        if "/" not in sub:
            candidates += [(d / sub, "system") for d in SYSTEM_LIBDIRS]
        for src, kind in candidates:
            if not src.is_file():
                continue
            if sha256(src) != sha256(bundled):
                die(f"{rel} differs from {src}, the file it was copied from")
            if kind == "site":
                dist = self.site_owner.get(Path(os.path.normpath(src)))
                if dist is None:
                    die(f"{rel}: {src} is in no distribution's RECORD")
                return self.python(dist)
            if kind == "system":
                return self.debian(src)
            return kind
        die(f"{rel}: found no source for it in the build root")
        return ""

    def scan_files(self) -> None:
        for path in sorted(self.onedir.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            rel = str(path.relative_to(self.onedir))
            # the executable: PyInstaller's bootloader + the archive of the Python code
            ref = "dm-agent" if rel == "dm-agent" else self.owner_of(rel)
            self.files.setdefault(ref, []).append({
                "type": "file", "bom-ref": f"file:{rel}", "name": rel,
                "hashes": [{"alg": "SHA-256", "content": sha256(path)}]})

    def scan_archive(self) -> None:
        """The Python distributions whose modules PyInstaller put into the executable."""
        arch = CArchiveReader(str(self.onedir / "dm-agent"))
        pyz = [n for n, entry in arch.toc.items() if entry[-1] == "z"]
        if len(pyz) != 1:
            die(f"the executable holds {len(pyz)} PYZ archives, expected 1")
        modules = set(arch.open_embedded_archive(pyz[0]).toc)
        tops = {m.split(".")[0] for m in modules}
        providers = metadata.packages_distributions()
        for top in sorted(tops):
            if top in sys.stdlib_module_names or top == "dm_agent" or top.startswith("pyimod"):
                continue
            names = providers.get(top)
            if not names:
                die(f"the module {top} is in the executable's archive, but no distribution "
                    "provides it")
            for name in names:
                ref = self.python(metadata.distribution(name))
                self.imports.setdefault(ref, set()).add(top)
        # PyInstaller's own modules and run-time hooks, and its bootloader
        ref = self.python(metadata.distribution("pyinstaller"))
        self.components[ref]["description"] = (
            "the executable's bootloader (GPL-2.0-or-later WITH Bootloader-exception), "
            "run-time modules and hooks")

    def document(self) -> dict[str, Any]:
        version = ENV["VERSION"]
        exe_sha = sha256(self.onedir / "dm-agent")
        components = []
        for ref in sorted(self.components):
            comp = dict(self.components[ref])
            if ref in self.imports:
                comp.setdefault("properties", []).append(
                    {"name": "dm-agent:python:import", "value": " ".join(sorted(self.imports[ref]))})
            if self.files[ref]:
                comp["components"] = self.files[ref]
            components.append(comp)
        epoch = int(ENV["SOURCE_DATE_EPOCH"])
        return {
            "bomFormat": "CycloneDX",
            "specVersion": "1.5",
            "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'dm-agent/{version}/{exe_sha}')}",
            "version": 1,
            "metadata": {
                "timestamp": dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
                .strftime("%Y-%m-%dT%H:%M:%SZ"),
                "tools": {"components": [{"type": "application", "name": "dm-agent packaging/sbom.py",
                                          "version": version}]},
                "component": {
                    "type": "application", "bom-ref": "dm-agent", "name": "dm-agent",
                    "version": version, "licenses": licence("Apache-2.0"),
                    "description": "DockMaster (Haven) node agent, frozen with PyInstaller "
                                   "(onedir: /usr/lib/dm-agent in the packages)",
                    "components": self.files["dm-agent"],
                },
            },
            "components": components,
            "dependencies": [{"ref": "dm-agent", "dependsOn": sorted(self.components)}]
            + [{"ref": ref} for ref in sorted(self.components)],
        }


def main() -> None:
    if len(sys.argv) != 2:
        die("usage: sbom.py ONEDIR")
    bom = Bom(Path(sys.argv[1]))
    bom.files["dm-agent"] = []
    bom.built("cpython", ENV["PY_VERSION"], ENV["PY_URL"], ENV["PY_SHA256"], "PSF-2.0",
              f"cpe:2.3:a:python:python:{ENV['PY_VERSION']}:*:*:*:*:*:*:*")
    bom.built("openssl", ENV["OSSL_VERSION"], ENV["OSSL_URL"], ENV["OSSL_SHA256"], "Apache-2.0",
              f"cpe:2.3:a:openssl:openssl:{ENV['OSSL_VERSION']}:*:*:*:*:*:*:*")
    bom.scan_files()
    bom.scan_archive()
    json.dump(bom.document(), sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
