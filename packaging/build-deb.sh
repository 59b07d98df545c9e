#!/usr/bin/env bash
# Build dist/dm-agent_<version>_<arch>.deb (amd64 or arm64) from the frozen onedir of that
# architecture (packaging/freeze.sh --arch ARCH). The arm64 package is built on an amd64
# host as dpkg-buildpackage's cross build (--host-arch): nothing is compiled, debhelper
# only installs the payload.
#
# debhelper runs in a copy of the packaging inputs under build/deb/src/, never in the
# checkout: dpkg-buildpackage writes debian/dm-agent/, debian/files, *.substvars and
# stamps, which must not litter a tree other people work in. debian/changelog is written
# there from dm_agent.__version__, the one place the version lives.
#
# Usage: packaging/build-deb.sh [--arch amd64|arm64]   prints the path of the .deb it made
# Needs: dpkg-dev, debhelper (>= 13.1), binutils; the onedir in build/frozen/dm-agent/
#        (build/frozen-arm64/dm-agent/ for arm64).
# Environment: SOURCE_DATE_EPOCH (default: the last commit's time: changelog date and
#              file mtimes, so that one tree builds one .deb), DM_FROZEN (the onedir,
#              default build/frozen[-arm64]/dm-agent; its bill of materials beside it,
#              DM_FROZEN.cdx.json, goes to /usr/share/doc/dm-agent/dm-agent.cdx.json).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NAME=build-deb
# shellcheck source=packaging/package-common.sh
. "$HERE/package-common.sh"
need dpkg-buildpackage dpkg-dev
need dh debhelper
need objdump binutils

WORK=$REPO/build/deb$SUFFIX
SRC=$WORK/src
DEB=dm-agent_${VERSION}_${ARCH}.deb
rm -rf "$WORK"

# --- the source package, staged --------------------------------------------------------
snapshot_payload "$WORK/payload"
mkdir -p "$SRC/packaging" "$SRC/dm_agent/data"
cp -a "$REPO/debian" "$REPO/systemd" "$REPO/README.md" "$SRC/"
cp -a "$REPO/dm_agent/data/dm-agent.ini" "$SRC/dm_agent/data/"
cp "$WORK/payload.cdx.json" "$SRC/dm-agent.cdx.json"
cp -a "$HERE/dm-agent.8" "$HERE/payload-deps.sh" "$HERE/check-glibc.sh" "$SRC/packaging/"
cat >"$SRC/debian/changelog" <<EOF
dm-agent ($VERSION) unstable; urgency=medium

  * dm-agent $VERSION (changelog entry written by packaging/build-deb.sh from
    dm_agent.__version__; the changes are in the project's history).

 -- DockMaster developers <dev@dm-agent.invalid>  $(date -R -u -d "@$SOURCE_DATE_EPOCH")
EOF

# Every staged file gets the same mtime: dh_builddeb only clamps mtimes newer than
# SOURCE_DATE_EPOCH, so a checkout's older files (cp -a keeps their times) would reach
# the .deb as they are, and two checkouts of one commit would differ.
find "$SRC" "$WORK/payload" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

# --- build -----------------------------------------------------------------------------
log "dpkg-buildpackage: dm-agent $VERSION $ARCH"
# -b: binary only; -us -uc: unsigned (the repository's signature covers it, build-repo.sh).
if ! (cd "$SRC" && FROZEN=$WORK/payload dpkg-buildpackage -b -us -uc --no-pre-clean --host-arch "$ARCH" \
  >"$WORK/build.log" 2>&1); then
  tail -n 40 "$WORK/build.log" >&2
  die "dpkg-buildpackage failed; the whole log is $WORK/build.log"
fi
[[ -f $WORK/$DEB ]] || die "dpkg-buildpackage made no $DEB (see $WORK/build.log)"

mkdir -p "$REPO/dist"
mv "$WORK/$DEB" "$REPO/dist/$DEB"
log "made dist/$DEB ($(du -h "$REPO/dist/$DEB" | cut -f1);" \
  "Installed-Size $(dpkg-deb -f "$REPO/dist/$DEB" Installed-Size) KiB;" \
  "Depends: $(dpkg-deb -f "$REPO/dist/$DEB" Depends)) in $(($(date +%s) - T0))s"
echo "$REPO/dist/$DEB"
