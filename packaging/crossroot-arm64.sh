#!/usr/bin/env bash
# Create, or reuse from the cache, the root that cross-compiles OpenSSL and CPython for
# arm64 (aarch64), and print the path of what it compiled.
#
# Why cross-compile: compiling CPython under qemu-user is ~11x slower (1.5-2 h on two
# cores); cross-compiling takes ~10 min. Only PyInstaller and pip run emulated, in the
# arm64 build root (packaging/buildroot-arm64.sh), which takes the result of this one.
#
# The root is a COPY of the x86_64 build root (packaging/buildroot.sh; never changed in
# place), for two things it has: Debian 11's toolchain, and the native CPython of the same
# version that a cross build of CPython needs (--with-build-python). Added to it:
#   - crossbuild-essential-arm64 (gcc 10 for aarch64-linux-gnu, Debian 11's, so the
#     objects need nothing newer of glibc than Debian 11 arm64 has: 2.31);
#   - the arm64 -dev libraries CPython's modules link against, through multiarch.
#
# Multiarch needs the :amd64 and :arm64 copies of a library package at the same version,
# and the package registry this project builds from serves bullseye-security for amd64
# but not for arm64. So this root is brought down to plain bullseye and bullseye-updates
# for both architectures (apt pinning, --allow-downgrades): its amd64 libc6, liblzma...
# leave the security pocket. That is harmless here: nothing of this root's amd64 side is
# shipped; it only runs the compiler. (The arm64 libraries the payload bundles come from
# the arm64 build root, which has the same constraint: see buildroot-arm64.sh.)
#
# Outputs, inside the root: /stage/opt/dm-build/{openssl,python}, installed with
# DESTDIR=/stage for the prefix /opt/dm-build the arm64 root runs them from, stripped,
# linked without any RUNPATH (ld.so.conf.d finds them there; _internal/ on a node).
#
# Cache: /var/cache/dm-agent/crossroot-bullseye-arm64-<key>, key = sha256 of this script,
# root-common.sh, the x86_64 root's key and the source tarballs' names and hashes; rebuilt
# beside the old one and swapped in when complete.
#
# Environment: DM_CROSSROOT (the root's path), DM_CROSSROOT_FORCE=1, DM_JOBS, and those of
#              buildroot.sh (DM_BUILDROOT, DM_DEBIAN_MIRROR, DM_SRC_CACHE).
# Usage: packaging/crossroot-arm64.sh          build or reuse; prints the root's path last
#        packaging/crossroot-arm64.sh --key    print the cache key and exit
#        packaging/crossroot-arm64.sh --path   print the root's path and exit
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=packaging/build-env.sh
. "$HERE/build-env.sh"
MIRROR=${DM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
JOBS=${DM_JOBS:-$(nproc)}
TRIPLET=aarch64-linux-gnu

ROOT_TAG=crossroot-arm64
# shellcheck source=packaging/root-common.sh
. "$HERE/root-common.sh"

cache_key() {
  {
    sha256sum "$HERE/crossroot-arm64.sh" "$HERE/root-common.sh" | awk '{print $1}'
    "$HERE/buildroot.sh" --key
    printf '%s %s\n' "$PY_TARBALL" "$PY_SHA256" "$OSSL_TARBALL" "$OSSL_SHA256"
  } | sha256sum | awk '{print $1}'
}
root_path() {
  echo "${DM_CROSSROOT:-/var/cache/dm-agent/crossroot-bullseye-arm64-$(cache_key | cut -c1-12)}"
}

case ${1:-} in
  --key) cache_key; exit 0 ;;
  --path) root_path; exit 0 ;;
  "") ;;
  *) die "usage: $0 [--key|--path]" ;;
esac
[[ $(id -u) == 0 ]] || die "must run as root (chroot, mount)"
ROOT=$(root_path)
KEY=$(cache_key)

hold_root "$ROOT"

if [[ ${DM_CROSSROOT_FORCE:-0} != 1 && -f $ROOT/.dm-crossroot-key &&
  $(cat "$ROOT/.dm-crossroot-key") == "$KEY" && -x $ROOT/stage$PREFIX/python/bin/python$PY_MM ]]; then
  log "reusing cached cross root $ROOT (key ${KEY:0:12})"
  echo "$ROOT"
  exit 0
fi
log "building $ROOT (key ${KEY:0:12})"

# --- a copy of the x86_64 build root (built or reused first, under its own lock) ---------
X86=$(dm_buildroot)
mkdir -p "$(dirname "$X86")"
NEW=$ROOT.new
umount_stale "$NEW"
safe_rm_tree "$NEW"
(
  exec 9>"$X86.lock"
  flock 9
  DM_BUILDROOT=$X86 DM_BUILDROOT_LOCKED=$X86 "$HERE/buildroot.sh"
  cp -a "$X86" "$NEW"
)
rm -rf "$NEW/src" "$NEW/tmp/dm-freeze" "$NEW$PREFIX/venv" "$NEW/.dm-buildroot-key"
step "copied the x86_64 build root $X86"

# --- the cross toolchain and the arm64 -dev libraries ----------------------------------
cat >"$NEW/etc/apt/sources.list" <<EOF
deb [arch=amd64,arm64] $MIRROR bullseye main
deb [arch=amd64,arm64] $MIRROR bullseye-updates main
EOF
# Every installed amd64 package at its bullseye/bullseye-updates version (see the header).
cat >"$NEW/etc/apt/preferences.d/dm-cross" <<'EOF'
Package: *
Pin: release o=Debian
Pin-Priority: 1001
EOF
mount_api "$NEW"
in_root "$NEW" <<'EOF'
dpkg --add-architecture arm64
rm -rf /var/lib/apt/lists/*
apt-get update -qq
apt-get -y -qq --allow-downgrades dist-upgrade >/dev/null
apt-get install -y -qq --no-install-recommends crossbuild-essential-arm64 \
  zlib1g-dev:arm64 libffi-dev:arm64 libbz2-dev:arm64 liblzma-dev:arm64 uuid-dev:arm64 \
  >/dev/null
apt-get clean
dpkg-query -W -f '${Package}:${Architecture} ${Version}\n' libc6 libc6:arm64 liblzma5 \
  liblzma5:arm64 zlib1g:arm64 libffi7:arm64 gcc-aarch64-linux-gnu
EOF
step "crossbuild-essential-arm64 and the arm64 -dev libraries installed"

# --- OpenSSL for aarch64 ---------------------------------------------------------------
in_root "$NEW" PREFIX="$PREFIX" TARBALL="$OSSL_TARBALL" JOBS="$JOBS" TRIPLET="$TRIPLET" <<'EOF'
cd /tmp && rm -rf openssl-* && tar xzf "$PREFIX/src/$TARBALL" && cd openssl-*/
./Configure linux-aarch64 --cross-compile-prefix="$TRIPLET-" --prefix="$PREFIX/openssl" \
  --libdir=lib --openssldir=/etc/ssl shared no-apps no-docs no-tests \
  >/tmp/openssl-build.log 2>&1 || { tail -40 /tmp/openssl-build.log; exit 1; }
make -j"$JOBS" >>/tmp/openssl-build.log 2>&1 || { tail -40 /tmp/openssl-build.log; exit 1; }
make install_sw DESTDIR=/stage >>/tmp/openssl-build.log 2>&1 || { tail -40 /tmp/openssl-build.log; exit 1; }
cd /tmp && rm -rf openssl-*
EOF
step "OpenSSL $OSSL_VERSION cross-compiled"

# --- CPython for aarch64 ----------------------------------------------------------------
# A cross configure cannot run its probes on the target: CONFIG_SITE answers the three it
# would otherwise refuse to guess. The build python is the root's native CPython of the
# same version. --with-ensurepip=no: pip comes with the venv, made under qemu in the arm64
# root. -L to the staged OpenSSL at link time only; nothing is linked with -rpath.
in_root "$NEW" PREFIX="$PREFIX" TARBALL="$PY_TARBALL" JOBS="$JOBS" PY_MM="$PY_MM" \
  TRIPLET="$TRIPLET" <<'EOF'
cd /tmp && rm -rf Python-* && tar xJf "$PREFIX/src/$TARBALL" && cd Python-*/
cat >/tmp/config.site <<'SITE'
ac_cv_file__dev_ptmx=yes
ac_cv_file__dev_ptc=no
ac_cv_buggy_getaddrinfo=no
SITE
CONFIG_SITE=/tmp/config.site \
PKG_CONFIG_LIBDIR=/usr/lib/$TRIPLET/pkgconfig:/usr/share/pkgconfig \
./configure --host="$TRIPLET" --build=x86_64-linux-gnu \
  --with-build-python="$PREFIX/python/bin/python$PY_MM" \
  --prefix="$PREFIX/python" --enable-shared --with-ensurepip=no \
  --with-openssl=/stage"$PREFIX/openssl" --with-openssl-rpath=no --disable-test-modules \
  >/tmp/python-configure.log 2>&1 || { tail -40 /tmp/python-configure.log; exit 1; }
make -j"$JOBS" >/tmp/python-make.log 2>&1 || { tail -40 /tmp/python-make.log; exit 1; }
missing=$(grep -A3 'The necessary bits to build these optional modules were not found' \
  /tmp/python-make.log || true)
[ -z "$missing" ] || echo "note: $missing"
failed=$(grep -A3 'Following modules built successfully but were removed\|Failed to build these modules' \
  /tmp/python-make.log || true)
[ -z "$failed" ] || { echo "$failed"; exit 1; }
make install DESTDIR=/stage >/tmp/python-install.log 2>&1 || { tail -40 /tmp/python-install.log; exit 1; }
cd /tmp && rm -rf Python-*
# The modules the agent and its dependencies need were cross-built.
ls /stage"$PREFIX/python/lib/python$PY_MM"/lib-dynload/ | \
  grep -E '^_(ssl|hashlib|ctypes|bz2|lzma|uuid|decimal|json)\.' | wc -l | grep -qx 8 ||
  { echo "missing extension modules:"; ls /stage"$PREFIX/python/lib/python$PY_MM"/lib-dynload/; exit 1; }
find /stage"$PREFIX" -type f \( -name '*.so' -o -name '*.so.*' \) \
  -exec "$TRIPLET-strip" --strip-unneeded {} +
"$TRIPLET-strip" --strip-unneeded /stage"$PREFIX/python/bin/python$PY_MM"
du -sh /stage"$PREFIX"
EOF
step "CPython $PY_VERSION cross-compiled"

swap_in "$NEW" "$ROOT" .dm-crossroot-key "$KEY"
echo "$ROOT"
