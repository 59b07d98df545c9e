#!/usr/bin/env bash
# Create, or reuse from the cache, the Debian 11 arm64 root that freezes dm-agent for
# aarch64: the arm64 counterpart of packaging/buildroot.sh, with the same layout
# (/opt/dm-build/{openssl,python,venv,src,BUILDINFO}), so freeze.sh runs the same steps in
# either.
#
# Its programs are aarch64: chroot runs them through qemu-user (binfmt_misc, set up here
# by ensure_binfmt when it is not). Nothing is compiled under emulation (~11x slower):
# OpenSSL and CPython are cross-compiled by packaging/crossroot-arm64.sh and copied in;
# only ldconfig, apt, pip (the locked aarch64 wheels) and, later, PyInstaller run here.
#
# Debian 11 arm64, so that what PyInstaller bundles from it (libz, libffi, libbz2,
# liblzma) needs glibc 2.31 at most, as on amd64. Its sources are bullseye and
# bullseye-updates only: the package registry this project builds from serves no arm64
# packages from bullseye-security (the amd64 root has that pocket). The bundled arm64
# libraries are therefore those of the last point release (11.11) and bullseye-updates;
# README.md ("Architectures") says so.
#
# Cache: /var/cache/dm-agent/buildroot-bullseye-arm64-<key>, key = sha256 of this script,
# root-common.sh, the lock and the cross root's key; rebuilt beside the old one, swapped
# in when complete.
#
# Environment: DM_BUILDROOT_ARM64 (the root's path), DM_BUILDROOT_FORCE=1, DM_DEBIAN_MIRROR,
#              DM_SRC_CACHE; DM_BUILDROOT_LOCKED=<root> when the caller holds <root>.lock.
# Usage: packaging/buildroot-arm64.sh          build or reuse
#        packaging/buildroot-arm64.sh --key    print the cache key and exit
#        packaging/buildroot-arm64.sh --path   print the root's path and exit
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=packaging/build-env.sh
. "$HERE/build-env.sh"
MIRROR=${DM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SRC_CACHE=${DM_SRC_CACHE:-/var/cache/dm-agent/src}
LOCK=$HERE/requirements.lock

ROOT_TAG=buildroot-arm64
# shellcheck source=packaging/root-common.sh
. "$HERE/root-common.sh"

cache_key() {
  {
    sha256sum "$HERE/buildroot-arm64.sh" "$HERE/root-common.sh" "$LOCK" | awk '{print $1}'
    "$HERE/crossroot-arm64.sh" --key
  } | sha256sum | awk '{print $1}'
}

case ${1:-} in
  --key) cache_key; exit 0 ;;
  --path) dm_buildroot_for arm64; exit 0 ;;
  "") ;;
  *) die "usage: $0 [--key|--path]" ;;
esac
[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, chroot, mount)"
for tool in debootstrap chroot mount flock sha256sum python3; do
  command -v "$tool" >/dev/null || die "missing host tool: $tool"
done
# shellcheck source=packaging/binfmt.sh
. "$HERE/binfmt.sh"
ensure_binfmt
ROOT=$(dm_buildroot_for arm64)
KEY=$(cache_key)

hold_root "$ROOT"

if [[ ${DM_BUILDROOT_FORCE:-0} != 1 && -f $ROOT/.dm-buildroot-key &&
  $(cat "$ROOT/.dm-buildroot-key") == "$KEY" && -x $ROOT$PREFIX/venv/bin/pyinstaller ]]; then
  log "reusing cached arm64 build root $ROOT (key ${KEY:0:12}) in $(($(date +%s) - T0))s"
  exit 0
fi
log "building $ROOT (key ${KEY:0:12}; cached key: $(cat "$ROOT/.dm-buildroot-key" 2>/dev/null || echo none))"
NEW=$ROOT.new
umount_stale "$NEW"
safe_rm_tree "$NEW"
mkdir -p "$SRC_CACHE"

# --- the Debian 11 arm64 root: first stage on the host, second stage emulated ------------
debootstrap --arch=arm64 --foreign --variant=minbase bullseye "$NEW" "$MIRROR" \
  >"$SRC_CACHE/debootstrap-arm64.log" 2>&1 ||
  { tail -20 "$SRC_CACHE/debootstrap-arm64.log" >&2; die "debootstrap (first stage) failed"; }
chroot "$NEW" /debootstrap/debootstrap --second-stage >>"$SRC_CACHE/debootstrap-arm64.log" 2>&1 ||
  { tail -20 "$SRC_CACHE/debootstrap-arm64.log" >&2; die "debootstrap (second stage, under qemu) failed"; }
step "debootstrap bullseye arm64 done"

cat >"$NEW/etc/apt/sources.list" <<EOF
deb $MIRROR bullseye main
deb $MIRROR bullseye-updates main
EOF
cp /etc/resolv.conf "$NEW/etc/resolv.conf"
mount_api "$NEW"
# binutils: objdump and ldd for PyInstaller; the runtime libraries CPython's modules need.
in_root "$NEW" <<'EOF'
apt-get update -qq
apt-get install -y -qq --no-install-recommends binutils zlib1g libffi7 libbz2-1.0 \
  liblzma5 libuuid1 >/dev/null
apt-get clean
EOF
step "packages installed in the arm64 root"

# --- the cross-compiled OpenSSL and CPython, the sources and the locked wheels ----------
CROSS=$("$HERE/crossroot-arm64.sh" | tail -1)
mkdir -p "$NEW$PREFIX/src" "$NEW$PREFIX/wheelhouse"
cp -a "$CROSS/stage$PREFIX/openssl" "$CROSS/stage$PREFIX/python" "$NEW$PREFIX/"
cp "$CROSS$PREFIX/src/$PY_TARBALL" "$CROSS$PREFIX/src/$OSSL_TARBALL" "$NEW$PREFIX/src/"
cp "$LOCK" "$NEW$PREFIX/requirements.lock"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
  --only-binary=:all: --dest "$NEW$PREFIX/wheelhouse" \
  --platform manylinux_2_31_aarch64 --platform manylinux2014_aarch64 \
  --python-version "$PY_MM" --implementation cp --abi "cp${PY_MM/./}" --abi abi3 --abi none \
  -r "$LOCK" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
step "cross-built CPython copied in; wheelhouse downloaded ($(find "$NEW$PREFIX/wheelhouse" -name '*.whl' | wc -l) wheels)"

in_root "$NEW" PREFIX="$PREFIX" PY_MM="$PY_MM" <<'EOF'
printf '%s\n' "$PREFIX/openssl/lib" "$PREFIX/python/lib" >/etc/ld.so.conf.d/dm-build.conf
ldconfig
"$PREFIX/python/bin/python$PY_MM" - <<'PY'
import ssl, ctypes, zlib, bz2, lzma, uuid, hashlib, json, socket, _decimal, platform
print("ssl:", ssl.OPENSSL_VERSION, "machine:", platform.machine())
assert ssl.OPENSSL_VERSION.startswith("OpenSSL 3."), ssl.OPENSSL_VERSION
assert platform.machine() == "aarch64", platform.machine()
PY
EOF
root_venv "$NEW"
step "venv with the locked aarch64 wheels ready (under qemu)"

swap_in "$NEW" "$ROOT" .dm-buildroot-key "$KEY"
