#!/usr/bin/env bash
# Build dist/dm-agent-<version>-1.<machine>.rpm (x86_64 or aarch64) from the frozen onedir
# of that architecture (packaging/freeze.sh --arch ARCH); rpmbuild --target, as nothing
# is compiled, builds the aarch64 one on an x86_64 host.
#
# rpmbuild runs with its _topdir in build/rpm/, on the sources staged there: the payload
# (as a tar), the unit and sysusers snippet shared with the .deb (systemd/), the sample
# config, the man page, README.md, LICENSE, debian/copyright (as COPYRIGHT), the licence
# texts freeze.sh collected into its tarball and the payload's bill of materials. rpm/dm-agent.spec gets the version and the payload's
# dependencies by --define, so neither is written down twice.
#
# Usage: packaging/build-rpm.sh [--arch amd64|arm64]   prints the path of the .rpm it made
# Needs: rpm (rpmbuild), binutils; the onedir in build/frozen/dm-agent/ and the tarball
#        dist/dm-agent-<version>-linux-x86_64.tar.gz, both from packaging/freeze.sh (for
#        arm64: build/frozen-arm64/dm-agent/, dist/dm-agent-<version>-linux-aarch64.tar.gz).
# Environment: SOURCE_DATE_EPOCH (default: the last commit's time: build time and file
#              mtimes), DM_FROZEN (the onedir, default build/frozen/dm-agent),
#              DM_TARBALL (freeze.sh's tarball, default dist/dm-agent-<version>-linux-x86_64.tar.gz).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NAME=build-rpm
# shellcheck source=packaging/package-common.sh
. "$HERE/package-common.sh"
need rpmbuild rpm
need objdump binutils

WORK=$REPO/build/rpm$SUFFIX
SOURCES=$WORK/SOURCES
RPM=dm-agent-$VERSION-1.$MACHINE.rpm
TARBALL=${DM_TARBALL:-$REPO/dist/dm-agent-$VERSION-linux-$MACHINE.tar.gz}
rm -rf "$WORK"
mkdir -p "$SOURCES"

# --- sources ---------------------------------------------------------------------------
snapshot_payload "$WORK/payload/dm-agent"
tar -C "$WORK/payload" --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 \
  --numeric-owner -cf "$SOURCES/dm-agent-payload.tar" dm-agent
REQUIRES=$("$HERE/payload-deps.sh" rpm "$WORK/payload/dm-agent")

# The licence texts of what is bundled, from freeze.sh's tarball, which must hold the
# same program as the onedir (else one of them is stale).
[[ -f $TARBALL ]] || die "no $TARBALL: run packaging/freeze.sh"
mkdir -p "$WORK/tarball"
tar -C "$WORK/tarball" -xzf "$TARBALL" "dm-agent-$VERSION/dm-agent" "dm-agent-$VERSION/licenses"
cmp -s "$WORK/tarball/dm-agent-$VERSION/dm-agent" "$WORK/payload/dm-agent/dm-agent" ||
  die "$TARBALL and the onedir hold different programs: run packaging/freeze.sh"
tar -C "$WORK/tarball/dm-agent-$VERSION" --sort=name --mtime="@$SOURCE_DATE_EPOCH" \
  --owner=0 --group=0 --numeric-owner --mode=go-w -cf "$SOURCES/licenses.tar" licenses

cp "$REPO/systemd/dm-agent.service" "$REPO/systemd/dm-agent.sysusers" \
  "$REPO/dm_agent/data/dm-agent.ini" "$HERE/dm-agent.8" "$REPO/README.md" \
  "$REPO/rpm/80-dm-agent.preset" "$SOURCES/"
cp "$REPO/debian/copyright" "$SOURCES/COPYRIGHT"
cp "$REPO/LICENSE" "$SOURCES/LICENSE"
cp "$WORK/payload/dm-agent.cdx.json" "$SOURCES/dm-agent.cdx.json"
defines=(--define "dm_version $VERSION" --define "payload_requires $REQUIRES")
if [[ -f $REPO/systemd/dm-agent.tmpfiles ]]; then
  cp "$REPO/systemd/dm-agent.tmpfiles" "$SOURCES/"
  defines+=(--define "with_tmpfiles 1")
fi

# --- build -----------------------------------------------------------------------------
log "rpmbuild: dm-agent $VERSION (Requires: $REQUIRES)"
# _buildhost, use_source_date_epoch_as_buildtime and clamp_mtime: the same tree builds
# the same .rpm, whichever host builds it and when.
if ! rpmbuild -bb --target "$MACHINE" \
  --define "_topdir $WORK" \
  --define "_buildhost reproducible" \
  --define "use_source_date_epoch_as_buildtime 1" \
  --define "clamp_mtime_to_source_date_epoch 1" \
  "${defines[@]}" "$REPO/rpm/dm-agent.spec" >"$WORK/build.log" 2>&1; then
  tail -n 40 "$WORK/build.log" >&2
  die "rpmbuild failed; the whole log is $WORK/build.log"
fi
[[ -f $WORK/RPMS/$MACHINE/$RPM ]] || die "rpmbuild made no $RPM (see $WORK/build.log)"

mkdir -p "$REPO/dist"
mv "$WORK/RPMS/$MACHINE/$RPM" "$REPO/dist/$RPM"
log "made dist/$RPM ($(du -h "$REPO/dist/$RPM" | cut -f1); installed" \
  "$(($(rpm -qp --queryformat '%{SIZE}' "$REPO/dist/$RPM" 2>/dev/null) / 1024)) KiB) in $(($(date +%s) - T0))s"
echo "$REPO/dist/$RPM"
