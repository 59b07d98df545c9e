#!/usr/bin/env bash
# Freeze dm-agent (dm_agent.cli:main) with PyInstaller, onedir, inside the cached Debian 11
# build root (packaging/buildroot.sh, run first: reused in seconds when cached).
#
# Outputs (relative to the repository):
#   build/frozen/dm-agent/                      the onedir; build/frozen/dm-agent/dm-agent runs
#   dist/dm-agent-<version>-linux-x86_64.tar.gz  the same, for hosts without a package manager:
#                                               top directory dm-agent-<version>/
# and then checks the glibc floor of every ELF file in the onedir (packaging/check-glibc.sh).
#
# Usage: packaging/freeze.sh            the product
#        packaging/freeze.sh --smoke    only the throwaway smoke program (build/smoke/),
#                                       see packaging/smoke_frozen.py and smoke-frozen.sh
# Environment: DM_BUILDROOT (see buildroot.sh), DM_GLIBC_MAX (default 2.31),
#              SOURCE_DATE_EPOCH (default: the last commit's time; tarball mtimes).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
ROOT=${DM_BUILDROOT:-/var/cache/dm-agent/buildroot-bullseye}
GLIBC_MAX=${DM_GLIBC_MAX:-2.31}
PREFIX=/opt/dm-build
MODE=product
case ${1:-} in
  "") ;;
  --smoke) MODE=smoke ;;
  *) echo "usage: $0 [--smoke]" >&2; exit 64 ;;
esac

T0=$(date +%s)
log() { printf '[freeze %4ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (chroot, mount)"
VERSION=$(sed -n 's/^__version__ = "\([^"]*\)"$/\1/p' "$REPO/dm_agent/__init__.py")
[[ $VERSION =~ ^[0-9A-Za-z.+-]+$ ]] || die "no __version__ = \"...\" in dm_agent/__init__.py"
[[ $MODE == smoke || -f $REPO/dm_agent/cli.py ]] || die "dm_agent/cli.py (dm_agent.cli:main) does not exist yet"
if [[ -z ${SOURCE_DATE_EPOCH:-} ]]; then
  SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || echo 0)
fi
export SOURCE_DATE_EPOCH

"$HERE/buildroot.sh"

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
cp "$HERE/dm-agent.spec" "$HERE/smoke_frozen.py" "$ROOT/src/packaging/"

mount_api "$ROOT"
smoke=0
[[ $MODE == smoke ]] && smoke=1
chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8 \
  PYTHONHASHSEED=0 SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" DM_AGENT_SRC=/src \
  DM_FREEZE_SMOKE=$smoke PREFIX=$PREFIX /bin/bash -euo pipefail -s <<'EOF'
cd /src
"$PREFIX/venv/bin/pyinstaller" --noconfirm --clean --log-level WARN \
  --distpath /tmp/dm-freeze/dist --workpath /tmp/dm-freeze/work packaging/dm-agent.spec
EOF
umount_all
log "PyInstaller done ($MODE)"

if [[ $MODE == smoke ]]; then
  safe_rm_tree "$REPO/build/smoke"
  mkdir -p "$REPO/build/smoke"
  cp -a "$ROOT/tmp/dm-freeze/dist/dm-agent-smoke" "$REPO/build/smoke/"
  "$HERE/check-glibc.sh" "$REPO/build/smoke/dm-agent-smoke" "$GLIBC_MAX"
  log "smoke program: build/smoke/dm-agent-smoke/dm-agent-smoke in $(($(date +%s) - T0))s"
  exit 0
fi

OUT=$REPO/build/frozen
safe_rm_tree "$OUT"
mkdir -p "$OUT"
cp -a "$ROOT/tmp/dm-freeze/dist/dm-agent" "$OUT/"
# The frozen program must at least start here, on the build host.
got=$("$OUT/dm-agent/dm-agent" --version 2>&1) || die "frozen dm-agent --version failed: $got"
[[ $got == *"$VERSION"* ]] || die "frozen dm-agent --version says '$got', expected $VERSION"

"$HERE/check-glibc.sh" "$OUT/dm-agent" "$GLIBC_MAX"

# --- the tarball ---------------------------------------------------------------------------
NAME=dm-agent-$VERSION
STAGE=$REPO/build/tarball
safe_rm_tree "$STAGE"
mkdir -p "$STAGE/$NAME/licenses" "$REPO/dist"
cp -a "$OUT/dm-agent/." "$STAGE/$NAME/"
cp "$REPO/dm_agent/data/dm-agent.ini" "$STAGE/$NAME/dm-agent.ini.example"
if [[ -f $REPO/LICENSE ]]; then cp "$REPO/LICENSE" "$STAGE/$NAME/LICENSE"; fi
# Licences of what is bundled: CPython and OpenSSL (from the source tarballs the root was
# built from) and every locked wheel.
for member in 'python3.13_*.orig.tar.xz:Python-*/LICENSE' 'openssl_*.orig.tar.gz:openssl-*/LICENSE.txt'; do
  tb=$(find "$ROOT$PREFIX/src" -maxdepth 1 -name "${member%%:*}" | head -1)
  tar -xf "$tb" -C "$STAGE/$NAME/licenses" --wildcards --no-wildcards-match-slash \
    --transform 's,^\([^/]*\)/,\1-,' "${member#*:}"
done
SITE=$ROOT$PREFIX/venv/lib/python3.13/site-packages
# (the wheels whose code is in the program; a wheel without a licence file contributes its
# METADATA, which names the licence)
for dist in psutil requests certifi idna urllib3 docker python_daemon \
  lockfile pyinstaller; do
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
dm-agent $VERSION, the DockMaster node agent, frozen for x86_64 Linux (glibc $GLIBC_MAX or
newer: Debian 11+, Ubuntu 20.04+, RHEL/Rocky/Alma 9+). No Python is needed on the host.

This directory is the whole program: keep dm-agent and _internal/ together.
    tar -C /opt -xzf dm-agent-$VERSION-linux-x86_64.tar.gz
    ln -s /opt/$NAME/dm-agent /usr/local/bin/dm-agent
    cp /opt/$NAME/dm-agent.ini.example /etc/dm-agent.ini   # then set master
    dm-agent --check-config && dm-agent --once
Where a package manager exists, prefer the .deb or .rpm: they add the systemd unit and
the dm-agent user. See README.md in the source for configuration and operation.

dm-agent is licensed under Apache-2.0. It bundles CPython (PSF licence), OpenSSL
(Apache-2.0), and the Python packages psutil, requests, certifi, idna, urllib3, docker,
python-daemon and lockfile; their licences are in licenses/.
The PyInstaller bootloader is GPL-2.0 with an exception that allows this use.
EOF
TARBALL=$REPO/dist/$NAME-linux-x86_64.tar.gz
tar -C "$STAGE" --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 \
  --numeric-owner --mode='u+rwX,go+rX,go-w' -cf - "$NAME" | gzip -9n >"$TARBALL.part"
mv "$TARBALL.part" "$TARBALL"
safe_rm_tree "$STAGE"

log "onedir: build/frozen/dm-agent ($(du -sh "$OUT/dm-agent" | cut -f1)," \
  "$(find "$OUT/dm-agent" -type f | wc -l) files)"
log "tarball: dist/$(basename "$TARBALL") ($(du -h "$TARBALL" | cut -f1))"
log "frozen dm-agent $VERSION in $(($(date +%s) - T0))s"
