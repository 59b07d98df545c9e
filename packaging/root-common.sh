# shellcheck shell=bash
# What the three build-root scripts share: buildroot.sh, buildroot-arm64.sh and
# crossroot-arm64.sh (sourced, not run). It is part of each one's cache key, because what
# it runs shapes the roots. The caller sets HERE (packaging/) and ROOT_TAG (the tag of
# its log lines), then sources this file.
#
#   log MSG, step MSG, die MSG  timed lines on stderr ("[TAG  12s] MSG"); step adds how long
#                               the previous step took; die exits 1
#   in_root R [NAME=value...]   runs a bash script (stdin) inside root R, in a clean
#                               environment with these variables exported
#   hold_root R                 takes R.lock for the rest of the script, unless the caller
#                               already holds it (DM_BUILDROOT_LOCKED=R), and undoes every
#                               mount on exit, failure or interrupt
#   root_venv R                 the locked venv and BUILDINFO in root R
#   swap_in NEW ROOT KEYFILE KEY  puts the complete NEW in the place of ROOT, with its key
#   mount_api, umount_stale, safe_rm_tree  from packaging/mounts.sh

T0=$(date +%s)
step_start=$T0
log() { printf '[%s %4ss] %s\n' "$ROOT_TAG" "$(($(date +%s) - T0))" "$*" >&2; }
step() {
  local now
  now=$(date +%s)
  log "$* (previous step took $((now - step_start))s)"
  step_start=$now
}
die() { log "ERROR: $*"; exit 1; }

# shellcheck source=packaging/mounts.sh
. "$HERE/mounts.sh"

in_root() {
  local r=$1
  shift
  chroot "$r" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
    HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@" /bin/bash -euo pipefail -s
}

hold_root() {
  mkdir -p "$(dirname "$1")"
  if [[ ${DM_BUILDROOT_LOCKED:-} != "$1" ]]; then
    # The descriptor stays open, and the lock held, until the script exits.
    exec {root_lock_fd}>"$1.lock"
    flock "$root_lock_fd"
  fi
  trap 'umount_all' EXIT
  trap 'exit 130' INT TERM
}

# The locked build environment in root R: a venv of R's $PREFIX/python with the wheels of
# $PREFIX/wheelhouse (--no-index --require-hashes), and $PREFIX/BUILDINFO, what was built.
root_venv() {
  in_root "$1" PREFIX="$PREFIX" PY_MM="$PY_MM" <<'SH'
"$PREFIX/python/bin/python$PY_MM" -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --quiet --disable-pip-version-check --no-index \
  --find-links "$PREFIX/wheelhouse" --require-hashes --only-binary=:all: \
  -r "$PREFIX/requirements.lock"
"$PREFIX/venv/bin/pip" check
{
  echo "built: $(date -u +%FT%TZ) on Debian $(cat /etc/debian_version) $(dpkg --print-architecture)"
  echo "glibc: $(ldd --version | head -1)"
  "$PREFIX/venv/bin/python" -c 'import sys, ssl; print("python:", sys.version.split()[0]); print("openssl:", ssl.OPENSSL_VERSION)'
  echo "pyinstaller: $("$PREFIX/venv/bin/pyinstaller" --version)"
  echo "packages:"
  "$PREFIX/venv/bin/pip" freeze --all | sed 's/^/  /'
} >"$PREFIX/BUILDINFO"
cat "$PREFIX/BUILDINFO"
SH
}

# Puts the complete root NEW in the place of ROOT, recording KEY in ROOT/KEYFILE, so that
# an interrupted build never leaves a half root where a whole one is expected.
swap_in() { # NEW ROOT KEYFILE KEY
  umount_all
  echo "$4" >"$1/$3"
  umount_stale "$2"
  safe_rm_tree "$2"
  mv "$1" "$2"
  log "ready: $2 ($(du -sh "$2" | cut -f1)) in $(($(date +%s) - T0))s"
}
