# shellcheck shell=bash
# Shared by build-deb.sh, build-rpm.sh and build-repo.sh (sourced, not run).
# Sets REPO, VERSION, SOURCE_DATE_EPOCH (the rules of packaging/build-env.sh); defines log,
# die, normalise_modes, snapshot_payload.
# The caller sets HERE (its own directory) and NAME (its name in log lines).

REPO=$(dirname "$HERE")
T0=$(date +%s)
log() { printf '[%s %3ss] %s\n' "$NAME" "$(($(date +%s) - T0))" "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

# One run of each script at a time in this tree (a second one waits): they rebuild
# build/<name>/ from scratch.
mkdir -p "$REPO/build"
exec 8>"$REPO/build/.$NAME.lock"
flock 8

# shellcheck source=packaging/build-env.sh
. "$HERE/build-env.sh"
VERSION=$(dm_version)
SOURCE_DATE_EPOCH=$(dm_source_date_epoch)
export SOURCE_DATE_EPOCH

need() {
  local tool=$1 pkg=$2
  command -v "$tool" >/dev/null || die "$tool missing (apt-get install $pkg)"
}

# normalise_modes DIR: the modes of everything below DIR (DIR too) as the packages ship
# them, whatever the umask of the checkout, of freeze.sh and of this build: 0755 for
# directories and for files that are executable by anyone, 0644 for the other files.
normalise_modes() {
  find "$1" -type d -exec chmod 0755 {} +
  find "$1" -type f -perm /0111 -exec chmod 0755 {} +
  find "$1" -type f ! -perm /0111 -exec chmod 0644 {} +
}

# snapshot_payload DEST: copy the frozen onedir (DM_FROZEN, default build/frozen/dm-agent)
# to DEST, its modes normalised, and its bill of materials (the file beside it,
# dm-agent.cdx.json) to DEST.cdx.json; check that it is this tree's version and that the
# bill is the onedir's. A packaging/freeze.sh that runs meanwhile replaces build/frozen
# under the build root's lock: take the same lock while copying, so that a package is
# never made of a half-replaced onedir.
snapshot_payload() {
  local dest=$1 frozen lock got copy
  frozen=$(realpath -m "${DM_FROZEN:-$REPO/build/frozen/dm-agent}")
  lock=$(dm_buildroot).lock
  rm -rf "$dest" "$dest.cdx.json"
  mkdir -p "$(dirname "$dest")"
  # shellcheck disable=SC2016 # (expanded by that sh)
  copy=(sh -c 'cp -a "$1" "$2" && cp "$1.cdx.json" "$2.cdx.json"' copy "$frozen" "$dest")
  if [[ -z ${DM_FROZEN:-} && -e $lock ]]; then
    log "copying the onedir under $lock (so, after any running freeze.sh)"
    copy=(flock "$lock" "${copy[@]}")
  fi
  "${copy[@]}" 2>/dev/null || die "no frozen program at $frozen (or no $frozen.cdx.json): run packaging/freeze.sh first"
  normalise_modes "$dest"
  chmod 0644 "$dest.cdx.json"
  [[ -x $dest/dm-agent ]] || die "no executable $frozen/dm-agent: run packaging/freeze.sh first"
  grep -q "\"content\": \"$(sha256sum "$dest/dm-agent" | cut -d' ' -f1)\"" "$dest.cdx.json" ||
    die "$frozen.cdx.json is not the bill of materials of $frozen: run packaging/freeze.sh"
  got=$("$dest/dm-agent" --version 2>&1) || die "$frozen/dm-agent --version failed: $got"
  [[ $got == "dm-agent $VERSION" ]] ||
    die "the onedir is stale: it says '$got', the tree is $VERSION (run packaging/freeze.sh)"
  log "payload: $frozen ($(du -sh "$dest" | cut -f1), $(find "$dest" -type f | wc -l) files)"
}
