#!/usr/bin/env bash
# Create, or reuse from the cache, the Debian 11 (bullseye) root that freezes dm-agent.
#
# Why a Debian 11 root: everything PyInstaller bundles is linked against the root's glibc
# (2.31), so the frozen program runs on any x86_64 Linux with glibc >= 2.31 (Debian 11+,
# Ubuntu 20.04+, RHEL 9+...). Debian 11's own Python (3.9) and OpenSSL (1.1.1) are past
# their end of life, so the root compiles its own, into private prefixes:
#
#   /opt/dm-build/openssl    OpenSSL 3.5 LTS, shared (PyInstaller bundles libssl/libcrypto)
#   /opt/dm-build/python     CPython 3.13, --enable-shared (PyInstaller needs libpython)
#   /opt/dm-build/venv       the locked dependencies + PyInstaller (packaging/requirements.lock)
#   /opt/dm-build/BUILDINFO  what was built, from what
#
# Sources come from Debian's archive (the .orig tarballs of trixie's python3 and openssl),
# pinned by sha256 in packaging/build-env.sh. Wheels are downloaded on the host (pip inside
# the root would have to trust this machine's TLS setup) into the root's wheelhouse and
# installed with --no-index --require-hashes.
#
# No RUNPATH: nothing is linked with -rpath (which would point the payload's libraries at
# /opt/dm-build/..., a directory whoever creates it on a node would control). Inside the
# root, ld.so finds the private prefixes through /etc/ld.so.conf.d/dm-build.conf; on a
# node, PyInstaller's bootloader points the loader at _internal/.
#
# Cache: the root is reused when its recorded key (sha256 of this script, root-common.sh,
# the lock and the source tarballs' names and hashes) matches; otherwise it is rebuilt
# beside the old one and swapped in only when complete, so an interrupted build never
# leaves a half root behind.
# Its default path carries the key, so that roots of several recipes (branches, CI caches)
# coexist; remove old /var/cache/dm-agent/buildroot-bullseye-* by hand.
#
# Environment:
#   DM_BUILDROOT       the root (default /var/cache/dm-agent/buildroot-bullseye-<key>)
#   DM_SRC_CACHE       downloaded source tarballs (default /var/cache/dm-agent/src)
#   DM_DEBIAN_MIRROR   default http://deb.debian.org/debian
#   DM_DEBIAN_SECURITY default http://deb.debian.org/debian-security
#   DM_BUILDROOT_FORCE=1  rebuild even when the cache key matches
#   DM_JOBS            make -j (default: nproc)
#
#   DM_BUILDROOT_LOCKED=<root>  the caller holds <root>.lock already (freeze.sh does,
#                      for the whole freeze)
#
# Usage: packaging/buildroot.sh            build or reuse; prints timings
#        packaging/buildroot.sh --key      print the cache key and exit
#        packaging/buildroot.sh --path     print the root's path and exit
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=packaging/build-env.sh
. "$HERE/build-env.sh"
SRC_CACHE=${DM_SRC_CACHE:-/var/cache/dm-agent/src}
MIRROR=${DM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${DM_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
JOBS=${DM_JOBS:-$(nproc)}
LOCK=$HERE/requirements.lock
PY_URL=$MIRROR/$PY_POOL/$PY_TARBALL
OSSL_URL=$MIRROR/$OSSL_POOL/$OSSL_TARBALL

# Packages the root needs to compile OpenSSL and CPython, and that PyInstaller runs
# (ldd from libc-bin, objdump from binutils).
ROOT_PACKAGES=(gcc make libc6-dev binutils perl pkg-config xz-utils
  zlib1g-dev libffi-dev libbz2-dev liblzma-dev uuid-dev)

ROOT_TAG=buildroot
# shellcheck source=packaging/root-common.sh
. "$HERE/root-common.sh"

cache_key() {
  {
    sha256sum "$HERE/buildroot.sh" "$HERE/root-common.sh" "$LOCK" | awk '{print $1}'
    printf '%s %s\n' "$PY_TARBALL" "$PY_SHA256" "$OSSL_TARBALL" "$OSSL_SHA256"
  } | sha256sum | awk '{print $1}'
}

case ${1:-} in
  --key) cache_key; exit 0 ;;
  --path) dm_buildroot; exit 0 ;;
  "") ;;
  *) die "usage: $0 [--key|--path]" ;;
esac
ROOT=$(dm_buildroot)
[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, chroot, mount)"
for tool in debootstrap chroot mount umount flock sha256sum curl python3; do
  command -v "$tool" >/dev/null || die "missing host tool: $tool"
done
python3 -m pip --version >/dev/null 2>&1 || die "missing host tool: pip (apt-get install python3-pip)"

hold_root "$ROOT"

KEY=$(cache_key)
if [[ ${DM_BUILDROOT_FORCE:-0} != 1 && -f $ROOT/.dm-buildroot-key &&
  $(cat "$ROOT/.dm-buildroot-key") == "$KEY" && -x $ROOT$PREFIX/venv/bin/pyinstaller ]]; then
  log "reusing cached build root $ROOT (key ${KEY:0:12}) in $(($(date +%s) - T0))s"
  exit 0
fi
log "building $ROOT (key ${KEY:0:12}; cached key: $(cat "$ROOT/.dm-buildroot-key" 2>/dev/null || echo none))"

NEW=$ROOT.new
umount_stale "$NEW"
safe_rm_tree "$NEW"

# --- sources and wheels (host side) ---------------------------------------------------
fetch() { # url file sha256
  local url=$1 file=$SRC_CACHE/$2 sha=$3
  if [[ -f $file ]] && echo "$sha  $file" | sha256sum -c --status; then return 0; fi
  log "downloading $url"
  curl -fsS --retry 3 -o "$file.part" "$url" ||
    die "cannot download $url (superseded in Debian's pool? see the comment above PY_VERSION)"
  echo "$sha  $file.part" | sha256sum -c --status || die "sha256 mismatch for $url"
  mv "$file.part" "$file"
}
mkdir -p "$SRC_CACHE"
fetch "$PY_URL" "$PY_TARBALL" "$PY_SHA256"
fetch "$OSSL_URL" "$OSSL_TARBALL" "$OSSL_SHA256"
step "sources ready"

# --- the Debian 11 root ------------------------------------------------------------------
debootstrap --variant=minbase bullseye "$NEW" "$MIRROR" >"$SRC_CACHE/debootstrap.log" 2>&1 ||
  { tail -20 "$SRC_CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
step "debootstrap bullseye done"

cat >"$NEW/etc/apt/sources.list" <<EOF
deb $MIRROR bullseye main
deb $MIRROR bullseye-updates main
deb $SECURITY bullseye-security main
EOF
cp /etc/resolv.conf "$NEW/etc/resolv.conf"
mkdir -p "$NEW$PREFIX/src" "$NEW$PREFIX/wheelhouse"
cp "$SRC_CACHE/$PY_TARBALL" "$SRC_CACHE/$OSSL_TARBALL" "$NEW$PREFIX/src/"
cp "$LOCK" "$NEW$PREFIX/requirements.lock"

# Wheels for the target (CPython $PY_MM, x86_64, glibc <= 2.31), downloaded by the host's pip
# and checked against the lock's hashes. Binary only: nothing is compiled from an sdist.
python3 -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
  --only-binary=:all: --dest "$NEW$PREFIX/wheelhouse" \
  --platform manylinux_2_31_x86_64 --platform manylinux2014_x86_64 \
  --python-version "$PY_MM" --implementation cp --abi "cp${PY_MM/./}" --abi abi3 --abi none \
  -r "$LOCK" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
step "wheelhouse downloaded ($(find "$NEW$PREFIX/wheelhouse" -name '*.whl' | wc -l) wheels)"

mount_api "$NEW"
in_root "$NEW" PKGS="${ROOT_PACKAGES[*]}" <<'EOF'
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
apt-get clean
EOF
step "build packages installed in the root"

# --- OpenSSL 3 (shared, private prefix, no rpath) --------------------------------------
# --openssldir=/etc/ssl: on the node, OpenSSL's default CA locations are the system's
# (/etc/ssl/certs, /etc/ssl/cert.pem), as on Debian, Ubuntu and SUSE. The root's ld.so
# finds the library through ld.so.conf.d (CPython's build and PyInstaller load it).
in_root "$NEW" PREFIX="$PREFIX" TARBALL="$OSSL_TARBALL" JOBS="$JOBS" <<'EOF'
cd /tmp && rm -rf openssl-* && tar xzf "$PREFIX/src/$TARBALL" && cd openssl-*/
./Configure linux-x86_64 --prefix="$PREFIX/openssl" --libdir=lib --openssldir=/etc/ssl \
  shared no-apps no-docs no-tests >/tmp/openssl-build.log 2>&1 ||
  { tail -40 /tmp/openssl-build.log; exit 1; }
make -j"$JOBS" >>/tmp/openssl-build.log 2>&1 || { tail -40 /tmp/openssl-build.log; exit 1; }
make install_sw >>/tmp/openssl-build.log 2>&1 || { tail -40 /tmp/openssl-build.log; exit 1; }
cd /tmp && rm -rf openssl-*
printf '%s\n' "$PREFIX/openssl/lib" "$PREFIX/python/lib" >/etc/ld.so.conf.d/dm-build.conf
ldconfig
EOF
step "OpenSSL $OSSL_VERSION built"

# --- CPython (shared libpython, linked against that OpenSSL, no rpath) ------------------
# No --enable-optimizations: PGO triples the build time for a program that mostly waits.
# --with-openssl-rpath=no (the default, said here): _ssl and _hashlib find libssl through
# ld.so.conf.d in the root, and in _internal/ on a node.
in_root "$NEW" PREFIX="$PREFIX" TARBALL="$PY_TARBALL" JOBS="$JOBS" PY_MM="$PY_MM" <<'EOF'
cd /tmp && rm -rf Python-* && tar xJf "$PREFIX/src/$TARBALL" && cd Python-*/
./configure --prefix="$PREFIX/python" --enable-shared --with-ensurepip=install \
  --with-openssl="$PREFIX/openssl" --with-openssl-rpath=no --disable-test-modules \
  >/tmp/python-configure.log
make -j"$JOBS" >/tmp/python-make.log 2>&1 || { tail -40 /tmp/python-make.log; exit 1; }
# The modules the agent (and its dependencies) need must have been built.
missing=$(grep -A3 'The necessary bits to build these optional modules were not found' \
  /tmp/python-make.log || true)
[ -z "$missing" ] || echo "note: $missing"
make install >/tmp/python-install.log 2>&1 || { tail -40 /tmp/python-install.log; exit 1; }
ldconfig
cd /tmp && rm -rf Python-*
py=$PREFIX/python/bin/python$PY_MM
"$py" - <<'PY'
import ssl, ctypes, zlib, bz2, lzma, uuid, hashlib, json, socket, _decimal
print("ssl:", ssl.OPENSSL_VERSION)
assert ssl.OPENSSL_VERSION.startswith("OpenSSL 3."), ssl.OPENSSL_VERSION
PY
EOF
step "CPython $PY_VERSION built"

# --- strip what was compiled here ------------------------------------------------------
in_root "$NEW" PREFIX="$PREFIX" PY_MM="$PY_MM" <<'EOF'
before=$(du -sm "$PREFIX" | cut -f1)
find "$PREFIX/openssl" "$PREFIX/python" -type f \( -name '*.so' -o -name '*.so.*' \) \
  -exec strip --strip-unneeded {} +
strip --strip-unneeded "$PREFIX/python/bin/python$PY_MM"
echo "stripped: ${before} MB -> $(du -sm "$PREFIX" | cut -f1) MB;" \
  "libpython $(du -h "$PREFIX/python/lib/libpython$PY_MM.so.1.0" | cut -f1)"
EOF
step "stripped"

# --- the locked build environment --------------------------------------------------------
root_venv "$NEW"
step "venv with the locked dependencies ready"

swap_in "$NEW" "$ROOT" .dm-buildroot-key "$KEY"
