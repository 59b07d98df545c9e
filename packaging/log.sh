# shellcheck shell=bash
# The log lines of the build scripts that are not build-root scripts: freeze.sh,
# smoke-frozen.sh and package-common.sh (sourced, not run). The caller sets LOG_TAG (the
# tag of its lines), then sources this file.
#
#   log MSG   a timed line on stderr: "[TAG  12s] MSG"
#   die MSG   logs "ERROR: MSG" (or LOG_DIE_WORD: MSG) and exits 1
#
# root-common.sh keeps its own log/step/die: it is part of every build root's cache key,
# so sourcing this file from it would have to enter that key too.

T0=${T0:-$(date +%s)}
log() { printf '[%s %4ss] %s\n' "$LOG_TAG" "$(($(date +%s) - T0))" "$*" >&2; }
die() {
  log "${LOG_DIE_WORD:-ERROR}: $*"
  exit 1
}
