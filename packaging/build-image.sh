#!/usr/bin/env bash
# The container image (docs/design.md §7, docs/container.md): the frozen onedir FROM
# scratch, for amd64 and arm64 under one OCI image index, built with buildah from
# image/Containerfile over a root staged here.
#
# The staged root, per architecture: /opt/dm-agent (build/frozen[-arm64]/dm-agent), the
# glibc libraries the onedir needs that it does not bundle (found by their DT_NEEDED
# names, recursively, in the Debian 11 build root it was frozen in), the dynamic loader
# at the ELF interpreter path, glibc's NSS modules for files and DNS (getaddrinfo loads
# them), a CA bundle (certifi's, the one the onedir carries), image/'s settings, and
# /tmp, /run/dm-agent, /var/lib/dm-agent. No shell, no package manager.
#
# Reproducible: every file of the staged root has SOURCE_DATE_EPOCH as its time and fixed
# modes; buildah's --timestamp sets the layer's file times and the image's created time;
# buildah runs in a private storage under build/image/ (vfs: no host overlay needed).
# Two clean builds give the same index digest (tests/test_image.py checks it).
#
# Outputs (VERSION from dm_agent/__init__.py):
#   dist/dm-agent-VERSION-image.oci.tar            OCI archive: the index of amd64 + arm64
#                                                  (tag VERSION); `skopeo copy` pushes it
#   dist/dm-agent-VERSION-image-ARCH.docker.tar    `docker load`-able, one per architecture
#                                                  (dm-agent:VERSION), with the HEALTHCHECK
#   dist/dm-agent-VERSION-image.cdx.json           the image's bill of materials
#   dist/dm-agent-VERSION-image.digest             the index digest
# Environment: SOURCE_DATE_EPOCH (packaging/build-env.sh), DM_IMAGE_DIST (instead of
#   dist/), DM_IMAGE_WORK (instead of build/image/), DM_IMAGE_KEEP=1 (keep the work tree),
#   DM_IMAGE_LAYER_CACHE (the zopfli layers, instead of /var/cache/dm-agent/image-layers).
#
# Usage: packaging/build-image.sh [--arch amd64|arm64]...   (default both; the index
#        holds the ones built). Needs root, buildah, skopeo, umoci, objdump, pigz, and
#        `make frozen` first.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
LOG_TAG=image
# shellcheck source=packaging/log.sh
. "$HERE/log.sh"
# shellcheck source=packaging/build-env.sh
. "$HERE/build-env.sh"

ARCHES=()
while (($#)); do
  case $1 in
    --arch) ARCHES+=("${2:-}"); shift ;;
    *) echo "usage: $0 [--arch amd64|arm64]..." >&2; exit 64 ;;
  esac
  shift
done
((${#ARCHES[@]})) || ARCHES=("${DM_ARCHES[@]}")
for a in "${ARCHES[@]}"; do
  [[ $a =~ ^(amd64|arm64)$ ]] || die "--arch must be amd64 or arm64, not '$a'"
done
[[ $(id -u) == 0 ]] || die "must run as root (buildah's storage)"
for tool in buildah skopeo umoci objdump readelf pigz; do
  command -v "$tool" >/dev/null || die "$tool is missing (bash .ci/deps installs it)"
done
for a in "${ARCHES[@]}"; do
  command -v "$(dm_arch_triplet "$a")-linux-gnu-strip" >/dev/null ||
    die "$(dm_arch_triplet "$a")-linux-gnu-strip is missing (bash .ci/deps installs binutils-$(dm_arch_triplet "$a" | tr _ -)-linux-gnu)"
done

VERSION=$(dm_version)
SOURCE_DATE_EPOCH=$(dm_source_date_epoch)
export SOURCE_DATE_EPOCH
# (DM_IMAGE_DIST, DM_IMAGE_WORK: elsewhere than dist/ and build/image/, as the
# reproducibility test builds a second time)
DIST=${DM_IMAGE_DIST:-$REPO/dist}
WORK=${DM_IMAGE_WORK:-$REPO/build/image}
STORE=(--root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs)
OCI_OUT=$DIST/dm-agent-$VERSION-image.oci.tar
LAYER_CACHE=${DM_IMAGE_LAYER_CACHE:-/var/cache/dm-agent/image-layers}
NAME=localhost/dm-agent:$VERSION

clean_storage() {
  if [[ -d $WORK/storage ]]; then
    buildah "${STORE[@]}" rm --all >/dev/null 2>&1 || true
    buildah "${STORE[@]}" rmi --all --force >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
clean_storage
mkdir -p "$WORK" "$DIST"
trap clean_storage EXIT
[[ -z ${DM_IMAGE_KEEP:-} ]] || trap - EXIT

# --- the staged root of one architecture --------------------------------------------
is_elf() { [[ $(head -c 4 "$1" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; }

# The file a library name resolves to in the build root (the multiarch directories, as
# ld.so's default path there), or nothing.
find_lib() {
  local root=$1 triplet=$2 name=$3 d
  for d in "lib/$triplet-linux-gnu" "usr/lib/$triplet-linux-gnu" lib usr/lib; do
    [[ -e $root/$d/$name ]] && { echo "$d/$name"; return; }
  done
  return 0
}

# Copy a library of the build root into the staged root at the same path, as the real
# file (symlinks resolved inside the root), with its name the program asks for.
copy_lib() {
  local root=$1 rel=$2 stage=$3 real
  real=$(chroot_resolve "$root" "$rel")
  mkdir -p "$stage/$(dirname "$rel")"
  cp "$root/$real" "$stage/$rel"
}

# A path inside the root with every symlink resolved inside the root, not on this host
# (absolute links such as /lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/ld-2.31.so).
chroot_resolve() {
  local root=$1 rel=${2#/} hops=0 target
  while [[ -L $root/$rel ]]; do
    ((++hops < 20)) || die "symlink loop at $root/$rel"
    target=$(readlink "$root/$rel")
    if [[ $target == /* ]]; then rel=${target#/}; else rel=$(dirname "$rel")/$target; fi
    rel=$(realpath -m --relative-to=/ "/$rel")
  done
  echo "$rel"
}

# The image's copy of the onedir, smaller (the size target, docs/packaging.md):
# - the Python extensions that ship unstripped (cryptography's and bcrypt's Rust, cffi's,
#   psutil's) lose their symbol tables (--strip-unneeded keeps what dynamic linking needs;
#   tests/test_image.py runs the image's TLS paths);
# - extension modules the image can do without: the CJK codecs (HTTP, JSON and Docker's
#   API are ASCII or UTF-8), _decimal, _pickle and _statistics, which nothing the agent
#   runs imports (NEVER_LOADED); and _bz2, _lzma (with their libraries), which are
#   imported where they are optional (OPTIONAL): shutil and zipfile try them inside
#   `except ImportError`, and the agent decompresses nothing. _ctypes stays: the
#   tunnel's asyncssh imports ctypes unconditionally (its security-key module).
#   tests/test_image.py::test_image_leaves_out_only_modules_it_can_do_without checks both
#   lists against the running agent's memory map.
#   The strip is the architecture's own binutils (TRIPLET-linux-gnu-strip): the host's
#   plain strip reads x86-64 only (.ci/deps installs binutils-aarch64-linux-gnu).
slim_onedir() {
  local dir=$1 strip=$2 f
  while IFS= read -r -d '' f; do
    is_elf "$f" || continue
    if readelf -S --wide "$f" | grep -q ' \.symtab '; then
      "$strip" --strip-unneeded "$f"
    fi
  done < <(find "$dir/_internal" -name '*.so*' -type f -print0)
  for f in "${NEVER_LOADED[@]}" "${OPTIONAL[@]}"; do
    rm -f "$dir"/_internal/python3*/lib-dynload/"$f".*.so
  done
  rm -f "$dir"/_internal/{liblzma.so.5,libbz2.so.1.0}
}
# (the extension modules slim_onedir leaves out; tests/test_image.py reads these lines)
NEVER_LOADED=(_codecs_cn _codecs_hk _codecs_iso2022 _codecs_jp _codecs_kr _codecs_tw _multibytecodec _decimal _pickle _statistics)
OPTIONAL=(_bz2 _lzma)

stage_root() {
  local arch=$1 triplet root onedir stage interp f name rel
  triplet=$(dm_arch_triplet "$arch")
  root=$(dm_buildroot_for "$arch")
  onedir=$REPO/build/frozen$([[ $arch == amd64 ]] || echo "-$arch")/dm-agent
  [[ -x $onedir/dm-agent ]] || die "$onedir/dm-agent is missing: run make frozen-$arch first"
  [[ -d $root/lib ]] || die "the build root $root is missing: run make frozen-$arch first"
  stage=$WORK/$arch/rootfs
  mkdir -p "$stage"/{opt,etc/ssl/certs,run/dm-agent,var/lib/dm-agent,tmp,root}
  cp -a "$onedir" "$stage/opt/dm-agent"
  install -m 0644 "$REPO/image/dm-agent.ini" "$stage/etc/dm-agent.ini"
  install -m 0644 "$REPO/image/nsswitch.conf" "$REPO/image/passwd" "$REPO/image/group" \
    "$stage/etc/"
  # The CA bundle: certifi's, which the onedir carries (one copy, linked).
  ln -s /opt/dm-agent/_internal/certifi/cacert.pem "$stage/etc/ssl/certs/ca-certificates.crt"
  slim_onedir "$stage/opt/dm-agent" "$triplet-linux-gnu-strip"

  interp=$(objdump -s -j .interp "$onedir/dm-agent" | awk 'NR > 4 {printf "%s", $NF}' |
    sed 's/\.*$//')
  [[ $interp == /* ]] || die "no ELF interpreter in $onedir/dm-agent"
  # The libraries the onedir asks for and does not bundle, and theirs, recursively;
  # plus the NSS modules glibc loads by name (files, dns) and what they need. The
  # executable's own (the bootloader: libz, libdl...) come from the system even when
  # _internal/ has a copy: ld.so resolves them before anything sets a library path,
  # which is why the .deb depends on zlib1g (packaging/payload-deps.sh).
  declare -A bundled=() seen=()
  local queue=(libnss_files.so.2 libnss_dns.so.2)
  mapfile -t -O "${#queue[@]}" queue < <(objdump -p "$onedir/dm-agent" | awk '$1 == "NEEDED" {print $2}')
  local system_count=${#queue[@]} i=0
  while IFS= read -r -d '' f; do bundled[$(basename "$f")]=1; done < <(find "$onedir" -type f -print0)
  while IFS= read -r -d '' f; do
    is_elf "$f" || continue
    mapfile -t -O "${#queue[@]}" queue < <(objdump -p "$f" | awk '$1 == "NEEDED" {print $2}')
  done < <(find "$onedir/_internal" -type f -print0)
  while ((${#queue[@]})); do
    name=${queue[0]}
    queue=("${queue[@]:1}")
    ((++i > system_count)) && [[ -n ${bundled[$name]:-} ]] && continue
    [[ -n ${seen[$name]:-} ]] && continue
    seen[$name]=1
    if [[ /$name == "$interp" || $name == "$(basename "$interp")" ]]; then continue; fi
    rel=$(find_lib "$root" "$triplet" "$name")
    [[ -n $rel ]] || die "$name (needed by the onedir) is not in the build root $root"
    copy_lib "$root" "$rel" "$stage"
    mapfile -t -O "${#queue[@]}" queue < <(objdump -p "$stage/$rel" | awk '$1 == "NEEDED" {print $2}')
  done
  copy_lib "$root" "${interp#/}" "$stage"
  # The onedir's own copy of a library the image has as a system one (libz: the
  # bootloader's, above) is the same file from the same root: one copy, linked.
  for f in "$stage"/opt/dm-agent/_internal/*.so*; do
    rel=$(find_lib "$stage" "$triplet" "$(basename "$f")")
    if [[ -n $rel && -f $stage/$rel ]] && cmp -s "$f" "$stage/$rel"; then
      ln -sf "/$rel" "$f"
    fi
  done
  # Which Debian 11 package each system file came from, for the bill of materials.
  (cd "$stage" && find lib* -type f) | sort | while read -r rel; do
    pkg=$({ dpkg-query --admindir="$root/var/lib/dpkg" -S "/$rel" 2>/dev/null ||
      dpkg-query --admindir="$root/var/lib/dpkg" -S "/$(chroot_resolve "$root" "$rel")"; } |
      head -1 | cut -d: -f1)
    printf '%s\t%s\t%s\n' "$rel" "$pkg" \
      "$(dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Version}\t${source:Package}' "$pkg")"
  done >"$WORK/$arch/system.tsv"
  log "$arch: interpreter $interp, system libraries: $(printf '%s\n' "${!seen[@]}" | sort | tr '\n' ' ')"

  # Fixed modes and times: the layer is a function of the files' contents.
  chmod 1777 "$stage/tmp"
  chmod 0700 "$stage/root" "$stage/var/lib/dm-agent"
  chmod 0755 "$stage/run/dm-agent"
  find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
}

# --- build ------------------------------------------------------------------------------
buildah "${STORE[@]}" manifest create "$NAME" >/dev/null
for arch in "${ARCHES[@]}"; do
  stage_root "$arch"
  cp "$REPO/image/Containerfile" "$WORK/$arch/Containerfile"
  # --format docker: the HEALTHCHECK is kept (OCI's config has no field for it); the
  # OCI copy below drops it. --timestamp: the created time and every file's time.
  buildah "${STORE[@]}" build --quiet --format docker --timestamp "$SOURCE_DATE_EPOCH" \
    --platform "linux/$arch" --layers=false --pull=never --network none \
    --identity-label=false \
    -f "$WORK/$arch/Containerfile" -t "localhost/dm-agent:$VERSION-$arch" "$WORK/$arch" >/dev/null
  out=$DIST/dm-agent-$VERSION-image-$arch.docker.tar
  rm -f "$out"
  skopeo --override-arch "$arch" copy --quiet \
    "containers-storage:[vfs@$WORK/storage+$WORK/run]localhost/dm-agent:$VERSION-$arch" \
    "docker-archive:$out:dm-agent:$VERSION" >/dev/null
  # The OCI image of this architecture, its layer at gzip's best (buildah's default level
  # leaves ~1 MB on the table; zstd would halve that again, but Docker 20.10 pulls only
  # gzip), then into the index: first at the best buildah's Go gzip does ...
  buildah "${STORE[@]}" push --quiet --format oci --compression-format gzip \
    --compression-level 9 "localhost/dm-agent:$VERSION-$arch" \
    "oci:$WORK/layout:$VERSION-$arch" >/dev/null
  # ... and then at zopfli's (packaging/zopfli_layer.py: still gzip, 0.9 MB smaller;
  # cached on the layer's content, so a second build of the same tree is quick)
  python3 "$HERE/zopfli_layer.py" "$WORK/layout" "$VERSION-$arch" "$LAYER_CACHE" 2>&1 |
    while IFS= read -r line; do log "$line"; done
  buildah "${STORE[@]}" manifest add --arch "$arch" --os linux "$NAME" \
    "oci:$WORK/layout:$VERSION-$arch" >/dev/null
  log "$arch: $(du -h "$out" | cut -f1) uncompressed docker archive $out"
done
rm -f "$OCI_OUT"
buildah "${STORE[@]}" manifest push --quiet --all --format oci \
  "$NAME" \
  "oci-archive:$OCI_OUT:$VERSION" >/dev/null

# --- check and describe -------------------------------------------------------------------
# umoci reads the index back: every architecture's manifest and config must be there.
mkdir -p "$WORK/check"
tar -C "$WORK/check" -xf "$OCI_OUT"
umoci ls --layout "$WORK/check" | grep -qx "$VERSION" || die "umoci finds no tag $VERSION in $OCI_OUT"
DIGEST=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' \
  "$WORK/check/index.json")
echo "$DIGEST" >"$DIST/dm-agent-$VERSION-image.digest"
python3 "$HERE/sbom_image.py" "$WORK/check" "$VERSION" "$REPO/build" "$WORK" >"$DIST/dm-agent-$VERSION-image.cdx.json"
for arch in "${ARCHES[@]}"; do
  log "$arch: $(python3 "$HERE/sbom_image.py" --size "$WORK/check" "$arch") bytes compressed (the layer and config pulled)"
done
log "image index $DIGEST: $OCI_OUT ($(du -h "$OCI_OUT" | cut -f1))"
