# shellcheck shell=bash
# Shared by build-deb.sh, build-rpm.sh and build-repo.sh (sourced, not run).
# Sets REPO, VERSION, SOURCE_DATE_EPOCH; defines log, die, snapshot_payload.
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

# The one place the version lives: dm_agent/__init__.py (the same reading as freeze.sh).
VERSION=$(sed -n 's/^__version__ = "\([^"]*\)"$/\1/p' "$REPO/dm_agent/__init__.py")
[[ $VERSION =~ ^[0-9][0-9A-Za-z.+~]*$ ]] || die "no usable __version__ = \"...\" in dm_agent/__init__.py"

if [[ -z ${SOURCE_DATE_EPOCH:-} ]]; then
  SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

need() {
  local tool=$1 pkg=$2
  command -v "$tool" >/dev/null || die "$tool missing (apt-get install $pkg)"
}

# snapshot_payload DEST: copy the frozen onedir (DM_FROZEN, default build/frozen/dm-agent)
# to DEST, and check that it is this tree's version. A packaging/freeze.sh that runs
# meanwhile replaces build/frozen under the build root's lock: take the same lock while
# copying, so that a package is never made of a half-replaced onedir.
snapshot_payload() {
  local dest=$1 frozen lock got
  frozen=$(realpath -m "${DM_FROZEN:-$REPO/build/frozen/dm-agent}")
  lock=${DM_BUILDROOT:-/var/cache/dm-agent/buildroot-bullseye}.lock
  rm -rf "$dest"
  mkdir -p "$(dirname "$dest")"
  if [[ -z ${DM_FROZEN:-} && -e $lock ]]; then
    log "copying the onedir under $lock (so, after any running freeze.sh)"
    flock "$lock" cp -a "$frozen" "$dest" 2>/dev/null ||
      die "no frozen program at $frozen: run packaging/freeze.sh first"
  else
    cp -a "$frozen" "$dest" 2>/dev/null || die "no frozen program at $frozen: run packaging/freeze.sh first"
  fi
  [[ -x $dest/dm-agent ]] || die "no executable $frozen/dm-agent: run packaging/freeze.sh first"
  got=$("$dest/dm-agent" --version 2>&1) || die "$frozen/dm-agent --version failed: $got"
  [[ $got == "dm-agent $VERSION" ]] ||
    die "the onedir is stale: it says '$got', the tree is $VERSION (run packaging/freeze.sh)"
  log "payload: $frozen ($(du -sh "$dest" | cut -f1), $(find "$dest" -type f | wc -l) files)"
}
