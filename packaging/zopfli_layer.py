"""Recompress an OCI image's layers with zopfli (``pigz -11``), for the image's size target
(docs/packaging.md, *The container image*).

buildah and skopeo write gzip through Go's parallel gzip at level 9 at best, which leaves
about 0.9 MB per architecture that zopfli takes off: gzip all the same, as every Docker
and Podman pulls it. No image tool offers zopfli, so this step swaps the compressed blob
of each layer in the OCI layout that ``buildah push`` wrote, and records the new blob's
digest and size in the image manifest and the layout's index. It changes nothing else:
the uncompressed layer (its diff_id, in the image config) is the same bytes, which this
step checks, so the config blob is untouched.

zopfli is slow (about a minute per architecture on two cores), and it is deterministic:
the result is cached under CACHE, keyed on the layer's diff_id and the compressor's
version and flags, so a second build of the same tree (the reproducibility test) costs
nothing.

Usage: python3 zopfli_layer.py LAYOUT TAG CACHE
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
#: zopfli through pigz; -n: no name or time in the header (reproducible); -I 1: one
#: iteration, within 0.2 % of the default fifteen at a sixth of the time
PIGZ = ["pigz", "-11", "-I", "1", "-n", "-c"]


def _blob_path(layout: Path, digest: str) -> Path:
    algo, hexd = digest.split(":", 1)
    return layout / "blobs" / algo / hexd


def _write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = _blob_path(layout, digest)
    if not path.exists():
        path.write_bytes(data)
    return digest, len(data)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _pigz_version() -> str:
    out = subprocess.run(["pigz", "--version"], capture_output=True, text=True, check=True)
    return (out.stdout + out.stderr).strip()


def recompress(layer: Path, diff_id: str, cache: Path) -> Path:
    """The zopfli gzip of the layer blob *layer* (a gzip file), from the cache or made."""
    key = hashlib.sha256(f"{diff_id} {_pigz_version()} {' '.join(PIGZ)}".encode()).hexdigest()
    cached = cache / f"{key}.gz"
    if cached.exists():
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tar = Path(tmp) / "layer.tar"
        with gzip.open(layer, "rb") as src, open(tar, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        got = _sha256_file(tar)
        if got != diff_id:
            sys.exit(f"zopfli_layer: {layer} holds {got}, not the config's diff_id {diff_id}")
        out = Path(tmp) / "layer.tar.gz"
        with open(tar, "rb") as src, open(out, "wb") as dst:
            subprocess.run(PIGZ, stdin=src, stdout=dst, check=True)
        os.replace(out, cached)
    return cached


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit("usage: zopfli_layer.py LAYOUT TAG CACHE")
    layout, tag, cache = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    index_path = layout / "index.json"
    index: dict[str, Any] = json.loads(index_path.read_text())
    (entry,) = [m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    manifest = json.loads(_blob_path(layout, entry["digest"]).read_bytes())
    config = json.loads(_blob_path(layout, manifest["config"]["digest"]).read_bytes())
    diff_ids = config["rootfs"]["diff_ids"]
    for i, layer in enumerate(manifest["layers"]):
        if layer["mediaType"] != GZIP_LAYER:
            sys.exit(f"zopfli_layer: layer {i} of {tag} is {layer['mediaType']}, not gzip")
        old = _blob_path(layout, layer["digest"])
        smaller = recompress(old, diff_ids[i], cache)
        digest = _sha256_file(smaller)
        shutil.copyfile(smaller, _blob_path(layout, digest))
        print(f"{tag}: layer {i}: {layer['size']} -> {smaller.stat().st_size} bytes (zopfli)",
              file=sys.stderr)
        layer["digest"], layer["size"] = digest, smaller.stat().st_size
        if _blob_path(layout, digest) != old:
            old.unlink()
    old_manifest = _blob_path(layout, entry["digest"])
    # the same key order and separators as buildah wrote: only digests and sizes differ
    entry["digest"], entry["size"] = _write_blob(
        layout, json.dumps(manifest, separators=(",", ":")).encode())
    if _blob_path(layout, entry["digest"]) != old_manifest:
        old_manifest.unlink()
    index_path.write_text(json.dumps(index, separators=(",", ":")))


if __name__ == "__main__":
    main()
