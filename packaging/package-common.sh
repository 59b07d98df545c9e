# shellcheck shell=bash
# Shared by build-deb.sh, build-rpm.sh and build-repo.sh (sourced, not run).
# Sets REPO, VERSION, SOURCE_DATE_EPOCH (the rules of packaging/build-env.sh), and ARCH,
# MACHINE, SUFFIX (the architecture the caller's `--arch amd64|arm64` argument names,
# default amd64; its machine name, x86_64 or aarch64; "" or "-arm64" for build/ paths);
# defines log, die, normalise_modes, snapshot_payload, run_frozen.
# The caller sets HERE (its own directory) and NAME (its name in log lines), and
# sources this with its own arguments.

REPO=$(dirname "$HERE")
ARCH=amd64
case ${1:-} in
  "") ;;
  --arch) ARCH=${2:-} ;;
  *) echo "usage: $0 [--arch amd64|arm64]" >&2; exit 64 ;;
esac
[[ $ARCH =~ ^(amd64|arm64)$ ]] || { echo "$0: --arch must be amd64 or arm64, not '$ARCH'" >&2; exit 64; }
SUFFIX=
[[ $ARCH == amd64 ]] || SUFFIX=-$ARCH
LOG_TAG=$NAME
# shellcheck source=packaging/log.sh
. "$HERE/log.sh"

# One run of each script and architecture at a time in this tree (a second one waits):
# they rebuild build/<name><suffix>/ from scratch.
mkdir -p "$REPO/build"
exec 8>"$REPO/build/.$NAME$SUFFIX.lock"
flock 8

# shellcheck source=packaging/build-env.sh
. "$HERE/build-env.sh"
VERSION=$(dm_version)
MACHINE=$(dm_arch_triplet "$ARCH")
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

# run_frozen PROGRAM ARGS...: run a program of the payload here. An aarch64 one runs
# through qemu-user (binfmt_misc), with the loader and libc of the arm64 build root.
run_frozen() {
  if [[ $ARCH == arm64 && $(uname -m) != aarch64 ]]; then
    QEMU_LD_PREFIX=$(dm_buildroot_for arm64) "$@"
  else
    "$@"
  fi
}

# snapshot_payload DEST: copy the frozen onedir (DM_FROZEN, default build/frozen/dm-agent,
# build/frozen-arm64/dm-agent for arm64)
# to DEST, its modes normalised, and its bill of materials (the file beside it,
# dm-agent.cdx.json) to DEST.cdx.json; check that it is this tree's version and that the
# bill is the onedir's. A packaging/freeze.sh that runs meanwhile replaces build/frozen
# under the build root's lock: take the same lock while copying, so that a package is
# never made of a half-replaced onedir.
snapshot_payload() {
  local dest=$1 frozen lock got copy
  frozen=$(realpath -m "${DM_FROZEN:-$REPO/build/frozen$SUFFIX/dm-agent}")
  lock=$(dm_buildroot_for "$ARCH").lock
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
  "$HERE/check-elf-arch.sh" "$dest" "$MACHINE" >/dev/null ||
    die "$frozen holds ELF files of another machine than $MACHINE"
  got=$(run_frozen "$dest/dm-agent" --version 2>&1) || die "$frozen/dm-agent --version failed: $got"
  [[ $got == "dm-agent $VERSION" ]] ||
    die "the onedir is stale: it says '$got', the tree is $VERSION (run packaging/freeze.sh)"
  log "payload: $frozen ($(du -sh "$dest" | cut -f1), $(find "$dest" -type f | wc -l) files)"
}
