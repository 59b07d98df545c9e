"""The container image's bill of materials (CycloneDX 1.5 JSON), and its sizes.

packaging/build-image.sh runs it on the OCI layout it built. The image's components, per
architecture: the frozen onedir's own bill (packaging/sbom.py's, nested whole under a
component for the onedir), the Debian 11 packages the image's system libraries came from
(WORK/ARCH/system.tsv: path, package, version, source package; each file with its
sha256), and the image's settings files. The image itself is the metadata component, named
by its index digest. Reproducible: the timestamp is SOURCE_DATE_EPOCH, the serial number
is derived from the index digest.

Usage: python3 sbom_image.py LAYOUT VERSION BUILD WORK > dm-agent-VERSION-image.cdx.json
       (BUILD: build/, where the frozen onedirs are; WORK: build-image.sh's work tree)
       python3 sbom_image.py --size LAYOUT ARCH   the compressed bytes a pull of ARCH moves
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any


def _blob(layout: Path, digest: str) -> Any:
    algo, hexd = digest.split(":", 1)
    return json.loads((layout / "blobs" / algo / hexd).read_text())


def _manifests(layout: Path) -> tuple[str, dict[str, Any]]:
    """The index digest and each architecture's image manifest."""
    top = json.loads((layout / "index.json").read_text())["manifests"][0]
    index = _blob(layout, top["digest"])
    return top["digest"], {m["platform"]["architecture"]: _blob(layout, m["digest"])
                           for m in index["manifests"]}


def size(layout: Path, arch: str) -> int:
    manifest = _manifests(layout)[1][arch]
    return int(manifest["config"]["size"]) + sum(int(x["size"]) for x in manifest["layers"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _in_root(rootfs: Path, rel: str) -> Path:
    """A path of the image, its symlinks resolved inside the image's root."""
    path = rootfs / rel
    for _ in range(20):
        if not path.is_symlink():
            return path
        target = os.readlink(path)
        path = rootfs / target.lstrip("/") if target.startswith("/") else path.parent / target
    raise OSError(f"symlink loop at {rootfs / rel}")


def _slimmed(onedir: Path, image_onedir: Path) -> list[dict[str, Any]]:
    """The image's changes to the onedir (build-image.sh's slim_onedir): files stripped
    (with their hashes in the image) and files left out."""
    changes: list[dict[str, Any]] = []
    for path in sorted(p for p in onedir.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(onedir).as_posix()
        mine = image_onedir / rel
        if not mine.exists():
            changes.append({"type": "file", "name": f"/opt/dm-agent/{rel}",
                            "description": "left out of the image"})
        elif _sha256(mine) != _sha256(path):
            changes.append({"type": "file", "name": f"/opt/dm-agent/{rel}",
                            "description": "strip --strip-unneeded in the image",
                            "hashes": [{"alg": "SHA-256", "content": _sha256(mine)}]})
    return changes


def _arch_components(build: Path, work: Path, arch: str,
                     version: str) -> list[dict[str, Any]]:
    rootfs = work / arch / "rootfs"
    frozen = build / ("frozen" if arch == "amd64" else f"frozen-{arch}")
    onedir_bom = json.loads((frozen / "dm-agent.cdx.json").read_text())
    comps: list[dict[str, Any]] = [{
        "bom-ref": f"{arch}/dm-agent", "type": "application", "name": "dm-agent",
        "version": version, "description": f"the frozen onedir in /opt/dm-agent ({arch})",
        "components": onedir_bom.get("components", []),
    }, {
        "bom-ref": f"{arch}/dm-agent-image-changes", "type": "application",
        "name": "dm-agent (image copy)", "version": version,
        "description": "how the image's /opt/dm-agent differs from the onedir above",
        "components": _slimmed(frozen / "dm-agent", rootfs / "opt/dm-agent"),
    }]
    packages: dict[tuple[str, str], dict[str, Any]] = {}
    for line in (work / arch / "system.tsv").read_text().splitlines():
        rel, pkg, pver, source = line.split("\t")
        comp = packages.setdefault((pkg, pver), {
            "bom-ref": f"{arch}/deb/{pkg}@{pver}", "type": "library", "name": pkg,
            "version": pver,
            "purl": f"pkg:deb/debian/{pkg}@{pver}?arch={arch}&distro=debian-11"
                    + (f"&upstream={source}" if source and source != pkg else ""),
            "components": [],
        })
        comp["components"].append({"type": "file", "name": "/" + rel, "hashes": [
            {"alg": "SHA-256", "content": _sha256(rootfs / rel)}]})
    comps.extend(packages.values())
    for rel in ("etc/dm-agent.ini", "etc/nsswitch.conf", "etc/passwd", "etc/group",
                "etc/ssl/certs/ca-certificates.crt"):
        comps.append({"bom-ref": f"{arch}/{rel}", "type": "file", "name": "/" + rel,
                      "hashes": [{"alg": "SHA-256", "content": _sha256(_in_root(rootfs, rel))}]})
    return [{"bom-ref": f"image/{arch}", "type": "container", "name": f"dm-agent linux/{arch}",
             "version": version, "components": comps}]


def bom(layout: Path, version: str, build: Path, work: Path) -> dict[str, Any]:
    digest, manifests = _manifests(layout)
    when = dt.datetime.fromtimestamp(int(os.environ.get("SOURCE_DATE_EPOCH", "0")), dt.timezone.utc)
    components: list[dict[str, Any]] = []
    for arch in sorted(manifests):
        components.extend(_arch_components(build, work, arch, version))
    return {
        "bomFormat": "CycloneDX", "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, 'dm-agent-image:' + digest)}",
        "version": 1,
        "metadata": {
            "timestamp": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "component": {"bom-ref": "image", "type": "container", "name": "dm-agent",
                          "version": version, "hashes": [
                              {"alg": "SHA-256", "content": digest.split(":", 1)[1]}]},
        },
        "components": components,
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--size":
        print(size(Path(sys.argv[2]), sys.argv[3]))
    elif len(sys.argv) == 5:
        json.dump(bom(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])),
                  sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.exit("usage: sbom_image.py LAYOUT VERSION BUILD WORK | --size LAYOUT ARCH")


if __name__ == "__main__":
    main()
