#!/usr/bin/env bash
# Freeze dm-agent (dm_agent.cli:main) with PyInstaller, onedir, inside the cached Debian 11
# build root of the architecture (run first: reused in seconds when cached):
# packaging/buildroot.sh for amd64, packaging/buildroot-arm64.sh for arm64 (there
# PyInstaller runs under qemu-user; see that script).
#
# Outputs (relative to the repository), for amd64:
#   build/frozen/dm-agent/                      the onedir; build/frozen/dm-agent/dm-agent runs
#   build/frozen/dm-agent.cdx.json              its bill of materials (CycloneDX, packaging/sbom.py)
#   dist/dm-agent-<version>-linux-x86_64.tar.gz  the same, for hosts without a package manager:
#                                               top directory dm-agent-<version>/
#   dist/dm-agent-<version>.cdx.json            the bill of materials, beside the packages
# and for arm64 the same at build/frozen-arm64/, dist/dm-agent-<version>-linux-aarch64.tar.gz
# and dist/dm-agent-<version>-aarch64.cdx.json (the amd64 names predate arm64 and stay).
# and then checks every ELF file in the onedir: the glibc floor (packaging/check-glibc.sh)
# and no RUNPATH or RPATH (packaging/check-runpath.sh).
#
# The build root's lock is held for the whole freeze: two freezes (of this tree or of
# another) never share the root's /src and /tmp/dm-freeze, nor write build/frozen at once.
#
# Usage: packaging/freeze.sh [--arch amd64|arm64]          the product (default amd64)
#        packaging/freeze.sh [--arch amd64|arm64] --smoke  only the throwaway smoke program
#                              (build/smoke/, build/smoke-arm64/), see packaging/smoke_frozen.py
#                              and smoke-frozen.sh
# Environment: DM_BUILDROOT, DM_BUILDROOT_ARM64 (see the build root scripts), DM_GLIBC_MAX (default 2.31),
#              SOURCE_DATE_EPOCH (see packaging/build-env.sh: default the last commit's time).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
GLIBC_MAX=${DM_GLIBC_MAX:-2.31}
MODE=product
ARCH=amd64
while (($#)); do
  case $1 in
    --smoke) MODE=smoke ;;
    --arch) ARCH=${2:-}; shift ;;
    *) echo "usage: $0 [--arch amd64|arm64] [--smoke]" >&2; exit 64 ;;
  esac
  shift
done
[[ $ARCH =~ ^(amd64|arm64)$ ]] || { echo "freeze.sh: --arch must be amd64 or arm64, not '$ARCH'" >&2; exit 64; }

LOG_TAG=freeze
# shellcheck source=packaging/log.sh
. "$HERE/log.sh"
# shellcheck source=packaging/build-env.sh
. "$HERE/build-env.sh"

[[ $(id -u) == 0 ]] || die "must run as root (chroot, mount)"
VERSION=$(dm_version)
[[ $MODE == smoke || -f $REPO/dm_agent/cli.py ]] || die "dm_agent/cli.py (dm_agent.cli:main) does not exist yet"
SOURCE_DATE_EPOCH=$(dm_source_date_epoch)
export SOURCE_DATE_EPOCH
MACHINE=$(dm_arch_triplet "$ARCH")
ROOT=$(dm_buildroot_for "$ARCH")
# Output names: amd64's have no suffix (they predate arm64).
SUFFIX=
[[ $ARCH == amd64 ]] || SUFFIX=-$ARCH
if [[ $ARCH == arm64 ]]; then
  # shellcheck source=packaging/binfmt.sh
  . "$HERE/binfmt.sh"
  ensure_binfmt
  BUILDROOT_SH=$HERE/buildroot-arm64.sh
  # The aarch64 program runs here through qemu-user, its loader and libc from the root.
  run_frozen() { QEMU_LD_PREFIX=$ROOT "$@"; }
else
  BUILDROOT_SH=$HERE/buildroot.sh
  run_frozen() { "$@"; }
fi

mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
if ! flock -n 9; then
  log "waiting for $ROOT.lock (another freeze or build of the root)"
  flock 9
fi
# Only this architecture's root is named: the arm64 root's build starts from the amd64 one
# (crossroot-arm64.sh reads DM_BUILDROOT), so naming the arm64 root there too would make
# the cross root take that root, and its lock, which this script holds, as the amd64 one.
if [[ $ARCH == arm64 ]]; then
  DM_BUILDROOT_ARM64=$ROOT DM_BUILDROOT_LOCKED=$ROOT "$BUILDROOT_SH"
else
  DM_BUILDROOT=$ROOT DM_BUILDROOT_LOCKED=$ROOT "$BUILDROOT_SH"
fi

# --- up to date? ----------------------------------------------------------------------
# The products are a function of the sources, the packaging that reads them, the build
# root (its path names its recipe's key), the version and SOURCE_DATE_EPOCH. When the
# onedir was frozen from exactly these and the tarball and bill of materials are in
# dist/, there is nothing to do: `make image` after `make repo` (make check) reuses the
# freeze instead of running PyInstaller again (minutes for arm64 under qemu-user).
OUT=$REPO/build/frozen$SUFFIX
TARBALL=$REPO/dist/dm-agent-$VERSION-linux-$MACHINE.tar.gz
SBOM_NAME=dm-agent-$VERSION.cdx.json
[[ $ARCH == amd64 ]] || SBOM_NAME=dm-agent-$VERSION-$MACHINE.cdx.json
inputs_key() {
  {
    printf '%s\n' "$ROOT" "$VERSION" "$SOURCE_DATE_EPOCH" "$GLIBC_MAX" "$MODE"
    (cd "$REPO" && find dm_agent LICENSE packaging/freeze.sh packaging/freeze.spec \
      packaging/smoke_frozen.py packaging/sbom.py packaging/requirements.lock \
      packaging/build-env.sh packaging/check-*.sh -type f ! -name '*.pyc' -print0 |
      LC_ALL=C sort -z | xargs -0 sha256sum)
  } | sha256sum | cut -c1-64
}
KEY=$(inputs_key)
if [[ $MODE == product && -x $OUT/dm-agent/dm-agent && -f $TARBALL && -f $REPO/dist/$SBOM_NAME &&
      $(cat "$OUT/.inputs" 2>/dev/null) == "$KEY" ]]; then
  log "frozen dm-agent $VERSION for $ARCH is up to date (${OUT#"$REPO/"}, inputs ${KEY:0:12})"
  exit 0
fi

# --- mounts (undone on any exit; nothing is deleted while mounted) ---------------------
# shellcheck source=packaging/mounts.sh
. "$HERE/mounts.sh"
trap 'umount_all' EXIT
trap 'exit 130' INT TERM

# --- the source, copied (not bind-mounted: nothing in the root can write to the repo) --
safe_rm_tree "$ROOT/src"
safe_rm_tree "$ROOT/tmp/dm-freeze"
mkdir -p "$ROOT/src/packaging" "$ROOT/tmp/dm-freeze"
tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -cf - dm_agent | tar -C "$ROOT/src" -xf -
cp "$HERE/freeze.spec" "$HERE/smoke_frozen.py" "$HERE/sbom.py" "$HERE/requirements.lock" \
  "$ROOT/src/packaging/"

mount_api "$ROOT"
smoke=0
[[ $MODE == smoke ]] && smoke=1
chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8 \
  PYTHONHASHSEED=0 SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" DM_AGENT_SRC=/src \
  DM_FREEZE_SMOKE=$smoke PREFIX=$PREFIX VERSION="$VERSION" \
  PY_VERSION="$PY_VERSION" PY_URL="$DEBIAN_ARCHIVE/$PY_POOL/$PY_TARBALL" PY_SHA256="$PY_SHA256" \
  OSSL_VERSION="$OSSL_VERSION" OSSL_URL="$DEBIAN_ARCHIVE/$OSSL_POOL/$OSSL_TARBALL" \
  OSSL_SHA256="$OSSL_SHA256" /bin/bash -euo pipefail -s <<'EOF'
cd /src
"$PREFIX/venv/bin/pyinstaller" --noconfirm --clean --log-level WARN \
  --distpath /tmp/dm-freeze/dist --workpath /tmp/dm-freeze/work packaging/freeze.spec
if [ "$DM_FREEZE_SMOKE" = 0 ]; then
  "$PREFIX/venv/bin/python" packaging/sbom.py /tmp/dm-freeze/dist/dm-agent \
    >/tmp/dm-freeze/dm-agent.cdx.json
fi
EOF
umount_all
log "PyInstaller done ($MODE)"

if [[ $MODE == smoke ]]; then
  SMOKE_OUT=$REPO/build/smoke$SUFFIX
  safe_rm_tree "$SMOKE_OUT"
  mkdir -p "$SMOKE_OUT"
  cp -a "$ROOT/tmp/dm-freeze/dist/dm-agent-smoke" "$SMOKE_OUT/"
  "$HERE/check-elf-arch.sh" "$SMOKE_OUT/dm-agent-smoke" "$MACHINE"
  "$HERE/check-glibc.sh" "$SMOKE_OUT/dm-agent-smoke" "$GLIBC_MAX"
  "$HERE/check-runpath.sh" "$SMOKE_OUT/dm-agent-smoke"
  log "smoke program: ${SMOKE_OUT#"$REPO/"}/dm-agent-smoke/dm-agent-smoke in $(($(date +%s) - T0))s"
  exit 0
fi

safe_rm_tree "$OUT"
mkdir -p "$OUT"
cp -a "$ROOT/tmp/dm-freeze/dist/dm-agent" "$OUT/"
cp "$ROOT/tmp/dm-freeze/dm-agent.cdx.json" "$OUT/dm-agent.cdx.json"
# The frozen program must at least start here, on the build host.
got=$(run_frozen "$OUT/dm-agent/dm-agent" --version 2>&1) || die "frozen dm-agent --version failed: $got"
[[ $got == *"$VERSION"* ]] || die "frozen dm-agent --version says '$got', expected $VERSION"

"$HERE/check-elf-arch.sh" "$OUT/dm-agent" "$MACHINE"
"$HERE/check-glibc.sh" "$OUT/dm-agent" "$GLIBC_MAX"
"$HERE/check-runpath.sh" "$OUT/dm-agent"

# --- the tarball ---------------------------------------------------------------------------
NAME=dm-agent-$VERSION
STAGE=$REPO/build/tarball$SUFFIX
safe_rm_tree "$STAGE"
mkdir -p "$STAGE/$NAME/licenses" "$REPO/dist"
cp -a "$OUT/dm-agent/." "$STAGE/$NAME/"
cp "$REPO/dm_agent/data/dm-agent.ini" "$STAGE/$NAME/dm-agent.ini.example"
cp "$REPO/LICENSE" "$STAGE/$NAME/LICENSE"
cp "$OUT/dm-agent.cdx.json" "$STAGE/$NAME/dm-agent.cdx.json"
# Licences of what is bundled: CPython and OpenSSL (from the source tarballs the root was
# built from) and every locked wheel.
for member in "$PY_TARBALL:Python-*/LICENSE" "$OSSL_TARBALL:openssl-*/LICENSE.txt"; do
  tar -xf "$ROOT$PREFIX/src/${member%%:*}" -C "$STAGE/$NAME/licenses" --wildcards \
    --no-wildcards-match-slash --transform 's,^\([^/]*\)/,\1-,' "${member#*:}"
done
SITE=$ROOT$PREFIX/venv/lib/python$PY_MM/site-packages
# (the wheels whose code is in the program; a wheel without a licence file contributes its
# METADATA, which names the licence)
for dist in psutil requests certifi idna urllib3 docker python_daemon \
  lockfile pyinstaller asyncssh typing_extensions; do
  for d in "$SITE/$dist"-[0-9]*.dist-info; do
    pkg=$(basename "$d" .dist-info)
    found=0
    while IFS= read -r -d '' lic; do
      cp "$lic" "$STAGE/$NAME/licenses/$pkg-$(basename "$lic")"
      found=1
    done < <(find "$d" -type f \( -iname 'LICEN[CS]E*' -o -iname 'COPYING*' \) -print0)
    if ((!found)); then cp "$d/METADATA" "$STAGE/$NAME/licenses/$pkg-METADATA"; fi
  done
done
cat >"$STAGE/$NAME/README" <<EOF
dm-agent $VERSION, the DockMaster node agent, frozen for $MACHINE Linux (glibc $GLIBC_MAX or
newer: Debian 11+, Ubuntu 20.04+, RHEL/Rocky/Alma 9+). No Python is needed on the host.

This directory is the whole program: keep dm-agent and _internal/ together.
    tar -C /opt -xzf dm-agent-$VERSION-linux-$MACHINE.tar.gz
    ln -s /opt/$NAME/dm-agent /usr/local/bin/dm-agent
    cp /opt/$NAME/dm-agent.ini.example /etc/dm-agent.ini   # then set master
    dm-agent --check-config && dm-agent --once
Where a package manager exists, prefer the .deb or .rpm: they add the systemd unit and
the dm-agent user. See README.md and docs/ in the source for configuration and operation.

dm-agent is licensed under the Apache License 2.0 (LICENSE). It bundles CPython (PSF
licence), OpenSSL (Apache-2.0), libraries of Debian 11, and the Python packages psutil,
requests, certifi, idna, urllib3, docker, python-daemon, lockfile, and (for the tunnel)
asyncssh (EPL-2.0 or GPL-2.0-or-later, unmodified) and typing-extensions; their licences are
in licenses/. The PyInstaller bootloader is GPL-2.0 with an exception that allows this
use. dm-agent.cdx.json (CycloneDX) lists every bundled component with its version,
licence, source and the sha256 of its files, for vulnerability scanners.
EOF
tar -C "$STAGE" --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 \
  --numeric-owner --mode='u+rwX,go+rX,go-w' -cf - "$NAME" | gzip -9n >"$TARBALL.part"
mv "$TARBALL.part" "$TARBALL"
safe_rm_tree "$STAGE"
cp "$OUT/dm-agent.cdx.json" "$REPO/dist/$SBOM_NAME"
echo "$KEY" >"$OUT/.inputs"  # last: a freeze cut short is never taken as up to date

log "onedir: ${OUT#"$REPO/"}/dm-agent ($(du -sh "$OUT/dm-agent" | cut -f1)," \
  "$(find "$OUT/dm-agent" -type f | wc -l) files)"
log "tarball: dist/$(basename "$TARBALL") ($(du -h "$TARBALL" | cut -f1))"
log "bill of materials: dist/$SBOM_NAME"
log "frozen dm-agent $VERSION for $ARCH in $(($(date +%s) - T0))s"
